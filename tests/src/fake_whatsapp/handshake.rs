//! The Noise handshake as responder, with a fixed server static key and a cert chain under a
//! fake root (signatures unchecked by a client built with `danger-skip-cert-chain-verify`): XX for
//! fresh and freshly paired clients, IK for clients that cached the server's static key (a paired
//! device reconnecting after its first login).

use wacore_libsignal::core::curve::PrivateKey;
use wacore_noise::NoiseHandshake;

use super::wire::{Conn, Transport, WA_HEADER, be24, pb_bytes, pb_field, pb_varint_field};
use super::{BoxError, err};

const NOISE_XX: &str = "Noise_XX_25519_AESGCM_SHA256\0\0\0\0";
const NOISE_IK: &str = "Noise_IK_25519_AESGCM_SHA256\0\0\0\0";
/// Private key of the server's static Noise key pair (the cert chain's leaf key).
const SERVER_STATIC_PRIVATE: [u8; 32] = [0x43; 32];
const INTERMEDIATE_PRIVATE: [u8; 32] = [0x42; 32];
const NOT_BEFORE: u64 = 1_700_000_000;
const NOT_AFTER: u64 = 2_000_000_000;

/// The fixed server static key and the cert chain vouching for it.
pub(super) struct ServerKeys {
    static_private: PrivateKey,
    static_public: [u8; 32],
    cert_chain: Vec<u8>,
}

impl ServerKeys {
    pub(super) fn new() -> Self {
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

pub(super) fn public_bytes(private: &PrivateKey) -> [u8; 32] {
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

/// What a completed handshake yields.
pub(super) struct Handshake {
    pub(super) transport: Transport,
    /// The client's static Noise public key.
    pub(super) client_static: [u8; 32],
    /// The decrypted `ClientPayload`.
    pub(super) client_payload: Vec<u8>,
    /// Noise IK (a resumed session) rather than XX.
    pub(super) resumed: bool,
}

/// Reads the intro and runs Noise XX (or IK, for a resuming client) as responder.
pub(super) async fn respond(conn: &mut Conn, keys: &ServerKeys) -> Result<Handshake, BoxError> {
    // Intro: optional edge-routing preamble, then the WA header.
    let mut intro = conn.read_exact(4).await?;
    if intro[..2] == *b"ED" {
        let len = conn.read_exact(3).await?;
        conn.read_exact(be24(&len)).await?;
        intro = conn.read_exact(4).await?;
    }
    if intro != WA_HEADER {
        return Err(err(format!("unexpected intro {intro:02x?}")));
    }

    // ClientHello: only an ephemeral for XX; with the client's static and its payload for IK.
    let hello = conn.read_frame().await?;
    let client_hello = pb_field(&hello, 2).ok_or_else(|| err("no clientHello"))?;
    let client_ephemeral = pb_field(client_hello, 1).ok_or_else(|| err("no ephemeral"))?;
    if client_ephemeral.len() != 32 {
        return Err(err("ephemeral key is not 32 bytes"));
    }
    if let Some(static_ct) = pb_field(client_hello, 2) {
        let payload_ct =
            pb_field(client_hello, 3).ok_or_else(|| err("IK hello without payload"))?;
        return respond_ik(conn, keys, client_ephemeral, static_ct, payload_ct).await;
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
    let client_payload = noise.decrypt(payload_ct)?;
    split(noise, &client_static, client_payload, false)
}

/// Noise IK, the resume handshake of a client that cached the server's static key from an
/// earlier XX (`<- s` is the pre-message):
/// `-> e, es, s, ss` + the login payload, `<- e, ee, se` + the cert chain, no third message.
async fn respond_ik(
    conn: &mut Conn,
    keys: &ServerKeys,
    client_ephemeral: &[u8],
    static_ct: &[u8],
    payload_ct: &[u8],
) -> Result<Handshake, BoxError> {
    let mut noise = NoiseHandshake::new(NOISE_IK, &WA_HEADER)?;
    noise.authenticate(&keys.static_public);
    noise.authenticate(client_ephemeral);
    noise.mix_shared_secret(keys.static_private.serialize(), client_ephemeral)?;
    let client_static = noise.decrypt(static_ct)?;
    noise.mix_shared_secret(keys.static_private.serialize(), &client_static)?;
    let client_payload = noise.decrypt(payload_ct)?;

    let ephemeral_private = PrivateKey::deserialize(&rand::random::<[u8; 32]>())?;
    let ephemeral_public = public_bytes(&ephemeral_private);
    noise.authenticate(&ephemeral_public);
    noise.mix_shared_secret(ephemeral_private.serialize(), client_ephemeral)?;
    noise.mix_shared_secret(ephemeral_private.serialize(), &client_static)?;
    let cert_ct = noise.encrypt(&keys.cert_chain)?;
    // No `static` in the ServerHello: that is what tells the client its cached key still holds
    // (with one, it would fall back to XX).
    let mut server_hello = Vec::new();
    pb_bytes(&mut server_hello, 1, &ephemeral_public);
    pb_bytes(&mut server_hello, 3, &cert_ct);
    let mut message = Vec::new();
    pb_bytes(&mut message, 3, &server_hello);
    conn.write_frame(&message).await?;
    split(noise, &client_static, client_payload, true)
}

fn split(
    noise: NoiseHandshake,
    client_static: &[u8],
    client_payload: Vec<u8>,
    resumed: bool,
) -> Result<Handshake, BoxError> {
    // Split: the first key is client->server, the second server->client. `finish` names them
    // from the initiator's side (write, read).
    let (client_to_server, server_to_client) = noise.finish()?;
    Ok(Handshake {
        transport: Transport {
            read: client_to_server,
            write: server_to_client,
            read_counter: 0,
            write_counter: 0,
        },
        client_static: client_static
            .try_into()
            .map_err(|_| err("client static is not 32 bytes"))?,
        client_payload,
        resumed,
    })
}
