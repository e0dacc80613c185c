//! A fake WhatsApp chat server on loopback, owned by the project, that brings a real client (with
//! `danger-skip-cert-chain-verify`) to "waiting for a QR scan" and, when a test scans the QR
//! code, plays the phone too and takes the client all the way to a logged-in session.
//!
//! It follows `shared/notes/fake-whatsapp-protocol.md`: plain WebSocket, WA intro header, 3-byte
//! length-prefixed frames, a Noise XX handshake as responder with a fixed server static key and a
//! cert chain under a fake root, then one `<iq type="set"><pair-device>` with six `<ref>`s. After
//! that it answers every client `iq` of type `get`/`set` with an empty result, so clients stay
//! parked on the QR screen until their refs run out.
//!
//! Pairing ([`FakeWhatsapp::scan`], given the code of a QR the client showed):
//! 1. the fake checks the code against the connection that shows its ref (noise key = the
//!    client's Noise static key, identity key = the one in its registration payload);
//! 2. it sends `<iq type="set"><pair-success>` with a `<device-identity>` signed by a fake
//!    account key and authenticated with the adv secret of the code (see [`phone`]), the
//!    device's JID and LID, and a platform;
//! 3. the client verifies it and answers with `<pair-device-sign>`, its own signature over the
//!    identity, which the fake verifies; then the fake ends the stream with
//!    `<stream:error code="515"/>` ("restart required"), as the real server does;
//! 4. the client reconnects as a paired device (Noise XX again, with a login `ClientPayload`
//!    carrying its phone number and device); the fake checks that the Noise key is the paired
//!    one and sends `<success>`. Later reconnects of the device use Noise IK (the client caches
//!    the server's static key at its first login), which the fake also answers;
//! 5. it then answers the client's start-up IQs: the `passive`/`active` IQ (followed by
//!    `<ib><offline count="0"/></ib>`, which ends offline delivery), app-state syncs (every
//!    requested collection comes back empty), and empty results for the rest (pre-key upload,
//!    props, blocklist, privacy, digest, usync, pings). After the critical app-state collections
//!    are synced the client emits `Connected`, then syncs the regular collections, which the fake
//!    counts in [`Stats::post_connect_syncs`]. A client's logout (`remove-companion-device`)
//!    unlinks the device: its next login gets `<failure reason="401"/>`.
//!
//! Linking by pairing code (the client's `link_code_companion_reg` flow, see [`link_code`]):
//! 1. a fresh client that was asked for a pairing code sends `companion_hello` for a phone number;
//!    the fake answers with a pairing ref, so the client emits `PairingCode`, and records the
//!    request ([`FakeWhatsapp::pairing_code_requests`]). The code only travels wrapped (it keys
//!    the wrapping), so the fake learns it when the phone types it;
//! 2. [`FakeWhatsapp::enter_pairing_code`] plays the person typing the code on the phone: the fake
//!    unwraps the client's ephemeral key with it and sends `primary_hello`; the client answers with
//!    `companion_finish`, a key bundle that opens only if the typed code is the client's. Then it
//!    is step 2 of the QR pairing above, with the adv secret both sides derived from the bundle
//!    and the account under the requested phone number;
//! 3. [`FakeWhatsapp::refuse_pairing_codes`] makes it answer `companion_hello` with an error, and
//!    [`FakeWhatsapp::refresh_pairing_code`] tells the client to replace its code
//!    (`refresh_code`).
//!
//! Written from the protocol note and the client's sources, not from the upstream tests. The
//! Noise symmetric state (MixHash, MixKey, AES-GCM, Split), X25519/XEdDSA, the binary-node codec
//! and the protobuf messages of pairing come from the client's own crates (`wacore-noise`,
//! `wacore-libsignal`, `wacore-binary`, `waproto`); the framing, the handshake sequence, the cert
//! chain and the server's side of the conversation are written here.

mod conn;
mod handshake;
mod link_code;
mod phone;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use phone::{PairedDevice, QrCode};
pub use wire::{WA_HEADER, pair_device_stanza, pb_field};

/// QR refs per `pair-device`, as the real server sends.
pub const REFS_PER_PAIRING: usize = 6;
/// How long [`FakeWhatsapp::scan`] waits for the client to answer `pair-success`.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`FakeWhatsapp::enter_pairing_code`] waits for the client to answer: longer than a
/// scan, since both sides run PBKDF2 (2^17 rounds) on the code, slow in debug builds.
pub const CODE_ENTRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Counters of what the fake saw, for assertions.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Connections that completed the Noise handshake.
    pub handshakes: AtomicU64,
    /// Of those, Noise IK handshakes (a paired device resuming with the cached server key).
    pub ik_handshakes: AtomicU64,
    /// `pair-device` stanzas sent.
    pub pair_devices_sent: AtomicU64,
    /// Client `iq`s of type `result` (the acks of `pair-device`), other than `pair-device-sign`.
    pub acks: AtomicU64,
    /// Client `iq`s of type `get`/`set` answered (keepalive pings and the like).
    pub iqs_answered: AtomicU64,
    /// Connections that ended with an error other than the client hanging up.
    pub errors: AtomicU64,
    /// `pair-success` stanzas sent (one per accepted scan).
    pub pair_successes_sent: AtomicU64,
    /// `pair-success` stanzas the client accepted: it answered with a `pair-device-sign` whose
    /// signatures verify.
    pub pair_successes: AtomicU64,
    /// `pair-success` stanzas the client refused (an `iq` of type `error`).
    pub pair_errors: AtomicU64,
    /// Connections of paired devices answered with `<success>`.
    pub logins: AtomicU64,
    /// Logins refused with `<failure>` (unknown device or wrong Noise key).
    pub login_failures: AtomicU64,
    /// Devices unlinked by their own logout (`remove-companion-device`); they can no longer log in.
    pub logouts: AtomicU64,
    /// Logged-in connections the fake closed ([`FakeWhatsapp::drop_logged_in_connections`]).
    pub connections_dropped: AtomicU64,
    /// `companion_hello` requests (a client asking for a pairing code).
    pub pairing_code_requests: AtomicU64,
    /// Of those, the ones refused ([`FakeWhatsapp::refuse_pairing_codes`]).
    pub pairing_code_refusals: AtomicU64,
    /// `refresh_code` notifications sent ([`FakeWhatsapp::refresh_pairing_code`]).
    pub code_refreshes_sent: AtomicU64,
    /// `primary_hello` notifications sent (a code typed on the phone).
    pub primary_hellos_sent: AtomicU64,
    /// `companion_finish` key bundles that opened with the typed code.
    pub key_bundles_opened: AtomicU64,
    /// `companion_finish` key bundles that did not open (the typed code was not the client's).
    pub key_bundle_failures: AtomicU64,
    /// App-state sync IQs answered.
    pub app_state_syncs: AtomicU64,
    /// App-state syncs of the regular collections: the client starts them right after it emits
    /// `Connected`, so they show that the client got there.
    pub post_connect_syncs: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a scan did not pair the client.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("not a WhatsApp QR code: {0}")]
    BadCode(String),
    #[error("no connection is showing ref {0}")]
    UnknownRef(String),
    #[error("no client asked for a pairing code for {0}")]
    NoPairingCodeRequest(String),
    #[error("the code does not match the connection that shows its ref: {0}")]
    Mismatch(&'static str),
    #[error("the client refused pair-success: {0}")]
    Refused(String),
    #[error("the connection ended before the client answered")]
    ConnectionGone,
    #[error("the client did not answer within {0:?}")]
    Timeout(Duration),
}

/// What the phone does to link a companion.
enum Link {
    /// Scans the QR code.
    Qr(QrCode),
    /// Types the pairing code.
    Code(String),
}

/// A scan (or a typed code) handed to the connection that shows the ref.
struct Scan {
    link: Link,
    reply: oneshot::Sender<Result<PairedDevice, ScanError>>,
}

/// What the phone (or the server on its behalf) does to a waiting connection.
enum Phone {
    Scan(Scan),
    /// Tells the client to replace its pairing code (`refresh_code`).
    RefreshCode(oneshot::Sender<Result<(), ScanError>>),
}

/// A client's request for a pairing code (`companion_hello`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCodeRequest {
    /// The phone number the client links to, digits only.
    pub phone_number: String,
    /// The pairing ref the fake answered with (empty if it refused the request).
    pub pairing_ref: String,
    /// The connection (0-based, in accept order) that asked.
    pub connection: u64,
    /// The code typed on the phone whose key bundle opened: the client's code. `None` until then.
    pub code: Option<String>,
}

/// State shared by the accept loop, the connections and the test.
struct Shared {
    stats: Stats,
    keys: handshake::ServerKeys,
    /// Connections waiting for a scan, by the refs they handed out.
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<Phone>>>,
    /// Paired devices, by (phone, device).
    devices: Mutex<HashMap<(u64, u32), PairedDevice>>,
    /// Pairing-code requests, in order.
    code_requests: Mutex<Vec<PairingCodeRequest>>,
    /// When set, `companion_hello` is answered with `<error code=.. text=..>`.
    code_refusal: Mutex<Option<(u16, String)>>,
    /// Accounts created so far (one per accepted scan).
    accounts: AtomicU64,
    /// Bumped to make every logged-in connection close.
    drops: tokio::sync::watch::Sender<u64>,
}

/// The running fake. Stops accepting when dropped.
pub struct FakeWhatsapp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FakeWhatsapp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeWhatsapp {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            keys: handshake::ServerKeys::new(),
            waiting: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            code_requests: Mutex::new(Vec::new()),
            code_refusal: Mutex::new(None),
            accounts: AtomicU64::new(0),
            drops: tokio::sync::watch::Sender::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = accept_shared
                    .stats
                    .connections
                    .fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&accept_shared);
                tokio::spawn(async move {
                    if let Err(err) = conn::serve(stream, n, &shared).await
                        && err.to_string() != CLIENT_CLOSED
                    {
                        Stats::bump(&shared.stats.errors);
                        eprintln!("fake whatsapp: connection {n}: {err}");
                    }
                });
            }
        });
        Ok(FakeWhatsapp {
            addr,
            shared,
            accept,
        })
    }

    /// The URL to give the client's transport.
    pub fn url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The refs the fake sends on connection `connection` (0-based, in accept order).
    pub fn refs(connection: u64) -> Vec<String> {
        (0..REFS_PER_PAIRING)
            .map(|i| format!("2@FAKE-REF-{connection}-{i}"))
            .collect()
    }

    /// Scans a QR code the client showed, as the phone of a new account: sends `pair-success` to
    /// the connection that shows the code's ref and waits until the client has signed the device
    /// identity (the fake then restarts its stream with a 515, and the client logs in on its own).
    pub async fn scan(&self, code: &str) -> Result<PairedDevice, ScanError> {
        let qr = QrCode::parse(code).map_err(ScanError::BadCode)?;
        let connection = self
            .shared
            .waiting
            .lock()
            .expect("waiting map")
            .get(&qr.reference)
            .cloned()
            .ok_or_else(|| ScanError::UnknownRef(qr.reference.clone()))?;
        let (reply, replied) = oneshot::channel();
        connection
            .send(Phone::Scan(Scan {
                link: Link::Qr(qr),
                reply,
            }))
            .map_err(|_| ScanError::ConnectionGone)?;
        match tokio::time::timeout(SCAN_TIMEOUT, replied).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ScanError::ConnectionGone),
            Err(_) => Err(ScanError::Timeout(SCAN_TIMEOUT)),
        }
    }

    /// The pairing codes clients asked for, in order, with the code once the phone typed it.
    pub fn pairing_code_requests(&self) -> Vec<PairingCodeRequest> {
        self.shared
            .code_requests
            .lock()
            .expect("code requests")
            .clone()
    }

    /// From now on, answers every `companion_hello` with `<error code=.. text=..>` (the real
    /// server answers `429 rate-overlimit`, `400 bad-request`, ...), or again with a pairing ref
    /// after `None`.
    pub fn refuse_pairing_codes(&self, refusal: Option<(u16, &str)>) {
        *self.shared.code_refusal.lock().expect("code refusal") =
            refusal.map(|(code, text)| (code, text.to_owned()));
    }

    /// Types `code` on the phone of `phone_number` ("link with phone number instead"): the fake
    /// sends `primary_hello` to the client that last asked for a code for that number, and waits
    /// until the client has sent its key bundle, the bundle opened with `code`, and the client
    /// signed the device identity of the `pair-success` that followed (then the client restarts
    /// and logs in, as after a scan). A wrong code fails with [`ScanError::Refused`] and leaves the
    /// client's code valid (the phone may try again; the client allows three attempts).
    pub async fn enter_pairing_code(
        &self,
        phone_number: &str,
        code: &str,
    ) -> Result<PairedDevice, ScanError> {
        let connection = self.code_connection(phone_number)?;
        let (reply, replied) = oneshot::channel();
        connection
            .send(Phone::Scan(Scan {
                link: Link::Code(code.to_owned()),
                reply,
            }))
            .map_err(|_| ScanError::ConnectionGone)?;
        match tokio::time::timeout(CODE_ENTRY_TIMEOUT, replied).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ScanError::ConnectionGone),
            Err(_) => Err(ScanError::Timeout(CODE_ENTRY_TIMEOUT)),
        }
    }

    /// Tells the client that last asked for a code for `phone_number` to replace it
    /// (`<notification type="link_code_companion_reg"><link_code_companion_reg
    /// stage="refresh_code">`, as the server does): the client drops its code and emits
    /// `PairingCodeRefresh`; a new code comes only if it asks again.
    pub async fn refresh_pairing_code(&self, phone_number: &str) -> Result<(), ScanError> {
        let connection = self.code_connection(phone_number)?;
        let (reply, replied) = oneshot::channel();
        connection
            .send(Phone::RefreshCode(reply))
            .map_err(|_| ScanError::ConnectionGone)?;
        replied.await.map_err(|_| ScanError::ConnectionGone)?
    }

    /// The connection of the latest answered pairing-code request for a phone number.
    fn code_connection(
        &self,
        phone_number: &str,
    ) -> Result<mpsc::UnboundedSender<Phone>, ScanError> {
        let phone: String = phone_number.chars().filter(char::is_ascii_digit).collect();
        let reference = self
            .shared
            .code_requests
            .lock()
            .expect("code requests")
            .iter()
            .rev()
            .find(|r| r.phone_number == phone && !r.pairing_ref.is_empty())
            .map(|r| r.pairing_ref.clone())
            .ok_or(ScanError::NoPairingCodeRequest(phone))?;
        self.shared
            .waiting
            .lock()
            .expect("waiting map")
            .get(&reference)
            .cloned()
            .ok_or(ScanError::UnknownRef(reference))
    }

    /// Closes every logged-in connection, as when the server goes away: the clients reconnect on
    /// their own (with Noise IK, since they cached the server's key at login).
    pub fn drop_logged_in_connections(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    /// The devices paired so far.
    pub fn paired_devices(&self) -> Vec<PairedDevice> {
        let mut devices: Vec<_> = self
            .shared
            .devices
            .lock()
            .expect("devices map")
            .values()
            .cloned()
            .collect();
        devices.sort_by_key(|d| (d.phone, d.device));
        devices
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a connection ends when the client hangs up: normal, not a protocol error.
const CLIENT_CLOSED: &str = "client closed the connection";

fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}
