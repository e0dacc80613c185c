//! The fake's phone side: reading a scanned QR code and vouching for the companion with an ADV
//! device identity, as the primary device does when it links a new companion.
//!
//! What the client checks (`wacore::pair::PairUtils::do_pair_crypto` in 0.7):
//! * `<device-identity>` holds an `ADVSignedDeviceIdentityHMAC { details, hmac }` whose `hmac` is
//!   HMAC-SHA256 over `details` keyed by the adv secret from the QR code;
//! * `details` is an `ADVSignedDeviceIdentity { details, accountSignatureKey, accountSignature }`
//!   where `accountSignature` is an XEdDSA signature by the account identity key over
//!   `06 00 || details || companion identity public key`;
//! * the inner `details` is an `ADVDeviceIdentity` with a `keyIndex`.
//!
//! The client then signs `06 01 || details || its identity key || account key` with its identity
//! key and sends the identity back in `<pair-device-sign>`, which the fake verifies.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wacore_libsignal::core::curve::{PrivateKey, PublicKey};
use waproto::buffa::Message;
use waproto::whatsapp::{ADVDeviceIdentity, ADVSignedDeviceIdentity, ADVSignedDeviceIdentityHMAC};

use super::handshake::public_bytes;

const ADV_PREFIX_ACCOUNT_SIGNATURE: [u8; 2] = [6, 0];
const ADV_PREFIX_DEVICE_SIGNATURE: [u8; 2] = [6, 1];

/// What a QR code shown by a companion carries:
/// `ref,b64(noise public key),b64(identity public key),b64(adv secret),client type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrCode {
    pub reference: String,
    pub noise_public: [u8; 32],
    pub identity_public: [u8; 32],
    pub adv_secret: [u8; 32],
    pub client_type: String,
}

impl QrCode {
    pub fn parse(code: &str) -> Result<Self, String> {
        let fields: Vec<&str> = code.split(',').collect();
        let [reference, noise, identity, adv, client_type] = fields[..] else {
            return Err(format!(
                "expected 5 comma-separated fields, got {}",
                fields.len()
            ));
        };
        if reference.is_empty() {
            return Err("empty ref".into());
        }
        let key = |name: &str, b64: &str| -> Result<[u8; 32], String> {
            STANDARD
                .decode(b64)
                .map_err(|e| format!("{name}: {e}"))?
                .try_into()
                .map_err(|v: Vec<u8>| format!("{name}: {} bytes, not 32", v.len()))
        };
        Ok(QrCode {
            reference: reference.to_owned(),
            noise_public: key("noise key", noise)?,
            identity_public: key("identity key", identity)?,
            adv_secret: key("adv secret", adv)?,
            client_type: client_type.to_owned(),
        })
    }
}

/// A companion device the fake paired: the account (phone number and LID) and the keys the
/// companion proved it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedDevice {
    /// The account's phone number (the user part of its JID).
    pub phone: u64,
    /// The account's LID user.
    pub lid: u64,
    /// The companion's device number under the account.
    pub device: u32,
    pub noise_public: [u8; 32],
    pub identity_public: [u8; 32],
}

impl PairedDevice {
    /// `phone:device@s.whatsapp.net`.
    pub fn jid(&self) -> String {
        format!("{}:{}@s.whatsapp.net", self.phone, self.device)
    }

    /// `lid:device@lid`.
    pub fn lid_jid(&self) -> String {
        format!("{}:{}@lid", self.lid, self.device)
    }
}

/// The primary device of one fake account.
pub(super) struct Account {
    pub(super) phone: u64,
    pub(super) lid: u64,
    identity: PrivateKey,
    identity_public: [u8; 32],
}

/// Key index of the companion in the account's device list.
const KEY_INDEX: u32 = 1;

impl Account {
    /// Account number `n` (0-based): a fixed phone number, LID and identity key per number.
    pub(super) fn new(n: u64) -> Self {
        let mut private = [0x44; 32];
        private[..8].copy_from_slice(&n.to_be_bytes());
        let identity = PrivateKey::deserialize(&private).expect("valid account key");
        let identity_public = public_bytes(&identity);
        Account {
            phone: 15_550_000_000 + n,
            lid: 100_000_000_000_000 + n,
            identity,
            identity_public,
        }
    }

    /// Account number `n` under a phone number of the test's choosing (a companion that links by
    /// pairing code names the number it links to).
    pub(super) fn with_phone(n: u64, phone: u64) -> Self {
        Account {
            phone,
            ..Account::new(n)
        }
    }

    /// The account's identity public key (the phone's, in a pairing-code `primary_hello`).
    pub(super) fn identity_public(&self) -> [u8; 32] {
        self.identity_public
    }

    /// X25519 agreement of the account's identity key with a companion's identity key.
    pub(super) fn identity_agreement(
        &self,
        companion_identity: &[u8; 32],
    ) -> Result<[u8; 32], String> {
        let companion =
            PublicKey::from_djb_public_key_bytes(companion_identity).map_err(|e| e.to_string())?;
        self.identity
            .calculate_agreement(&companion)
            .map_err(|e| e.to_string())
    }

    /// The `<device-identity>` content that vouches for the companion of `qr`.
    pub(super) fn device_identity(&self, qr: &QrCode, now: u64) -> Result<Vec<u8>, String> {
        let details = ADVDeviceIdentity {
            raw_id: Some(rand::random()),
            timestamp: Some(now),
            key_index: Some(KEY_INDEX),
            ..Default::default()
        }
        .encode_to_vec();
        let message = [
            &ADV_PREFIX_ACCOUNT_SIGNATURE[..],
            &details,
            &qr.identity_public,
        ]
        .concat();
        let signature = self
            .identity
            .calculate_signature(&message, &mut rand010::rng())
            .map_err(|e| e.to_string())?;
        let signed = ADVSignedDeviceIdentity {
            details: Some(details),
            account_signature_key: Some(self.identity_public.to_vec()),
            account_signature: Some(signature.to_vec()),
            ..Default::default()
        }
        .encode_to_vec();
        let mut mac = Hmac::<Sha256>::new_from_slice(&qr.adv_secret).map_err(|e| e.to_string())?;
        mac.update(&signed);
        Ok(ADVSignedDeviceIdentityHMAC {
            details: Some(signed),
            hmac: Some(mac.finalize().into_bytes().to_vec()),
            ..Default::default()
        }
        .encode_to_vec())
    }

    /// Checks the identity the companion sent back in `<pair-device-sign>`: the account part is
    /// ours, unchanged, and the companion signed it with the identity key of the QR code.
    pub(super) fn verify_signed_identity(&self, qr: &QrCode, signed: &[u8]) -> Result<(), String> {
        let identity =
            ADVSignedDeviceIdentity::decode_from_slice(signed).map_err(|e| e.to_string())?;
        let details = identity.details.as_deref().ok_or("no details")?;
        if identity.account_signature_key.as_deref() != Some(&self.identity_public[..]) {
            return Err("account signature key changed".into());
        }
        let account_message = [
            &ADV_PREFIX_ACCOUNT_SIGNATURE[..],
            details,
            &qr.identity_public,
        ]
        .concat();
        let account_key = PublicKey::from_djb_public_key_bytes(&self.identity_public)
            .map_err(|e| e.to_string())?;
        if !account_key.verify_signature(
            &account_message,
            identity.account_signature.as_deref().unwrap_or_default(),
        ) {
            return Err("account signature does not verify".into());
        }
        let device_message = [
            &ADV_PREFIX_DEVICE_SIGNATURE[..],
            details,
            &qr.identity_public,
            &self.identity_public,
        ]
        .concat();
        let companion_key =
            PublicKey::from_djb_public_key_bytes(&qr.identity_public).map_err(|e| e.to_string())?;
        if !companion_key.verify_signature(
            &device_message,
            identity.device_signature.as_deref().unwrap_or_default(),
        ) {
            return Err("device signature does not verify".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> ([u8; 32], PrivateKey) {
        let private = PrivateKey::deserialize(&[seed; 32]).unwrap();
        (public_bytes(&private), private)
    }

    #[test]
    fn qr_codes_parse() {
        let code = format!(
            "2@REF,{},{},{},9",
            STANDARD.encode([1; 32]),
            STANDARD.encode([2; 32]),
            STANDARD.encode([3; 32])
        );
        let qr = QrCode::parse(&code).unwrap();
        assert_eq!(qr.reference, "2@REF");
        assert_eq!(qr.noise_public, [1; 32]);
        assert_eq!(qr.identity_public, [2; 32]);
        assert_eq!(qr.adv_secret, [3; 32]);
        assert_eq!(qr.client_type, "9");
        assert!(QrCode::parse("2@REF,AAAA,BBBB,CCCC").is_err());
        assert!(QrCode::parse(&code.replace(&STANDARD.encode([2; 32]), "AAAA")).is_err());
    }

    /// The identity passes the client's own verification (`do_pair_crypto`), and what the client
    /// sends back passes the fake's.
    #[test]
    fn the_client_accepts_the_device_identity_and_the_fake_its_signature() {
        let (identity_public, identity_private) = keys(7);
        let (noise_public, noise_private) = keys(8);
        let qr = QrCode {
            reference: "2@REF".into(),
            noise_public,
            identity_public,
            adv_secret: [9; 32],
            client_type: "9".into(),
        };
        let account = Account::new(0);
        let device_identity = account.device_identity(&qr, 1_700_000_000).unwrap();

        let state = wacore::pair::DeviceState {
            identity_key: wacore_libsignal::protocol::KeyPair::new(
                PublicKey::from_djb_public_key_bytes(&identity_public).unwrap(),
                identity_private,
            ),
            noise_key: wacore_libsignal::protocol::KeyPair::new(
                PublicKey::from_djb_public_key_bytes(&noise_public).unwrap(),
                noise_private,
            ),
            adv_secret_key: qr.adv_secret,
        };
        let (signed, key_index) =
            wacore::pair::PairUtils::do_pair_crypto(&state, &device_identity).unwrap();
        assert_eq!(key_index, KEY_INDEX);
        account.verify_signed_identity(&qr, &signed).unwrap();

        let wrong_secret = wacore::pair::DeviceState {
            adv_secret_key: [10; 32],
            ..state
        };
        let refused =
            wacore::pair::PairUtils::do_pair_crypto(&wrong_secret, &device_identity).unwrap_err();
        assert_eq!(refused.text, "hmac-mismatch");
    }
}
