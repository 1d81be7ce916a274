//! `raw-gcm`: 12-byte nonce | AES-256-GCM ciphertext | 16-byte tag, no key id.
//!
//! The layout Lockbox- and cloak-style application libraries write: nothing
//! names the key, so [`RawGcm::open`](Codec::open) tries the target key first
//! and then the others in id order, and the first whose tag verifies made the
//! value. A value under none of them costs one GCM pass per key. SQL cannot
//! tell keys apart by a prefix ([`Codec::key_prefix`] is `None`).
//!
//! The nonce | ciphertext | tag body is also what follows the 5-byte prefix
//! of a Tink value, so [`super::tink_gcm`] shares `open_body` and
//! `seal_body`.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::{Zeroize, Zeroizing};

use super::{Codec, CodecError, FormatKeyError, Opened};
use crate::crypto::keyring::{Key, KeyId, Keyring};
use crate::crypto::nonce;

/// Length of the GCM tag.
const TAG_LEN: usize = 16;
/// Bytes a value carries besides its ciphertext: nonce and tag.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Prepares one key for AES-256-GCM (key schedule and GHASH key, once).
pub(super) fn prepare(format: &'static str, key: &Key) -> Result<LessSafeKey, FormatKeyError> {
    let unbound = UnboundKey::new(&AES_256_GCM, key.material()).map_err(|_| FormatKeyError {
        format,
        problem: format!("AES-256-GCM refused key {}", key.id()),
    })?;
    Ok(LessSafeKey::new(unbound))
}

/// Opens a nonce | ciphertext | tag `body` under `key` into `buf` (cleared
/// first; left holding the plaintext on success, zeros on failure).
pub(super) fn open_body(
    key: &LessSafeKey,
    body: &[u8],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if body.len() < OVERHEAD {
        return Err(CodecError::Truncated);
    }
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CodecError::Truncated)?;
    buf.clear();
    buf.extend_from_slice(sealed);
    let len = key
        .open_in_place(nonce, Aad::from(aad), buf.as_mut_slice())
        .map_err(|_| CodecError::AuthFailed)?
        .len();
    buf.truncate(len);
    Ok(())
}

/// Appends a fresh nonce | ciphertext | tag of `plaintext` under `key` to
/// `out`, after whatever prefix it already holds. On failure (only a value
/// over GCM's 64 GiB limit) `out` is wiped and left empty, which fails
/// verify-before-write and is quarantined, never written.
pub(super) fn seal_body(key: &LessSafeKey, plaintext: &[u8], aad: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(OVERHEAD + plaintext.len());
    let mut nonce_bytes = [0u8; NONCE_LEN];
    nonce::fill(&mut nonce_bytes);
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(plaintext);
    let nonce = Nonce::assume_unique_for_key(nonce_bytes);
    match key.seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[start + NONCE_LEN..]) {
        Ok(tag) => out.extend_from_slice(tag.as_ref()),
        Err(_) => out.zeroize(),
    }
}

/// AES-256-GCM keys prepared once, in the order `open` tries them.
pub struct RawGcm {
    /// (key id, prepared key); `keys[0]` is the target, the rest in id order.
    keys: Vec<(KeyId, LessSafeKey)>,
}

impl RawGcm {
    /// Prepares every key of `keyring` (any id).
    pub fn new(keyring: &Keyring) -> Result<Self, FormatKeyError> {
        let target = keyring.target();
        let mut keys = vec![(target.id(), prepare("raw-gcm", target)?)];
        for key in keyring.keys().filter(|k| k.id() != target.id()) {
            keys.push((key.id(), prepare("raw-gcm", key)?));
        }
        Ok(RawGcm { keys })
    }
}

impl Codec for RawGcm {
    fn key_hint(&self, _value: &[u8]) -> Option<KeyId> {
        None
    }

    /// Tries the target key, then the others in id order; the first whose
    /// tag verifies made the value. `AuthFailed` when none does.
    fn open(&self, value: &[u8], aad: &[u8]) -> Result<Opened, CodecError> {
        if value.len() < OVERHEAD {
            return Err(CodecError::Truncated);
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(value.len() - NONCE_LEN));
        for (id, key) in &self.keys {
            // A failed open zeroes the buffer, so each key starts from a fresh copy.
            if open_body(key, value, aad, &mut buf).is_ok() {
                return Ok(Opened {
                    key: *id,
                    plaintext: buf,
                    timestamp: None,
                });
            }
        }
        Err(CodecError::AuthFailed)
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8], _timestamp: Option<u64>, out: &mut Vec<u8>) {
        out.clear();
        seal_body(&self.keys[0].1, plaintext, aad, out);
    }

    fn target(&self) -> KeyId {
        self.keys[0].0
    }

    fn key_prefix(&self, _key: KeyId) -> Option<Vec<u8>> {
        None
    }

    fn describe_prefix(&self, _prefix: &[u8]) -> String {
        "raw-gcm (no key id)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring_with_target(target: KeyId) -> Keyring {
        Keyring::new(
            vec![
                Key::new(1, [1; 32]),
                Key::new(2, [2; 32]),
                Key::new(3, [3; 32]),
            ],
            target,
            None,
        )
        .unwrap()
    }

    fn sealed(codec: &RawGcm, pt: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        codec.seal(pt, aad, None, &mut out);
        out
    }

    #[test]
    fn round_trip_under_the_target_key() {
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        let out = sealed(&codec, b"+15551234567", b"");
        assert_eq!(out.len(), OVERHEAD + 12);
        let opened = codec.open(&out, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice(), opened.timestamp),
            (2, &b"+15551234567"[..], None)
        );
        assert_eq!(codec.target(), 2);
        assert_eq!((codec.key_hint(&out), codec.key_prefix(2)), (None, None));
    }

    #[test]
    fn value_under_an_old_key_opens_and_names_it() {
        let old = RawGcm::new(&ring_with_target(3)).unwrap();
        let out = sealed(&old, b"from last year", b"");
        let codec = RawGcm::new(&ring_with_target(1)).unwrap();
        let opened = codec.open(&out, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (3, &b"from last year"[..])
        );
    }

    #[test]
    fn tampered_tag_fails_authentication() {
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        let mut out = sealed(&codec, b"secret", b"");
        *out.last_mut().unwrap() ^= 1;
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::AuthFailed));
    }

    #[test]
    fn short_value_is_truncated() {
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        assert_eq!(
            codec.open(&[7; OVERHEAD - 1], b"").err(),
            Some(CodecError::Truncated)
        );
        assert_eq!(codec.open(&[], b"").err(), Some(CodecError::Truncated));
        let out = sealed(&codec, b"secret", b"");
        assert_eq!(
            codec.open(&out[..out.len() - 1], b"").err(),
            Some(CodecError::AuthFailed)
        );
    }

    #[test]
    fn key_outside_the_keyring_fails() {
        let stranger = Keyring::new(vec![Key::new(1, [9; 32])], 1, None).unwrap();
        let out = sealed(&RawGcm::new(&stranger).unwrap(), b"x", b"");
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::AuthFailed));
    }

    #[test]
    fn associated_data_is_bound() {
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        let out = sealed(&codec, b"x", b"row-1");
        assert_eq!(
            codec.open(&out, b"row-1").unwrap().plaintext.as_slice(),
            b"x"
        );
        assert_eq!(
            codec.open(&out, b"row-2").err(),
            Some(CodecError::AuthFailed)
        );
    }

    /// Nonce 000102..0b, key 0x01 * 32, "raw gcm KAT", AAD "aad": from
    /// Python `cryptography`'s `AESGCM(key).encrypt(nonce, pt, aad)`.
    #[test]
    fn known_answer_from_python_cryptography() {
        let value = hex::decode(KAT_RAW).unwrap();
        let codec = RawGcm::new(&ring_with_target(2)).unwrap();
        let opened = codec.open(&value, b"aad").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (1, &b"raw gcm KAT"[..])
        );
    }

    const KAT_RAW: &str =
        "000102030405060708090a0bc9c7e206479d6b59b52bb3f6a1b2b5aa34101a59bd8de1facd23cf";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn open_inverts_seal(pt in proptest::collection::vec(any::<u8>(), 0..512), aad in proptest::collection::vec(any::<u8>(), 0..32)) {
            let codec = RawGcm::new(&ring_with_target(2)).unwrap();
            let out = sealed(&codec, &pt, &aad);
            let opened = codec.open(&out, &aad).unwrap();
            prop_assert_eq!((opened.key, opened.plaintext.as_slice()), (2, pt.as_slice()));
        }

        #[test]
        fn arbitrary_bytes_give_a_typed_error(value in proptest::collection::vec(any::<u8>(), 0..128), aad in proptest::collection::vec(any::<u8>(), 0..16)) {
            let codec = RawGcm::new(&ring_with_target(2)).unwrap();
            let err = codec.open(&value, &aad).err();
            let expected = if value.len() < OVERHEAD { CodecError::Truncated } else { CodecError::AuthFailed };
            prop_assert_eq!(err, Some(expected));
        }

        #[test]
        fn open_into_agrees_with_open_whatever_the_buffer_held(value in proptest::collection::vec(any::<u8>(), 0..96), junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let codec = RawGcm::new(&ring_with_target(2)).unwrap();
            let mut buf = junk;
            prop_assert_eq!(codec.open_into(&value, b"", &mut buf).err(), codec.open(&value, b"").err());
        }

        #[test]
        fn any_flipped_bit_is_refused(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<prop::sample::Index>()) {
            let codec = RawGcm::new(&ring_with_target(2)).unwrap();
            let mut out = sealed(&codec, &pt, b"");
            let i = bit.index(out.len() * 8);
            out[i / 8] ^= 1 << (i % 8);
            prop_assert_eq!(codec.open(&out, b"").err(), Some(CodecError::AuthFailed));
        }
    }
}
