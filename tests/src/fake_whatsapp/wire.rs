//! Bytes on the wire: WebSocket payloads as one stream of 3-byte length-prefixed WA frames, the
//! Noise transport ciphers, a little proto2 wire format, and WA binary nodes.
//!
//! Binary nodes are encoded and decoded with `wacore-binary` (the client's own codec), except for
//! `pair-device`, which is written byte by byte as the protocol note shows it so that the note
//! stays checked.

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_websockets::{Message, WebSocketStream};
use wacore_binary::Node;
use wacore_binary::builder::NodeBuilder;
use wacore_noise::NoiseCipher;

use super::{BoxError, CLIENT_CLOSED, err};

/// `"WA"`, protocol 6, binary-dictionary version 3.
pub const WA_HEADER: [u8; 4] = [0x57, 0x41, 0x06, 0x03];
/// The server JID, as the `from` of every server stanza.
pub const SERVER: &str = "s.whatsapp.net";

/// One client connection: WebSocket payloads read as one byte stream, split into WA frames.
pub(super) struct Conn {
    ws: WebSocketStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    pub(super) fn new(ws: WebSocketStream<TcpStream>) -> Self {
        Conn {
            ws,
            buf: Vec::new(),
        }
    }

    /// Waits for the next binary WebSocket payload and appends it to the buffer. Cancel-safe:
    /// nothing is lost when the future is dropped.
    pub(super) async fn fill(&mut self) -> Result<(), BoxError> {
        loop {
            let msg = self
                .ws
                .next()
                .await
                .ok_or_else(|| err(CLIENT_CLOSED))?
                .map_err(ws_error)?;
            if msg.is_close() {
                return Err(err(CLIENT_CLOSED));
            }
            if msg.is_binary() {
                self.buf.extend_from_slice(&msg.into_payload());
                return Ok(());
            }
        }
    }

    pub(super) async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, BoxError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A whole frame if the buffer holds one.
    pub(super) fn take_frame(&mut self) -> Option<Vec<u8>> {
        let len = be24(self.buf.get(..3)?);
        if self.buf.len() < 3 + len {
            return None;
        }
        let frame = self.buf[3..3 + len].to_vec();
        self.buf.drain(..3 + len);
        Some(frame)
    }

    pub(super) async fn read_frame(&mut self) -> Result<Vec<u8>, BoxError> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    pub(super) async fn write_frame(&mut self, payload: &[u8]) -> Result<(), BoxError> {
        let len = u32::try_from(payload.len())?;
        if len >= 1 << 24 {
            return Err(err("frame too long"));
        }
        let mut frame = Vec::with_capacity(3 + payload.len());
        frame.extend_from_slice(&len.to_be_bytes()[1..]);
        frame.extend_from_slice(payload);
        self.ws.send(Message::binary(frame)).await.map_err(ws_error)
    }

    /// Sends a WebSocket close frame.
    pub(super) async fn close(&mut self) -> Result<(), BoxError> {
        self.ws.close().await.map_err(ws_error)
    }
}

/// A WebSocket error; the peer going away (reset, broken pipe, closed) is [`CLIENT_CLOSED`].
fn ws_error(e: tokio_websockets::Error) -> BoxError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match &e {
        tokio_websockets::Error::AlreadyClosed => err(CLIENT_CLOSED),
        tokio_websockets::Error::Io(io)
            if matches!(
                io.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            ) =>
        {
            err(CLIENT_CLOSED)
        }
        _ => e.into(),
    }
}

pub(super) fn be24(b: &[u8]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// Noise transport mode: each direction has its own key and counter; `aad` is empty.
pub(super) struct Transport {
    pub(super) read: NoiseCipher,
    pub(super) write: NoiseCipher,
    pub(super) read_counter: u32,
    pub(super) write_counter: u32,
}

impl Transport {
    /// Encrypts and sends one plaintext (flag byte + node).
    pub(super) async fn send(&mut self, conn: &mut Conn, plaintext: &[u8]) -> Result<(), BoxError> {
        let ct = self
            .write
            .encrypt_with_counter(self.write_counter, plaintext)?;
        self.write_counter += 1;
        conn.write_frame(&ct).await
    }

    /// Encodes, encrypts and sends a node.
    pub(super) async fn send_node(&mut self, conn: &mut Conn, node: &Node) -> Result<(), BoxError> {
        let plaintext = wacore_binary::marshal(node)?;
        self.send(conn, &plaintext).await
    }

    /// Decrypts one received frame into its plaintext (flag byte + node).
    pub(super) fn open(&mut self, mut frame: Vec<u8>) -> Result<Vec<u8>, BoxError> {
        self.read
            .decrypt_in_place_with_counter(self.read_counter, &mut frame)?;
        self.read_counter += 1;
        Ok(frame)
    }
}

/// Decodes a transport plaintext (flag byte, possibly deflated, then a node).
pub(super) fn decode_node(plaintext: &[u8]) -> Result<Node, BoxError> {
    let body = wacore_binary::util::unpack(plaintext)?;
    Ok(wacore_binary::marshal::unmarshal_ref(&body)?.to_owned())
}

/// An attribute of a node as a string.
pub(super) fn attr(node: &Node, key: &str) -> Option<String> {
    node.attrs.get(key).map(|v| v.as_str().into_owned())
}

/// `<iq from="s.whatsapp.net" type="result" id=..>` with optional children.
pub(super) fn iq_result(id: &str, children: Vec<Node>) -> Node {
    let builder = NodeBuilder::new("iq").attrs([("from", SERVER), ("type", "result"), ("id", id)]);
    if children.is_empty() {
        builder.build()
    } else {
        builder.children(children).build()
    }
}

// ---- protobuf (proto2 wire format, for the handshake messages) ----

pub(super) fn pb_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(super) fn pb_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    pb_varint(out, field << 3);
    pb_varint(out, value);
}

pub(super) fn pb_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
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

// ---- the pair-device stanza, byte by byte ----

const LIST_8: u8 = 0xf8;
const BINARY_8: u8 = 0xfc;
const TOKEN_S_WHATSAPP_NET: u8 = 0x03;
const TOKEN_TYPE: u8 = 0x04;
const TOKEN_FROM: u8 = 0x06;
const TOKEN_ID: u8 = 0x08;
const TOKEN_XMLNS: u8 = 0x16;
const TOKEN_IQ: u8 = 0x19;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_whatsapp::FakeWhatsapp;

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
    fn the_client_codec_reads_pair_device_as_written() {
        let stanza = pair_device_stanza("pd-1", &FakeWhatsapp::refs(3));
        let node = decode_node(&stanza).unwrap();
        assert_eq!(node.tag, "iq");
        assert_eq!(attr(&node, "from").as_deref(), Some(SERVER));
        assert_eq!(attr(&node, "type").as_deref(), Some("set"));
        assert_eq!(attr(&node, "id").as_deref(), Some("pd-1"));
        let refs: Vec<_> = node
            .get_optional_child("pair-device")
            .unwrap()
            .get_children_by_tag("ref")
            .map(|r| match &r.content {
                Some(wacore_binary::NodeContent::Bytes(b)) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("ref content {other:?}"),
            })
            .collect();
        assert_eq!(refs, FakeWhatsapp::refs(3));
    }

    #[test]
    fn an_iq_result_round_trips() {
        // <iq to="s.whatsapp.net" type="result" id="pd-1"/>, as the client acks pair-device.
        let ack = [
            0x00, 0xf8, 0x07, 0x19, 0x11, 0x03, 0x04, 0x14, 0x08, 0xfc, 0x04, b'p', b'd', b'-',
            b'1',
        ];
        let node = decode_node(&ack).unwrap();
        assert_eq!(node.tag, "iq");
        assert_eq!(attr(&node, "type").as_deref(), Some("result"));
        assert_eq!(attr(&node, "id").as_deref(), Some("pd-1"));
        let reply = wacore_binary::marshal(&iq_result("pd-1", Vec::new())).unwrap();
        let reply = decode_node(&reply).unwrap();
        assert_eq!(attr(&reply, "from").as_deref(), Some(SERVER));
        assert_eq!(attr(&reply, "id").as_deref(), Some("pd-1"));
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
