//! The phone's side of linking with a pairing code ("link with phone number instead"), as the
//! client's `wacore::pair_code` expects it:
//!
//! 1. the companion sends `companion_hello` with its ephemeral public key wrapped with the code:
//!    `salt (32) || iv (16) || AES-256-CTR(PBKDF2-SHA256(code, salt, 2^17), iv, key)`. The
//!    server only routes it by phone number; the code itself never travels in clear;
//! 2. the person types the code on the phone: the phone unwraps the companion's ephemeral key
//!    with it, wraps an ephemeral key of its own the same way and sends it (`primary_hello`) with
//!    its identity key;
//! 3. the companion answers with `companion_finish`: a key bundle
//!    `salt (32) || iv (12) || AES-256-GCM(HKDF(ephemeral DH, salt,
//!    "link_code_pairing_key_bundle_encryption_key"), companion identity || primary identity ||
//!    random (32))`. It opens only if both sides used the same code (AES-CTR has no tag: a wrong
//!    code yields a different ephemeral key, so a different DH, so a GCM failure);
//! 4. both derive the new adv secret `HKDF(ephemeral DH || identity DH || random, no salt,
//!    "adv_secret")`, which keys the HMAC of the `pair-success` that follows.
//!
//! AES comes from `wacore-libsignal` (its CTR mode has a 32-bit counter, so the client's 128-bit
//! counter mode is built here from single AES blocks), PBKDF2 and HKDF are written over
//! `hmac`/`sha2`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use wacore_libsignal::crypto::{aes_256_cbc_encrypt_into, aes_256_gcm_decrypt};

/// PBKDF2 rounds of the code key (WhatsApp Web's 2^17).
const PBKDF2_ROUNDS: u32 = 131_072;
/// Length of a wrapped ephemeral key: salt, iv, ciphertext.
pub(super) const WRAPPED_EPHEMERAL_LEN: usize = 80;
const BUNDLE_INFO: &[u8] = b"link_code_pairing_key_bundle_encryption_key";
const ADV_SECRET_INFO: &[u8] = b"adv_secret";
const BLOCK: usize = 16;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes any key length")
}

/// PBKDF2-HMAC-SHA256 of the code, one 32-byte block.
fn code_key(code: &str, salt: &[u8]) -> [u8; 32] {
    let keyed = hmac(code.as_bytes());
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut key = u;
    for _ in 1..PBKDF2_ROUNDS {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        key.iter_mut().zip(u).for_each(|(k, b)| *k ^= b);
    }
    key
}

/// AES-256-CTR with a 128-bit big-endian counter starting at `iv` (the client's `Ctr128BE`).
/// Each keystream block `AES(counter)` is the first block of a CBC encryption of a zero block
/// with the counter as IV.
fn ctr(key: &[u8; 32], iv: &[u8; 16], buf: &mut [u8]) {
    let start = u128::from_be_bytes(*iv);
    for (i, block) in buf.chunks_mut(BLOCK).enumerate() {
        let counter = start.wrapping_add(i as u128).to_be_bytes();
        let mut keystream = Vec::with_capacity(2 * BLOCK);
        aes_256_cbc_encrypt_into(&[0; BLOCK], key, &counter, &mut keystream)
            .expect("32-byte key, 16-byte IV");
        block.iter_mut().zip(&keystream).for_each(|(b, k)| *b ^= k);
    }
}

/// Unwraps an ephemeral public key wrapped with `code` (CPU-heavy: PBKDF2).
pub(super) fn unwrap_ephemeral(wrapped: &[u8], code: &str) -> Result<[u8; 32], String> {
    if wrapped.len() != WRAPPED_EPHEMERAL_LEN {
        return Err(format!(
            "wrapped ephemeral key of {} bytes, not {WRAPPED_EPHEMERAL_LEN}",
            wrapped.len()
        ));
    }
    let key = code_key(code, &wrapped[..32]);
    let iv: [u8; 16] = wrapped[32..48].try_into().expect("16 bytes");
    let mut public: [u8; 32] = wrapped[48..].try_into().expect("32 bytes");
    ctr(&key, &iv, &mut public);
    Ok(public)
}

/// Wraps an ephemeral public key with `code` (CPU-heavy: PBKDF2).
pub(super) fn wrap_ephemeral(public: &[u8; 32], code: &str) -> [u8; WRAPPED_EPHEMERAL_LEN] {
    let salt: [u8; 32] = rand::random();
    let iv: [u8; 16] = rand::random();
    let key = code_key(code, &salt);
    let mut ciphertext = *public;
    ctr(&key, &iv, &mut ciphertext);
    let mut wrapped = [0; WRAPPED_EPHEMERAL_LEN];
    wrapped[..32].copy_from_slice(&salt);
    wrapped[32..48].copy_from_slice(&iv);
    wrapped[48..].copy_from_slice(&ciphertext);
    wrapped
}

/// HKDF-SHA256 with one 32-byte output block (no salt: a zero key, as RFC 5869 says).
fn hkdf(ikm: &[u8], salt: Option<&[u8]>, info: &[u8]) -> [u8; 32] {
    let mut extract = hmac(salt.unwrap_or(&[0; 32]));
    extract.update(ikm);
    let prk = extract.finalize().into_bytes();
    let mut expand = hmac(&prk);
    expand.update(info);
    expand.update(&[1]);
    expand.finalize().into_bytes().into()
}

/// What the companion's key bundle says, once opened.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct KeyBundle {
    pub(super) companion_identity: [u8; 32],
    pub(super) primary_identity: [u8; 32],
    pub(super) random: [u8; 32],
}

/// Opens the `companion_finish` key bundle with the ephemeral DH; fails when the companion and
/// the phone did not use the same code.
pub(super) fn open_key_bundle(
    wrapped: &[u8],
    ephemeral_shared: &[u8; 32],
) -> Result<KeyBundle, String> {
    if wrapped.len() < 32 + 12 + 16 {
        return Err(format!("key bundle of {} bytes", wrapped.len()));
    }
    let key = hkdf(ephemeral_shared, Some(&wrapped[..32]), BUNDLE_INFO);
    let iv: [u8; 12] = wrapped[32..44].try_into().expect("12 bytes");
    let mut bundle = Vec::new();
    aes_256_gcm_decrypt(&key, &iv, b"", &wrapped[44..], &mut bundle)
        .map_err(|_| "the key bundle does not open (not wrapped with the typed code)".to_owned())?;
    let field = |i: usize| -> Result<[u8; 32], String> {
        bundle
            .get(i * 32..(i + 1) * 32)
            .and_then(|f| f.try_into().ok())
            .ok_or_else(|| format!("key bundle of {} bytes, not 96", bundle.len()))
    };
    Ok(KeyBundle {
        companion_identity: field(0)?,
        primary_identity: field(1)?,
        random: field(2)?,
    })
}

/// The adv secret both sides derive once the bundle is open.
pub(super) fn adv_secret(
    ephemeral_shared: &[u8; 32],
    identity_shared: &[u8; 32],
    random: &[u8; 32],
) -> [u8; 32] {
    let ikm = [&ephemeral_shared[..], identity_shared, random].concat();
    hkdf(&ikm, None, ADV_SECRET_INFO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wacore::pair_code::PairCodeUtils;
    use wacore_libsignal::protocol::KeyPair;

    fn key_pair() -> KeyPair {
        KeyPair::generate(&mut rand010::rng())
    }

    fn public(pair: &KeyPair) -> [u8; 32] {
        pair.public_key.public_key_bytes().try_into().unwrap()
    }

    #[test]
    fn ctr_steps_the_whole_128_bit_counter() {
        // The last 32 bits about to wrap: the second block must carry into the upper bits.
        let key = [5; 32];
        let mut iv = [0; 16];
        iv[12..].copy_from_slice(&[0xff; 4]);
        let mut buf = [0u8; 32];
        ctr(&key, &iv, &mut buf);
        let mut next = [0; 16];
        next[11] = 1;
        let mut second = [0u8; 16];
        ctr(&key, &next, &mut second);
        assert_eq!(buf[16..], second);
    }

    /// Both directions against the client's own code: what it wraps the phone unwraps, what the
    /// phone wraps it unwraps, and a key bundle it builds opens to the adv secret it keeps.
    #[test]
    fn the_phone_and_the_client_agree() {
        let code = "ABCD1234";
        let companion_ephemeral = key_pair();
        let wrapped = PairCodeUtils::encrypt_ephemeral_pub(&public(&companion_ephemeral), code);
        assert_eq!(
            unwrap_ephemeral(&wrapped, code).unwrap(),
            public(&companion_ephemeral)
        );

        let primary_ephemeral = key_pair();
        let primary_identity = key_pair();
        let wrapped = wrap_ephemeral(&public(&primary_ephemeral), code);
        assert_eq!(
            PairCodeUtils::decrypt_primary_ephemeral_pub(&wrapped, code).unwrap(),
            public(&primary_ephemeral)
        );

        let companion_identity = key_pair();
        let (bundle, client_adv) = PairCodeUtils::prepare_key_bundle(
            &companion_ephemeral,
            &public(&primary_ephemeral),
            &public(&primary_identity),
            &companion_identity,
        )
        .unwrap();
        let ephemeral_shared = primary_ephemeral
            .private_key
            .calculate_agreement(&companion_ephemeral.public_key)
            .unwrap();
        let opened = open_key_bundle(&bundle, &ephemeral_shared).unwrap();
        assert_eq!(opened.companion_identity, public(&companion_identity));
        assert_eq!(opened.primary_identity, public(&primary_identity));
        let identity_shared = primary_identity
            .private_key
            .calculate_agreement(&companion_identity.public_key)
            .unwrap();
        assert_eq!(
            adv_secret(&ephemeral_shared, &identity_shared, &opened.random),
            client_adv
        );

        // A bundle built on a key unwrapped with the wrong code does not open.
        let garbled = PairCodeUtils::decrypt_primary_ephemeral_pub(&wrapped, "WXYZ5678").unwrap();
        let (bundle, _) = PairCodeUtils::prepare_key_bundle(
            &companion_ephemeral,
            &garbled,
            &public(&primary_identity),
            &companion_identity,
        )
        .unwrap();
        assert!(open_key_bundle(&bundle, &ephemeral_shared).is_err());
    }
}
