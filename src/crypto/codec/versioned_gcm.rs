//! `versioned-gcm`: version byte | 12-byte nonce | AES-256-GCM ciphertext | 16-byte tag.
//!
//! The layout of the quarterly rotation procedure's `VersionedEncryptor`. The
//! version byte names the key, so SQL can tell stale values from current ones
//! by their first byte.

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM, NONCE_LEN};
use zeroize::Zeroizing;

use super::{raw_gcm, Codec, CodecError, FormatKeyError, Opened};
use crate::crypto::keyring::{KeyId, Keyring};

const TAG_LEN: usize = 16;
/// Bytes a value carries besides its ciphertext.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// AES-256-GCM keys prepared once, indexed by version byte.
pub struct VersionedGcm {
    /// Prepared keys; `None` where the keyring has no key of that version.
    keys: Vec<Option<LessSafeKey>>,
    /// Version byte of the target key.
    target: u8,
}

impl VersionedGcm {
    /// Prepares every key of `keyring`; versions must fit one byte (1..=255).
    pub fn new(keyring: &Keyring) -> Result<Self, FormatKeyError> {
        let mut keys: Vec<Option<LessSafeKey>> = (0..256).map(|_| None).collect();
        for key in keyring.keys() {
            let slot = match u8::try_from(key.id()) {
                Ok(v) if v > 0 => v,
                _ => {
                    return Err(FormatKeyError {
                        format: "versioned-gcm",
                        problem: format!(
                            "key id {} does not fit the version byte (1..=255)",
                            key.id()
                        ),
                    })
                }
            };
            let unbound =
                UnboundKey::new(&AES_256_GCM, key.material()).map_err(|_| FormatKeyError {
                    format: "versioned-gcm",
                    problem: "AES-256-GCM refused a key".into(),
                })?;
            keys[usize::from(slot)] = Some(LessSafeKey::new(unbound));
        }
        // The keyring guarantees the target exists and every id fit above.
        let target = u8::try_from(keyring.target().id()).unwrap_or(0);
        Ok(VersionedGcm { keys, target })
    }
}

impl Codec for VersionedGcm {
    fn key_hint(&self, value: &[u8]) -> Option<KeyId> {
        value.first().map(|v| KeyId::from(*v))
    }

    fn open(&self, value: &[u8], aad: &[u8]) -> Result<Opened, CodecError> {
        let mut buf = Zeroizing::new(Vec::with_capacity(value.len()));
        let (key, timestamp) = self.open_into(value, aad, &mut buf)?;
        Ok(Opened {
            key,
            plaintext: buf,
            timestamp,
        })
    }

    fn open_into(
        &self,
        value: &[u8],
        aad: &[u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<(KeyId, Option<u64>), CodecError> {
        let (&version, body) = value.split_first().ok_or(CodecError::Truncated)?;
        let key = self.keys[usize::from(version)]
            .as_ref()
            .ok_or(CodecError::UnknownKey)?;
        raw_gcm::open_body(key, body, aad, plaintext)?;
        Ok((KeyId::from(version), None))
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8], _timestamp: Option<u64>, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(OVERHEAD + plaintext.len());
        out.push(self.target);
        match self.keys[usize::from(self.target)].as_ref() {
            Some(key) => raw_gcm::seal_body(key, plaintext, aad, out),
            // The keyring guarantees the target has a key; an empty output
            // would fail verify-before-write and be quarantined, never written.
            None => out.clear(),
        }
    }

    fn target(&self) -> KeyId {
        KeyId::from(self.target)
    }

    fn key_prefix(&self, key: KeyId) -> Option<Vec<u8>> {
        u8::try_from(key).ok().map(|v| vec![v])
    }

    fn describe_prefix(&self, prefix: &[u8]) -> String {
        match prefix.first() {
            Some(v) => format!("v{v}"),
            None => "empty".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::Key;
    use proptest::prelude::*;

    fn ring() -> Keyring {
        Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])], 2, None).unwrap()
    }

    #[test]
    fn seals_under_the_target_version() {
        let codec = VersionedGcm::new(&ring()).unwrap();
        let mut out = Vec::new();
        codec.seal(b"+15551234567", b"", None, &mut out);
        assert_eq!(out[0], 2);
        assert_eq!(out.len(), OVERHEAD + 12);
        let opened = codec.open(&out, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (2, &b"+15551234567"[..])
        );
    }

    #[test]
    fn tampered_tag_fails_authentication() {
        let codec = VersionedGcm::new(&ring()).unwrap();
        let mut out = Vec::new();
        codec.seal(b"secret", b"", None, &mut out);
        *out.last_mut().unwrap() ^= 1;
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::AuthFailed));
    }

    #[test]
    fn unknown_version_is_named() {
        let codec = VersionedGcm::new(&ring()).unwrap();
        assert_eq!(
            codec.open(&[9; 40], b"").err(),
            Some(CodecError::UnknownKey)
        );
    }

    #[test]
    fn short_value_is_truncated() {
        let codec = VersionedGcm::new(&ring()).unwrap();
        assert_eq!(codec.open(&[1; 20], b"").err(), Some(CodecError::Truncated));
        assert_eq!(codec.open(&[], b"").err(), Some(CodecError::Truncated));
    }

    #[test]
    fn wrong_aad_fails() {
        let codec = VersionedGcm::new(&ring()).unwrap();
        let mut out = Vec::new();
        codec.seal(b"x", b"row-1", None, &mut out);
        assert_eq!(
            codec.open(&out, b"row-2").err(),
            Some(CodecError::AuthFailed)
        );
    }

    /// The errors opening can give: anything else (a panic, `BadEncoding`,
    /// `VerifyMismatch`) would be a bug in the decoder.
    fn typed(e: CodecError) -> bool {
        matches!(
            e,
            CodecError::Truncated | CodecError::UnknownKey | CodecError::AuthFailed
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn open_inverts_seal(pt in proptest::collection::vec(any::<u8>(), 0..512), aad in proptest::collection::vec(any::<u8>(), 0..32)) {
            let codec = VersionedGcm::new(&ring()).unwrap();
            let mut out = Vec::new();
            codec.seal(&pt, &aad, None, &mut out);
            let opened = codec.open(&out, &aad).unwrap();
            prop_assert_eq!((opened.key, opened.plaintext.as_slice()), (2, pt.as_slice()));
        }

        #[test]
        fn arbitrary_bytes_give_a_typed_error(value in proptest::collection::vec(any::<u8>(), 0..128)) {
            let codec = VersionedGcm::new(&ring()).unwrap();
            let err = codec.open(&value, b"").err();
            prop_assert!(err.is_some_and(typed), "{:?}", err);
        }

        #[test]
        fn arbitrary_bodies_after_a_known_version_give_a_typed_error(version in 1u8..=2, body in proptest::collection::vec(any::<u8>(), 0..96)) {
            let codec = VersionedGcm::new(&ring()).unwrap();
            let mut value = vec![version];
            value.extend_from_slice(&body);
            let err = codec.open(&value, b"").err();
            prop_assert!(matches!(err, Some(CodecError::Truncated | CodecError::AuthFailed)), "{:?}", err);
        }

        #[test]
        fn open_into_agrees_with_open_whatever_the_buffer_held(value in proptest::collection::vec(any::<u8>(), 0..96), junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let codec = VersionedGcm::new(&ring()).unwrap();
            let mut buf = junk;
            let into = codec.open_into(&value, b"", &mut buf);
            prop_assert_eq!(into.err(), codec.open(&value, b"").err());
        }

        #[test]
        fn any_flipped_bit_is_refused(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<prop::sample::Index>()) {
            let codec = VersionedGcm::new(&ring()).unwrap();
            let mut out = Vec::new();
            codec.seal(&pt, b"", None, &mut out);
            let i = bit.index(out.len() * 8);
            out[i / 8] ^= 1 << (i % 8);
            let err = codec.open(&out, b"").err();
            prop_assert!(matches!(err, Some(CodecError::UnknownKey | CodecError::AuthFailed)), "{:?}", err);
        }
    }
}
