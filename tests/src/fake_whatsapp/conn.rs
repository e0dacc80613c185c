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
use waproto::buffa::Message;
use waproto::whatsapp::ClientPayload;

use super::handshake::{self, Handshake};
use super::phone::{Account, PairedDevice, QrCode};
use super::wire::{Conn, SERVER, Transport, attr, decode_node, iq_result, pair_device_stanza};
use super::{BoxError, FakeWhatsapp, Scan, ScanError, Shared, Stats, err};

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
    fn register(shared: &'a Shared, refs: &[String], scans: mpsc::UnboundedSender<Scan>) -> Self {
        let mut waiting = shared.waiting.lock().expect("waiting map");
        for r in refs {
            waiting.insert(r.clone(), scans.clone());
        }
        Waiting {
            shared,
            refs: refs.to_vec(),
        }
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
    Scan(Scan),
}

async fn next_input(
    conn: &mut Conn,
    scans: &mut mpsc::UnboundedReceiver<Scan>,
) -> Result<Input, BoxError> {
    loop {
        if let Some(frame) = conn.take_frame() {
            return Ok(Input::Frame(frame));
        }
        tokio::select! {
            filled = conn.fill() => filled?,
            Some(scan) = scans.recv() => return Ok(Input::Scan(scan)),
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

/// A fresh client: show it refs, pair it when one is scanned.
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
    let _waiting = Waiting::register(shared, &refs, scans_tx);
    transport
        .send(&mut conn, &pair_device_stanza("pd-1", &refs))
        .await?;
    Stats::bump(&shared.stats.pair_devices_sent);

    let mut pending: Option<PendingPair> = None;
    loop {
        match next_input(&mut conn, &mut scans).await? {
            Input::Scan(Scan { qr, reply }) => {
                let refused = if qr.noise_public != client_static {
                    Some(ScanError::Mismatch("noise key"))
                } else if identity.is_some_and(|i| i != qr.identity_public) {
                    Some(ScanError::Mismatch("identity key"))
                } else if pending.is_some() {
                    Some(ScanError::Mismatch("already scanned"))
                } else {
                    None
                };
                if let Some(refused) = refused {
                    let _ = reply.send(Err(refused));
                    continue;
                }
                let account = Account::new(shared.accounts.fetch_add(1, Ordering::Relaxed));
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
                        continue;
                    }
                };
                transport
                    .send_node(&mut conn, &pair_success(identity, &device))
                    .await?;
                Stats::bump(&shared.stats.pair_successes_sent);
                pending = Some(PendingPair {
                    account,
                    device,
                    qr,
                    reply,
                });
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
                    && let Some(pair) = pending.take()
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
