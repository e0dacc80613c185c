//! A fake WhatsApp chat server on loopback, owned by the project, that brings a real client (with
//! `danger-skip-cert-chain-verify`) to "waiting for a QR scan".
//!
//! It follows `shared/notes/fake-whatsapp-protocol.md`: plain WebSocket, WA intro header, 3-byte
//! length-prefixed frames, a Noise XX handshake as responder with a fixed server static key and a
//! cert chain under a fake root, then one `<iq type="set"><pair-device>` with six `<ref>`s. After
//! that it answers every client `iq` of type `get`/`set` with an empty result, so clients stay
//! parked on the QR screen until their refs run out.
//!
//! Written from the protocol note, not from the upstream tests. The Noise symmetric state
//! (MixHash, MixKey, AES-GCM, Split) and X25519 come from `wacore-noise`/`wacore-libsignal`; the
//! framing, handshake sequence, protobuf messages, cert chain and binary nodes are built here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_websockets::{Message, ServerBuilder, WebSocketStream};
use wacore_libsignal::core::curve::PrivateKey;
use wacore_noise::{NoiseCipher, NoiseHandshake};

/// `"WA"`, protocol 6, binary-dictionary version 3.
pub const WA_HEADER: [u8; 4] = [0x57, 0x41, 0x06, 0x03];
const NOISE_XX: &str = "Noise_XX_25519_AESGCM_SHA256\0\0\0\0";
/// Private key of the server's static Noise key pair (the cert chain's leaf key).
const SERVER_STATIC_PRIVATE: [u8; 32] = [0x43; 32];
const INTERMEDIATE_PRIVATE: [u8; 32] = [0x42; 32];
const NOT_BEFORE: u64 = 1_700_000_000;
const NOT_AFTER: u64 = 2_000_000_000;
/// QR refs per `pair-device`, as the real server sends.
pub const REFS_PER_PAIRING: usize = 6;

/// Counters of what the fake saw, for assertions.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// Connections that completed the Noise handshake.
    pub handshakes: AtomicU64,
    /// `pair-device` stanzas sent.
    pub pair_devices_sent: AtomicU64,
    /// Client `iq`s of type `result` (the acks of `pair-device`).
    pub acks: AtomicU64,
    /// Client `iq`s of type `get`/`set` answered (keepalive pings and the like).
    pub iqs_answered: AtomicU64,
    /// Connections that ended with an error other than the client hanging up.
    pub errors: AtomicU64,
}

/// The running fake. Stops accepting when dropped.
pub struct FakeWhatsapp {
    addr: SocketAddr,
    stats: Arc<Stats>,
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
        let stats = Arc::new(Stats::default());
        let server = Arc::new(ServerKeys::new());
        let accept_stats = Arc::clone(&stats);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = accept_stats.connections.fetch_add(1, Ordering::Relaxed);
                let stats = Arc::clone(&accept_stats);
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    if let Err(err) = serve(stream, n, &server, &stats).await
                        && err.to_string() != CLIENT_CLOSED
                    {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("fake whatsapp: connection {n}: {err}");
                    }
                });
            }
        });
        Ok(FakeWhatsapp {
            addr,
            stats,
            accept,
        })
    }

    /// The URL to give the client's transport.
    pub fn url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The refs the fake sends on connection `connection` (0-based, in accept order).
    pub fn refs(connection: u64) -> Vec<String> {
        (0..REFS_PER_PAIRING)
            .map(|i| format!("2@FAKE-REF-{connection}-{i}"))
            .collect()
    }
}

/// The fixed server static key and the cert chain vouching for it.
struct ServerKeys {
    static_private: PrivateKey,
    static_public: [u8; 32],
    cert_chain: Vec<u8>,
}

impl ServerKeys {
    fn new() -> Self {
        let static_private =
            PrivateKey::deserialize(&SERVER_STATIC_PRIVATE).expect("valid static key");
        let static_public = public_bytes(&static_private);
        let intermediate_public = public_bytes(
            &PrivateKey::deserialize(&INTERMEDIATE_PRIVATE).expect("valid intermediate key"),
        );
        // Signatures are not checked by a client built with `danger-skip-cert-chain-verify`;
        // they only have to be present (64 bytes).
        let intermediate = cert(&cert_details(1, 0, &intermediate_public), &[0x11; 64]);
        let leaf = cert(&cert_details(2, 1, &static_public), &[0x22; 64]);
        let mut cert_chain = Vec::new();
        pb_bytes(&mut cert_chain, 1, &leaf);
        pb_bytes(&mut cert_chain, 2, &intermediate);
        ServerKeys {
            static_private,
            static_public,
            cert_chain,
        }
    }
}

fn public_bytes(private: &PrivateKey) -> [u8; 32] {
    private
        .public_key()
        .expect("public key")
        .public_key_bytes()
        .try_into()
        .expect("32-byte X25519 public key")
}

fn cert_details(serial: u64, issuer_serial: u64, key: &[u8]) -> Vec<u8> {
    let mut details = Vec::new();
    pb_varint_field(&mut details, 1, serial);
    pb_varint_field(&mut details, 2, issuer_serial);
    pb_bytes(&mut details, 3, key);
    pb_varint_field(&mut details, 4, NOT_BEFORE);
    pb_varint_field(&mut details, 5, NOT_AFTER);
    details
}

fn cert(details: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut cert = Vec::new();
    pb_bytes(&mut cert, 1, details);
    pb_bytes(&mut cert, 2, signature);
    cert
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a connection ends when the client hangs up: normal, not a protocol error.
const CLIENT_CLOSED: &str = "client closed the connection";

fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}

/// One client connection: WebSocket payloads read as one byte stream, split into WA frames.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn fill(&mut self) -> Result<(), BoxError> {
        loop {
            let msg = self.ws.next().await.ok_or_else(|| err(CLIENT_CLOSED))??;
            if msg.is_close() {
                return Err(err(CLIENT_CLOSED));
            }
            if msg.is_binary() {
                self.buf.extend_from_slice(&msg.into_payload());
                return Ok(());
            }
        }
    }

    async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, BoxError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, BoxError> {
        let len = self.read_exact(3).await?;
        let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
        self.read_exact(len).await
    }

    async fn write_frame(&mut self, payload: &[u8]) -> Result<(), BoxError> {
        let len = u32::try_from(payload.len())?;
        if len >= 1 << 24 {
            return Err(err("frame too long"));
        }
        let mut frame = Vec::with_capacity(3 + payload.len());
        frame.extend_from_slice(&len.to_be_bytes()[1..]);
        frame.extend_from_slice(payload);
        self.ws.send(Message::binary(frame)).await?;
        Ok(())
    }
}

async fn serve(
    stream: TcpStream,
    n: u64,
    keys: &ServerKeys,
    stats: &Stats,
) -> Result<(), BoxError> {
    stream.set_nodelay(true)?;
    let (_request, ws) = ServerBuilder::new().accept(stream).await?;
    let mut conn = Conn {
        ws,
        buf: Vec::new(),
    };

    // Intro: optional edge-routing preamble, then the WA header.
    let mut intro = conn.read_exact(4).await?;
    if intro[..2] == *b"ED" {
        let len = conn.read_exact(3).await?;
        let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
        conn.read_exact(len).await?;
        intro = conn.read_exact(4).await?;
    }
    if intro != WA_HEADER {
        return Err(err(format!("unexpected intro {intro:02x?}")));
    }

    // ClientHello.
    let hello = conn.read_frame().await?;
    let client_hello = pb_field(&hello, 2).ok_or_else(|| err("no clientHello"))?;
    let client_ephemeral = pb_field(client_hello, 1).ok_or_else(|| err("no ephemeral"))?;
    if client_ephemeral.len() != 32 || pb_field(client_hello, 2).is_some() {
        return Err(err(
            "not a fresh XX ClientHello (IK resume is not supported)",
        ));
    }

    let mut noise = NoiseHandshake::new(NOISE_XX, &WA_HEADER)?;
    noise.authenticate(client_ephemeral);
    let ephemeral_private = PrivateKey::deserialize(&rand::random::<[u8; 32]>())?;
    let ephemeral_public = public_bytes(&ephemeral_private);
    noise.authenticate(&ephemeral_public);
    noise.mix_shared_secret(ephemeral_private.serialize(), client_ephemeral)?;
    let static_ct = noise.encrypt(&keys.static_public)?;
    noise.mix_shared_secret(keys.static_private.serialize(), client_ephemeral)?;
    let cert_ct = noise.encrypt(&keys.cert_chain)?;
    let mut server_hello = Vec::new();
    pb_bytes(&mut server_hello, 1, &ephemeral_public);
    pb_bytes(&mut server_hello, 2, &static_ct);
    pb_bytes(&mut server_hello, 3, &cert_ct);
    let mut message = Vec::new();
    pb_bytes(&mut message, 3, &server_hello);
    conn.write_frame(&message).await?;

    // ClientFinish.
    let finish = conn.read_frame().await?;
    let client_finish = pb_field(&finish, 4).ok_or_else(|| err("no clientFinish"))?;
    let static_ct = pb_field(client_finish, 1).ok_or_else(|| err("no client static"))?;
    let payload_ct = pb_field(client_finish, 2).ok_or_else(|| err("no client payload"))?;
    let client_static = noise.decrypt(static_ct)?;
    noise.mix_shared_secret(ephemeral_private.serialize(), &client_static)?;
    let _client_payload = noise.decrypt(payload_ct)?;
    // Split: the first key is client->server, the second server->client. `finish` names them
    // from the initiator's side (write, read).
    let (client_to_server, server_to_client) = noise.finish()?;
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    let mut transport = Transport {
        read: client_to_server,
        write: server_to_client,
        read_counter: 0,
        write_counter: 0,
    };

    let pair_device = pair_device_stanza("pd-1", &FakeWhatsapp::refs(n));
    transport.send(&mut conn, &pair_device).await?;
    stats.pair_devices_sent.fetch_add(1, Ordering::Relaxed);

    loop {
        let plain = transport.recv(&mut conn).await?;
        let Some((&flag, body)) = plain.split_first() else {
            return Err(err("empty transport frame"));
        };
        if flag & 0x02 != 0 {
            // Compressed stanzas are not needed to park a client on the QR screen.
            continue;
        }
        let node = match Decoder::new(body).node() {
            Ok(node) => node,
            Err(e) => {
                eprintln!("fake whatsapp: connection {n}: undecodable stanza: {e}");
                continue;
            }
        };
        if node.tag != Str::Token(TOKEN_IQ) {
            continue;
        }
        let Some(Str::Token(kind)) = node.attr(TOKEN_TYPE) else {
            continue;
        };
        match *kind {
            TOKEN_RESULT => {
                stats.acks.fetch_add(1, Ordering::Relaxed);
            }
            TOKEN_GET | TOKEN_SET => {
                let id = node
                    .attr(TOKEN_ID)
                    .cloned()
                    .unwrap_or(Str::Bytes(Vec::new()));
                transport.send(&mut conn, &iq_result(&id)).await?;
                stats.iqs_answered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Noise transport mode: each direction has its own key and counter; `aad` is empty.
struct Transport {
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
}

impl Transport {
    async fn send(&mut self, conn: &mut Conn, plaintext: &[u8]) -> Result<(), BoxError> {
        let ct = self
            .write
            .encrypt_with_counter(self.write_counter, plaintext)?;
        self.write_counter += 1;
        conn.write_frame(&ct).await
    }

    async fn recv(&mut self, conn: &mut Conn) -> Result<Vec<u8>, BoxError> {
        let mut frame = conn.read_frame().await?;
        self.read
            .decrypt_in_place_with_counter(self.read_counter, &mut frame)?;
        self.read_counter += 1;
        Ok(frame)
    }
}

// ---- protobuf (proto2 wire format, only what the handshake needs) ----

fn pb_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn pb_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    pb_varint(out, field << 3);
    pb_varint(out, value);
}

fn pb_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    pb_varint(out, field << 3 | 2);
    pb_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The first length-delimited field `field` of a message.
pub fn pb_field(buf: &[u8], field: u64) -> Option<&[u8]> {
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        match key & 7 {
            0 => {
                read_varint(buf, &mut pos)?;
            }
            1 => pos += 8,
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                let value = buf.get(pos..end)?;
                if key >> 3 == field {
                    return Some(value);
                }
                pos = end;
            }
            5 => pos += 4,
            _ => return None,
        }
    }
    None
}

// ---- WA binary nodes ----

const LIST_EMPTY: u8 = 0x00;
const LIST_8: u8 = 0xf8;
const LIST_16: u8 = 0xf9;
const JID_PAIR: u8 = 0xfa;
const HEX_8: u8 = 0xfb;
const BINARY_8: u8 = 0xfc;
const BINARY_20: u8 = 0xfd;
const BINARY_32: u8 = 0xfe;
const NIBBLE_8: u8 = 0xff;
const AD_JID: u8 = 0xf7;
const DICTIONARY_0: u8 = 0xec;
const DICTIONARY_3: u8 = 0xef;

const TOKEN_S_WHATSAPP_NET: u8 = 0x03;
const TOKEN_TYPE: u8 = 0x04;
const TOKEN_FROM: u8 = 0x06;
const TOKEN_ID: u8 = 0x08;
const TOKEN_RESULT: u8 = 0x14;
const TOKEN_XMLNS: u8 = 0x16;
const TOKEN_IQ: u8 = 0x19;
const TOKEN_GET: u8 = 0x29;
const TOKEN_SET: u8 = 0x5a;
/// `pair-device` and `ref` are in double-byte dictionary 1.
const DICTIONARY_1: u8 = 0xed;
const DICT1_PAIR_DEVICE: u8 = 0xee;
const DICT1_REF: u8 = 0x50;

fn binary(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u8::try_from(bytes.len()).expect("short strings only");
    out.push(BINARY_8);
    out.push(len);
    out.extend_from_slice(bytes);
}

/// `00` + `<iq from="s.whatsapp.net" type="set" id=.. xmlns="md"><pair-device><ref>..</ref>..`.
pub fn pair_device_stanza(id: &str, refs: &[String]) -> Vec<u8> {
    let mut out = vec![0x00, LIST_8, 10, TOKEN_IQ];
    out.extend_from_slice(&[
        TOKEN_FROM,
        TOKEN_S_WHATSAPP_NET,
        TOKEN_TYPE,
        TOKEN_SET,
        TOKEN_ID,
    ]);
    binary(&mut out, id.as_bytes());
    out.push(TOKEN_XMLNS);
    binary(&mut out, b"md");
    out.extend_from_slice(&[LIST_8, 1]);
    out.extend_from_slice(&[LIST_8, 2, DICTIONARY_1, DICT1_PAIR_DEVICE]);
    out.extend_from_slice(&[LIST_8, u8::try_from(refs.len()).expect("few refs")]);
    for r in refs {
        out.extend_from_slice(&[LIST_8, 2, DICTIONARY_1, DICT1_REF]);
        binary(&mut out, r.as_bytes());
    }
    out
}

/// `00` + `<iq from="s.whatsapp.net" type="result" id=../>`.
fn iq_result(id: &Str) -> Vec<u8> {
    let mut out = vec![0x00, LIST_8, 7, TOKEN_IQ];
    out.extend_from_slice(&[
        TOKEN_FROM,
        TOKEN_S_WHATSAPP_NET,
        TOKEN_TYPE,
        TOKEN_RESULT,
        TOKEN_ID,
    ]);
    match id {
        Str::Token(t) => out.push(*t),
        Str::Dict(d, i) => out.extend_from_slice(&[*d, *i]),
        Str::Bytes(b) => binary(&mut out, b),
    }
    out
}

/// A string in a binary node, undecoded: the fake only compares tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Str {
    Token(u8),
    Dict(u8, u8),
    Bytes(Vec<u8>),
}

#[derive(Debug)]
struct Node {
    tag: Str,
    attrs: Vec<(Str, Str)>,
}

impl Node {
    fn attr(&self, token: u8) -> Option<&Str> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == Str::Token(token))
            .map(|(_, v)| v)
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.pos).ok_or("truncated node")?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("overflow")?;
        let s = self.buf.get(self.pos..end).ok_or("truncated node")?;
        self.pos = end;
        Ok(s)
    }

    fn list_size(&mut self, tag: u8) -> Result<usize, String> {
        match tag {
            LIST_EMPTY => Ok(0),
            LIST_8 => Ok(usize::from(self.byte()?)),
            LIST_16 => Ok(usize::from(self.byte()?) << 8 | usize::from(self.byte()?)),
            other => Err(format!("expected a list, got {other:#04x}")),
        }
    }

    /// Reads a node; its content (children or bytes) is skipped.
    fn node(&mut self) -> Result<Node, String> {
        let first = self.byte()?;
        let size = self.list_size(first)?;
        if size == 0 {
            return Err("empty node".into());
        }
        let tag = self.string()?;
        let mut attrs = Vec::new();
        for _ in 0..(size - 1) / 2 {
            let key = self.string()?;
            let value = self.string()?;
            attrs.push((key, value));
        }
        Ok(Node { tag, attrs })
    }

    fn string(&mut self) -> Result<Str, String> {
        let tag = self.byte()?;
        Ok(match tag {
            DICTIONARY_0..=DICTIONARY_3 => Str::Dict(tag, self.byte()?),
            BINARY_8 => {
                let n = usize::from(self.byte()?);
                Str::Bytes(self.take(n)?.to_vec())
            }
            BINARY_20 => {
                let b = self.take(3)?;
                let n =
                    (usize::from(b[0] & 0x0f) << 16) | usize::from(b[1]) << 8 | usize::from(b[2]);
                Str::Bytes(self.take(n)?.to_vec())
            }
            BINARY_32 => {
                let b = self.take(4)?;
                let n = usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .map_err(|e| e.to_string())?;
                Str::Bytes(self.take(n)?.to_vec())
            }
            NIBBLE_8 | HEX_8 => {
                let start = self.byte()?;
                let n = usize::from(start & 0x7f);
                Str::Bytes(self.take(n)?.to_vec())
            }
            JID_PAIR => {
                let _user = self.string_or_empty()?;
                let _server = self.string()?;
                Str::Bytes(b"jid".to_vec())
            }
            AD_JID => {
                self.take(2)?;
                let _user = self.string()?;
                Str::Bytes(b"ad-jid".to_vec())
            }
            LIST_EMPTY => Str::Bytes(Vec::new()),
            token if token < DICTIONARY_0 => Str::Token(token),
            other => return Err(format!("unsupported string tag {other:#04x}")),
        })
    }

    fn string_or_empty(&mut self) -> Result<Str, String> {
        self.string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_device_matches_the_note_byte_for_byte() {
        let stanza = pair_device_stanza("pd-1", &FakeWhatsapp::refs(0));
        assert_eq!(stanza.len(), 148);
        let head = [
            0x00, 0xf8, 0x0a, 0x19, 0x06, 0x03, 0x04, 0x5a, 0x08, 0xfc, 0x04, b'p', b'd', b'-',
            b'1', 0x16, 0xfc, 0x02, b'm', b'd', 0xf8, 0x01, 0xf8, 0x02, 0xed, 0xee, 0xf8, 0x06,
        ];
        assert_eq!(stanza[..head.len()], head);
        let first_ref = [0xf8, 0x02, 0xed, 0x50, 0xfc, 0x0e];
        assert_eq!(stanza[head.len()..head.len() + 6], first_ref);
        assert_eq!(&stanza[head.len() + 6..head.len() + 20], b"2@FAKE-REF-0-0");
    }

    #[test]
    fn decoder_reads_an_iq_ack() {
        // <iq to="s.whatsapp.net" type="result" id="pd-1"/>
        let ack = [
            0xf8, 0x07, 0x19, 0x11, 0x03, 0x04, 0x14, 0x08, 0xfc, 0x04, b'p', b'd', b'-', b'1',
        ];
        let node = Decoder::new(&ack).node().unwrap();
        assert_eq!(node.tag, Str::Token(TOKEN_IQ));
        assert_eq!(node.attr(TOKEN_TYPE), Some(&Str::Token(TOKEN_RESULT)));
        assert_eq!(node.attr(TOKEN_ID), Some(&Str::Bytes(b"pd-1".to_vec())));
        let reply = iq_result(node.attr(TOKEN_ID).unwrap());
        assert_eq!(
            reply,
            [
                0x00, 0xf8, 0x07, 0x19, 0x06, 0x03, 0x04, 0x14, 0x08, 0xfc, 0x04, b'p', b'd', b'-',
                b'1'
            ]
        );
    }

    #[test]
    fn protobuf_fields_round_trip() {
        let mut inner = Vec::new();
        pb_bytes(&mut inner, 1, &[7; 32]);
        let mut outer = Vec::new();
        pb_varint_field(&mut outer, 1, 300);
        pb_bytes(&mut outer, 2, &inner);
        assert_eq!(
            pb_field(pb_field(&outer, 2).unwrap(), 1),
            Some(&[7u8; 32][..])
        );
        assert_eq!(pb_field(&outer, 3), None);
    }
}
