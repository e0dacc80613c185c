//! One client connection, after the handshake: a fresh client is shown refs and paired when a
//! test scans one of them; a paired device is logged in and served its start-up IQs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_websockets::ServerBuilder;
use wacore_binary::builder::NodeBuilder;
use wacore_binary::{Node, NodeContent};
use wacore_libsignal::core::curve::{PrivateKey, PublicKey};
use waproto::buffa::Message;
use waproto::whatsapp::ClientPayload;

use super::handshake::{self, Handshake, public_bytes};
use super::link_code::{self, WRAPPED_EPHEMERAL_LEN};
use super::phone::{Account, PairedDevice, QrCode};
use super::wire::{Conn, SERVER, Transport, attr, decode_node, iq_result, pair_device_stanza};
use super::{
    BoxError, FakeWhatsapp, Link, PairingCodeRequest, Phone, Scan, ScanError, Shared, Stats, err,
};

/// The device number the fake gives every companion it pairs.
const COMPANION_DEVICE: u32 = 1;
/// The `id` of the `pair-success` iq (one per connection).
const PAIR_SUCCESS_ID: &str = "ps-1";
/// App-state collections the client syncs only after it has emitted `Connected`.
const POST_CONNECT_COLLECTIONS: [&str; 3] = ["regular", "regular_low", "regular_high"];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) async fn serve(stream: TcpStream, n: u64, shared: &Arc<Shared>) -> Result<(), BoxError> {
    stream.set_nodelay(true)?;
    let (_request, ws) = ServerBuilder::new().accept(stream).await?;
    let mut conn = Conn::new(ws);
    let handshake = handshake::respond(&mut conn, &shared.keys).await?;
    Stats::bump(&shared.stats.handshakes);
    if handshake.resumed {
        Stats::bump(&shared.stats.ik_handshakes);
    }
    let payload = ClientPayload::decode_from_slice(&handshake.client_payload)
        .map_err(|e| err(format!("undecodable ClientPayload: {e}")))?;
    match payload.username {
        Some(phone) => {
            let device = payload.device.unwrap_or(0);
            login(conn, handshake, phone, device, shared).await
        }
        None => {
            let identity = payload
                .device_pairing_data
                .as_option()
                .and_then(|d| d.e_ident.as_deref())
                .and_then(|i| <[u8; 32]>::try_from(i).ok());
            register(conn, handshake, identity, n, shared).await
        }
    }
}

/// Removes a connection's refs from the waiting map when the connection ends.
struct Waiting<'a> {
    shared: &'a Shared,
    refs: Vec<String>,
}

impl<'a> Waiting<'a> {
    fn register(shared: &'a Shared, refs: &[String], scans: mpsc::UnboundedSender<Phone>) -> Self {
        let mut waiting = shared.waiting.lock().expect("waiting map");
        for r in refs {
            waiting.insert(r.clone(), scans.clone());
        }
        Waiting {
            shared,
            refs: refs.to_vec(),
        }
    }

    /// Another ref the connection answers to (a pairing ref), on the same channel.
    fn add(&mut self, reference: &str) {
        let mut waiting = self.shared.waiting.lock().expect("waiting map");
        let Some(scans) = self.refs.first().and_then(|r| waiting.get(r)).cloned() else {
            return;
        };
        waiting.insert(reference.to_owned(), scans);
        self.refs.push(reference.to_owned());
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.shared.waiting.lock() {
            for r in &self.refs {
                waiting.remove(r);
            }
        }
    }
}

enum Input {
    Frame(Vec<u8>),
    Phone(Phone),
}

async fn next_input(
    conn: &mut Conn,
    scans: &mut mpsc::UnboundedReceiver<Phone>,
) -> Result<Input, BoxError> {
    loop {
        if let Some(frame) = conn.take_frame() {
            return Ok(Input::Frame(frame));
        }
        tokio::select! {
            filled = conn.fill() => filled?,
            Some(phone) = scans.recv() => return Ok(Input::Phone(phone)),
        }
    }
}

/// A `pair-success` sent and not answered yet.
struct PendingPair {
    account: Account,
    device: PairedDevice,
    qr: QrCode,
    reply: tokio::sync::oneshot::Sender<Result<PairedDevice, ScanError>>,
}

/// The client's latest `companion_hello` on this connection.
struct CodeRequest {
    pairing_ref: String,
    phone: u64,
    wrapped_ephemeral: Vec<u8>,
}

/// A `primary_hello` sent (a code typed on the phone), its `companion_finish` not answered yet.
struct PendingCode {
    account: Account,
    code: String,
    pairing_ref: String,
    primary_ephemeral: PrivateKey,
    companion_ephemeral: [u8; 32],
    reply: tokio::sync::oneshot::Sender<Result<PairedDevice, ScanError>>,
}

/// What a fresh client's connection is in the middle of.
struct Registration<'a> {
    shared: &'a Shared,
    n: u64,
    client_static: [u8; 32],
    identity: Option<[u8; 32]>,
    waiting: Waiting<'a>,
    pending: Option<PendingPair>,
    code_request: Option<CodeRequest>,
    pending_code: Option<PendingCode>,
    notifications: u64,
}

/// A fresh client: show it refs, pair it when one is scanned or its pairing code typed.
async fn register(
    mut conn: Conn,
    handshake: Handshake,
    identity: Option<[u8; 32]>,
    n: u64,
    shared: &Shared,
) -> Result<(), BoxError> {
    let Handshake {
        mut transport,
        client_static,
        ..
    } = handshake;
    let refs = FakeWhatsapp::refs(n);
    let (scans_tx, mut scans) = mpsc::unbounded_channel();
    let waiting = Waiting::register(shared, &refs, scans_tx);
    transport
        .send(&mut conn, &pair_device_stanza("pd-1", &refs))
        .await?;
    Stats::bump(&shared.stats.pair_devices_sent);

    let mut reg = Registration {
        shared,
        n,
        client_static,
        identity,
        waiting,
        pending: None,
        code_request: None,
        pending_code: None,
        notifications: 0,
    };
    loop {
        match next_input(&mut conn, &mut scans).await? {
            Input::Phone(Phone::Scan(Scan {
                link: Link::Qr(qr),
                reply,
            })) => {
                let refused = if qr.noise_public != client_static {
                    Some(ScanError::Mismatch("noise key"))
                } else if identity.is_some_and(|i| i != qr.identity_public) {
                    Some(ScanError::Mismatch("identity key"))
                } else if reg.pending.is_some() || reg.pending_code.is_some() {
                    Some(ScanError::Mismatch("already scanned"))
                } else {
                    None
                };
                if let Some(refused) = refused {
                    let _ = reply.send(Err(refused));
                    continue;
                }
                let account = Account::new(shared.accounts.fetch_add(1, Ordering::Relaxed));
                reg.send_pair_success(&mut conn, &mut transport, account, qr, reply)
                    .await?;
            }
            Input::Phone(Phone::Scan(Scan {
                link: Link::Code(code),
                reply,
            })) => {
                reg.type_code(&mut conn, &mut transport, code, reply)
                    .await?;
            }
            Input::Phone(Phone::RefreshCode(reply)) => {
                let refreshed = reg.refresh_code(&mut conn, &mut transport).await?;
                let _ = reply.send(refreshed);
            }
            Input::Frame(frame) => {
                let Some(node) = open_stanza(&mut transport, frame)? else {
                    continue;
                };
                if node.tag != "iq" {
                    continue;
                }
                let id = attr(&node, "id").unwrap_or_default();
                let kind = attr(&node, "type").unwrap_or_default();
                if id == PAIR_SUCCESS_ID
                    && let Some(pair) = reg.pending.take()
                {
                    if kind == "result" {
                        match signed_identity(&node)
                            .and_then(|s| pair.account.verify_signed_identity(&pair.qr, s))
                        {
                            Ok(()) => {
                                shared.devices.lock().expect("devices map").insert(
                                    (pair.device.phone, pair.device.device),
                                    pair.device.clone(),
                                );
                                Stats::bump(&shared.stats.pair_successes);
                                let _ = pair.reply.send(Ok(pair.device));
                                // The real server restarts the stream so that the client logs in
                                // as the paired device.
                                let restart =
                                    NodeBuilder::new("stream:error").attr("code", "515").build();
                                transport.send_node(&mut conn, &restart).await?;
                                conn.close().await?;
                                return Ok(());
                            }
                            Err(e) => {
                                Stats::bump(&shared.stats.pair_errors);
                                let _ = pair.reply.send(Err(ScanError::Refused(format!(
                                    "pair-device-sign: {e}"
                                ))));
                            }
                        }
                    } else {
                        Stats::bump(&shared.stats.pair_errors);
                        let error = node.get_optional_child("error");
                        let code = error.and_then(|e| attr(e, "code")).unwrap_or_default();
                        let text = error.and_then(|e| attr(e, "text")).unwrap_or_default();
                        let _ = pair
                            .reply
                            .send(Err(ScanError::Refused(format!("{kind} {code} {text}"))));
                    }
                    continue;
                }
                if kind == "set"
                    && let Some(link) = node.get_optional_child("link_code_companion_reg")
                {
                    match attr(link, "stage").as_deref() {
                        Some("companion_hello") => {
                            reg.companion_hello(&mut conn, &mut transport, &id, link)
                                .await?;
                            continue;
                        }
                        Some("companion_finish") => {
                            reg.companion_finish(&mut conn, &mut transport, &id, link)
                                .await?;
                            continue;
                        }
                        _ => {}
                    }
                }
                match kind.as_str() {
                    "result" => Stats::bump(&shared.stats.acks),
                    "get" | "set" => {
                        transport
                            .send_node(&mut conn, &iq_result(&id, Vec::new()))
                            .await?;
                        Stats::bump(&shared.stats.iqs_answered);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Registration<'_> {
    /// Vouches for the companion of `qr` (a scanned QR code, or the keys of a pairing-code
    /// exchange) with `pair-success`; the client's `pair-device-sign` completes it.
    async fn send_pair_success(
        &mut self,
        conn: &mut Conn,
        transport: &mut Transport,
        account: Account,
        qr: QrCode,
        reply: tokio::sync::oneshot::Sender<Result<PairedDevice, ScanError>>,
    ) -> Result<(), BoxError> {
        let device = PairedDevice {
            phone: account.phone,
            lid: account.lid,
            device: COMPANION_DEVICE,
            noise_public: qr.noise_public,
            identity_public: qr.identity_public,
        };
        let identity = match account.device_identity(&qr, now()) {
            Ok(identity) => identity,
            Err(e) => {
                let _ = reply.send(Err(ScanError::Refused(format!("signing: {e}"))));
                return Ok(());
            }
        };
        transport
            .send_node(conn, &pair_success(identity, &device))
            .await?;
        Stats::bump(&self.shared.stats.pair_successes_sent);
        self.pending = Some(PendingPair {
            account,
            device,
            qr,
            reply,
        });
        Ok(())
    }

    /// `companion_hello`: the client asks for a pairing code for a phone number. Answered with a
    /// pairing ref (or the configured refusal).
    async fn companion_hello(
        &mut self,
        conn: &mut Conn,
        transport: &mut Transport,
        id: &str,
        link: &Node,
    ) -> Result<(), BoxError> {
        Stats::bump(&self.shared.stats.pairing_code_requests);
        let jid = attr(link, "jid").unwrap_or_default();
        let phone_number = jid.split('@').next().unwrap_or_default().to_owned();
        let wrapped_ephemeral =
            child_bytes(link, "link_code_pairing_wrapped_companion_ephemeral_pub")
                .unwrap_or_default();
        let auth_key = child_bytes(link, "companion_server_auth_key_pub").unwrap_or_default();
        let refusal = self
            .shared
            .code_refusal
            .lock()
            .expect("code refusal")
            .clone();
        let phone = phone_number.parse::<u64>().ok();
        let refusal = refusal.or_else(|| {
            if phone.is_none() || wrapped_ephemeral.len() != WRAPPED_EPHEMERAL_LEN {
                Some((400, "bad-request".to_owned()))
            } else if auth_key != self.client_static {
                // The companion names the Noise key it connected with.
                Some((401, "not-authorized".to_owned()))
            } else {
                None
            }
        });
        let mut request = PairingCodeRequest {
            phone_number,
            pairing_ref: String::new(),
            connection: self.n,
            code: None,
        };
        if let Some((code, text)) = refusal {
            Stats::bump(&self.shared.stats.pairing_code_refusals);
            self.shared
                .code_requests
                .lock()
                .expect("code requests")
                .push(request);
            return transport.send_node(conn, &iq_error(id, code, &text)).await;
        }
        let pairing_ref = {
            let mut requests = self.shared.code_requests.lock().expect("code requests");
            request.pairing_ref = format!("3@FAKE-CODE-{}-{}", self.n, requests.len());
            requests.push(request.clone());
            request.pairing_ref
        };
        self.waiting.add(&pairing_ref);
        self.code_request = Some(CodeRequest {
            pairing_ref: pairing_ref.clone(),
            phone: phone.unwrap_or_default(),
            wrapped_ephemeral,
        });
        let answer = NodeBuilder::new("link_code_companion_reg")
            .children([NodeBuilder::new("link_code_pairing_ref")
                .bytes(pairing_ref.into_bytes())
                .build()])
            .build();
        transport
            .send_node(conn, &iq_result(id, vec![answer]))
            .await
    }

    /// `refresh_code`: the client's code is void; it drops it (and may ask for another).
    async fn refresh_code(
        &mut self,
        conn: &mut Conn,
        transport: &mut Transport,
    ) -> Result<Result<(), ScanError>, BoxError> {
        let Some(request) = self.code_request.take() else {
            return Ok(Err(ScanError::NoPairingCodeRequest(format!(
                "connection {}",
                self.n
            ))));
        };
        self.notifications += 1;
        let link = NodeBuilder::new("link_code_companion_reg")
            .attr("stage", "refresh_code")
            .children([NodeBuilder::new("link_code_pairing_ref")
                .bytes(request.pairing_ref.into_bytes())
                .build()])
            .build();
        transport.send_node(conn, &self.notification(link)).await?;
        Stats::bump(&self.shared.stats.code_refreshes_sent);
        Ok(Ok(()))
    }

    /// `<notification from="s.whatsapp.net" type="link_code_companion_reg">` around `link`.
    fn notification(&self, link: Node) -> Node {
        NodeBuilder::new("notification")
            .attrs([
                ("from", SERVER.to_owned()),
                ("type", "link_code_companion_reg".to_owned()),
                ("id", format!("lc-{}", self.notifications)),
                ("t", now().to_string()),
            ])
            .children([link])
            .build()
    }

    /// The person types `code` on the phone: unwrap the client's ephemeral key with it and send
    /// `primary_hello` with the phone's own ephemeral key, wrapped with the same code.
    async fn type_code(
        &mut self,
        conn: &mut Conn,
        transport: &mut Transport,
        code: String,
        reply: tokio::sync::oneshot::Sender<Result<PairedDevice, ScanError>>,
    ) -> Result<(), BoxError> {
        let Some(request) = &self.code_request else {
            let _ = reply.send(Err(ScanError::NoPairingCodeRequest(format!(
                "connection {}",
                self.n
            ))));
            return Ok(());
        };
        if self.pending.is_some() || self.pending_code.is_some() {
            let _ = reply.send(Err(ScanError::Mismatch("already scanned")));
            return Ok(());
        }
        let primary_ephemeral = PrivateKey::deserialize(&rand::random::<[u8; 32]>())
            .map_err(|e| err(format!("ephemeral key: {e}")))?;
        let primary_public = public_bytes(&primary_ephemeral);
        let (wrapped_companion, typed) = (request.wrapped_ephemeral.clone(), code.clone());
        // PBKDF2 twice (2^17 rounds each): off the async threads.
        let (companion_ephemeral, wrapped_primary) = tokio::task::spawn_blocking(move || {
            (
                link_code::unwrap_ephemeral(&wrapped_companion, &typed),
                link_code::wrap_ephemeral(&primary_public, &typed),
            )
        })
        .await?;
        let companion_ephemeral = companion_ephemeral.map_err(err)?;
        let account = Account::with_phone(
            self.shared.accounts.fetch_add(1, Ordering::Relaxed),
            request.phone,
        );
        self.notifications += 1;
        let link = NodeBuilder::new("link_code_companion_reg")
            .attr("stage", "primary_hello")
            .children([
                NodeBuilder::new("link_code_pairing_wrapped_primary_ephemeral_pub")
                    .bytes(wrapped_primary.to_vec())
                    .build(),
                NodeBuilder::new("primary_identity_pub")
                    .bytes(account.identity_public().to_vec())
                    .build(),
                NodeBuilder::new("link_code_pairing_ref")
                    .bytes(request.pairing_ref.clone().into_bytes())
                    .build(),
            ])
            .build();
        transport.send_node(conn, &self.notification(link)).await?;
        Stats::bump(&self.shared.stats.primary_hellos_sent);
        self.pending_code = Some(PendingCode {
            account,
            code,
            pairing_ref: request.pairing_ref.clone(),
            primary_ephemeral,
            companion_ephemeral,
            reply,
        });
        Ok(())
    }

    /// `companion_finish`: the client's key bundle. If it opens with the typed code, the phone
    /// vouches for the companion with `pair-success`, its HMAC keyed by the adv secret both sides
    /// derive from the bundle.
    async fn companion_finish(
        &mut self,
        conn: &mut Conn,
        transport: &mut Transport,
        id: &str,
        link: &Node,
    ) -> Result<(), BoxError> {
        let reference = child_bytes(link, "link_code_pairing_ref").unwrap_or_default();
        let Some(pending) = self
            .pending_code
            .take_if(|p| p.pairing_ref.as_bytes() == reference)
        else {
            // Nobody typed a code for this ref.
            return transport
                .send_node(conn, &iq_error(id, 400, "bad-request"))
                .await;
        };
        // The server takes the bundle; whether the phone can open it is the phone's business.
        transport
            .send_node(conn, &iq_result(id, Vec::new()))
            .await?;
        let opened = self.open_bundle(&pending, link);
        let (bundle, ephemeral_shared) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                Stats::bump(&self.shared.stats.key_bundle_failures);
                let _ = pending.reply.send(Err(ScanError::Refused(e)));
                return Ok(());
            }
        };
        Stats::bump(&self.shared.stats.key_bundles_opened);
        if let Some(request) = self
            .shared
            .code_requests
            .lock()
            .expect("code requests")
            .iter_mut()
            .find(|r| r.pairing_ref == pending.pairing_ref)
        {
            request.code = Some(pending.code.clone());
        }
        let identity_shared = match pending
            .account
            .identity_agreement(&bundle.companion_identity)
        {
            Ok(shared) => shared,
            Err(e) => {
                let _ = pending.reply.send(Err(ScanError::Refused(e)));
                return Ok(());
            }
        };
        let qr = QrCode {
            reference: pending.pairing_ref,
            noise_public: self.client_static,
            identity_public: bundle.companion_identity,
            adv_secret: link_code::adv_secret(&ephemeral_shared, &identity_shared, &bundle.random),
            client_type: "pairing-code".into(),
        };
        self.send_pair_success(conn, transport, pending.account, qr, pending.reply)
            .await
    }

    /// Opens the key bundle of a `companion_finish` and checks what it says.
    fn open_bundle(
        &self,
        pending: &PendingCode,
        link: &Node,
    ) -> Result<(link_code::KeyBundle, [u8; 32]), String> {
        let wrapped = child_bytes(link, "link_code_pairing_wrapped_key_bundle")
            .ok_or("no link_code_pairing_wrapped_key_bundle")?;
        let companion_identity: [u8; 32] = child_bytes(link, "companion_identity_public")
            .and_then(|k| k.try_into().ok())
            .ok_or("no 32-byte companion_identity_public")?;
        let companion_ephemeral =
            PublicKey::from_djb_public_key_bytes(&pending.companion_ephemeral)
                .map_err(|e| e.to_string())?;
        let ephemeral_shared = pending
            .primary_ephemeral
            .calculate_agreement(&companion_ephemeral)
            .map_err(|e| e.to_string())?;
        let bundle = link_code::open_key_bundle(&wrapped, &ephemeral_shared)
            .map_err(|e| format!("code {}: {e}", pending.code))?;
        if bundle.companion_identity != companion_identity {
            return Err("the key bundle names another companion identity".into());
        }
        if self.identity.is_some_and(|i| i != companion_identity) {
            return Err("the companion identity is not the one it registered with".into());
        }
        if bundle.primary_identity != pending.account.identity_public() {
            return Err("the key bundle names another primary identity".into());
        }
        Ok((bundle, ephemeral_shared))
    }
}

/// The bytes of a child node.
fn child_bytes(node: &Node, tag: &str) -> Option<Vec<u8>> {
    match node.get_optional_child(tag)?.content.as_ref()? {
        NodeContent::Bytes(bytes) => Some(bytes.clone()),
        NodeContent::String(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// `<iq from="s.whatsapp.net" type="error" id=..><error code=.. text=../></iq>`.
fn iq_error(id: &str, code: u16, text: &str) -> Node {
    NodeBuilder::new("iq")
        .attrs([("from", SERVER), ("type", "error"), ("id", id)])
        .children([NodeBuilder::new("error")
            .attr("code", code.to_string())
            .attr("text", text)
            .build()])
        .build()
}

/// Decrypts and decodes a stanza; an undecodable one is logged and skipped.
fn open_stanza(transport: &mut Transport, frame: Vec<u8>) -> Result<Option<Node>, BoxError> {
    let plaintext = transport.open(frame)?;
    match decode_node(&plaintext) {
        Ok(node) => Ok(Some(node)),
        Err(e) => {
            eprintln!("fake whatsapp: undecodable stanza: {e}");
            Ok(None)
        }
    }
}

/// `<iq from="s.whatsapp.net" type="set" id="ps-1" xmlns="md"><pair-success>` with the device
/// identity, the platform of the "phone" and the device's JID and LID.
fn pair_success(identity: Vec<u8>, device: &PairedDevice) -> Node {
    let success = NodeBuilder::new("pair-success")
        .children([
            NodeBuilder::new("device-identity").bytes(identity).build(),
            NodeBuilder::new("platform").attr("name", "fake").build(),
            NodeBuilder::new("biz")
                .attr("name", format!("Fake Account {}", device.phone))
                .build(),
            NodeBuilder::new("device")
                .attr("jid", device.jid())
                .attr("lid", device.lid_jid())
                .build(),
        ])
        .build();
    NodeBuilder::new("iq")
        .attrs([
            ("from", SERVER),
            ("type", "set"),
            ("id", PAIR_SUCCESS_ID),
            ("xmlns", "md"),
        ])
        .children([success])
        .build()
}

/// The device identity in `<iq type="result"><pair-device-sign><device-identity>`.
fn signed_identity(node: &Node) -> Result<&[u8], String> {
    match node
        .get_optional_child_by_tag(&["pair-device-sign", "device-identity"])
        .and_then(|n| n.content.as_ref())
    {
        Some(NodeContent::Bytes(bytes)) => Ok(bytes),
        _ => Err("no pair-device-sign/device-identity".into()),
    }
}

/// A paired device: check it is one the fake paired, send `<success>`, answer its IQs.
async fn login(
    mut conn: Conn,
    handshake: Handshake,
    phone: u64,
    device: u32,
    shared: &Shared,
) -> Result<(), BoxError> {
    let Handshake {
        mut transport,
        client_static,
        ..
    } = handshake;
    let known = shared
        .devices
        .lock()
        .expect("devices map")
        .get(&(phone, device))
        .cloned();
    let Some(paired) = known.filter(|d| d.noise_public == client_static) else {
        Stats::bump(&shared.stats.login_failures);
        let failure = NodeBuilder::new("failure")
            .attrs([("reason", "401"), ("location", "fake")])
            .build();
        transport.send_node(&mut conn, &failure).await?;
        conn.close().await?;
        return Ok(());
    };
    let t = now();
    let success = NodeBuilder::new("success")
        .attr("t", t)
        .attr("creation", t)
        .attr("props", "1")
        .attr("abprops", "1")
        .attr("location", "fake")
        .attr("lid", paired.lid_jid())
        .build();
    let mut drops = shared.drops.subscribe();
    transport.send_node(&mut conn, &success).await?;
    Stats::bump(&shared.stats.logins);

    loop {
        let frame = loop {
            if let Some(frame) = conn.take_frame() {
                break frame;
            }
            tokio::select! {
                filled = conn.fill() => filled?,
                Ok(()) = drops.changed() => {
                    Stats::bump(&shared.stats.connections_dropped);
                    conn.close().await?;
                    return Ok(());
                }
            }
        };
        let Some(node) = open_stanza(&mut transport, frame)? else {
            continue;
        };
        if node.tag != "iq" {
            continue;
        }
        let id = attr(&node, "id").unwrap_or_default();
        match attr(&node, "type").as_deref() {
            Some("result") => Stats::bump(&shared.stats.acks),
            Some("get" | "set") => {
                answer_iq(&mut conn, &mut transport, &node, &id, shared).await?;
                Stats::bump(&shared.stats.iqs_answered);
            }
            _ => {}
        }
    }
}

/// Answers an IQ of a logged-in client.
async fn answer_iq(
    conn: &mut Conn,
    transport: &mut Transport,
    iq: &Node,
    id: &str,
    shared: &Shared,
) -> Result<(), BoxError> {
    match attr(iq, "xmlns").as_deref() {
        // Leaving passive mode: the server then delivers what queued offline, here nothing.
        Some("passive") if iq.get_optional_child("active").is_some() => {
            transport
                .send_node(conn, &iq_result(id, Vec::new()))
                .await?;
            let offline = NodeBuilder::new("ib")
                .attr("from", SERVER)
                .children([NodeBuilder::new("offline").attr("count", "0").build()])
                .build();
            transport.send_node(conn, &offline).await
        }
        // Logout: the device is unlinked; logging in with it again fails with a 401.
        Some("md") if iq.get_optional_child("remove-companion-device").is_some() => {
            let jid = iq
                .get_optional_child("remove-companion-device")
                .and_then(|r| attr(r, "jid"))
                .unwrap_or_default();
            let removed = {
                let mut devices = shared.devices.lock().expect("devices map");
                let before = devices.len();
                devices.retain(|_, d| d.jid() != jid);
                before != devices.len()
            };
            if removed {
                Stats::bump(&shared.stats.logouts);
            }
            transport.send_node(conn, &iq_result(id, Vec::new())).await
        }
        // App-state sync: every requested collection, empty (no snapshot, no patches).
        Some("w:sync:app:state") => {
            let names: Vec<String> = iq
                .get_optional_child("sync")
                .map(|sync| {
                    sync.get_children_by_tag("collection")
                        .filter_map(|c| attr(c, "name"))
                        .collect()
                })
                .unwrap_or_default();
            Stats::bump(&shared.stats.app_state_syncs);
            if names
                .iter()
                .any(|n| POST_CONNECT_COLLECTIONS.contains(&n.as_str()))
            {
                Stats::bump(&shared.stats.post_connect_syncs);
            }
            let collections = names.into_iter().map(|name| {
                NodeBuilder::new("collection")
                    .attr("name", name)
                    .attr("version", "0")
                    .build()
            });
            let sync = NodeBuilder::new("sync").children(collections).build();
            transport.send_node(conn, &iq_result(id, vec![sync])).await
        }
        _ => transport.send_node(conn, &iq_result(id, Vec::new())).await,
    }
}
