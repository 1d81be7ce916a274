//! `tink-gcm`: Google Tink's AES-GCM AEAD wire format with the TINK output prefix.
//!
//! ```text
//! 0x01 | key id (4, big-endian) | IV (12) | AES-256-GCM ciphertext | tag (16)
//! ```
//!
//! Applications using Tink's `Aead` primitive over an `AesGcmKey` keyset
//! store this; [`crate::crypto::keyring::tink`] reads their cleartext JSON keysets. The
//! key id is Tink's own (a random `uint32`) and is rekey's [`KeyId`], so SQL
//! can count values per key by their first five bytes. Tink's associated
//! data is GCM's AAD; the 5-byte prefix itself is not authenticated, as in
//! Tink. Only the TINK prefix (0x01) is read and written: LEGACY and CRUNCHY
//! (0x00) and RAW (no prefix; see [`super::raw_gcm`]) are not this format.

use ring::aead::LessSafeKey;
use zeroize::Zeroizing;

use super::raw_gcm::{self, open_body, seal_body};
use super::{Codec, CodecError, FormatKeyError, Opened};
use crate::crypto::keyring::{KeyId, Keyring};

/// First byte of every value under a key with output prefix TINK.
pub const TINK_START_BYTE: u8 = 0x01;
/// Length of the output prefix: start byte and 4-byte key id.
pub const PREFIX_LEN: usize = 5;
/// Bytes a value carries besides its ciphertext: prefix, IV and tag.
pub const OVERHEAD: usize = PREFIX_LEN + raw_gcm::OVERHEAD;

/// The output prefix of values sealed under `key`.
fn prefix(key: KeyId) -> [u8; PREFIX_LEN] {
    let id = key.to_be_bytes();
    [TINK_START_BYTE, id[0], id[1], id[2], id[3]]
}

/// The key id a TINK-prefixed value (or bare prefix) names, if it has one.
fn prefixed_id(value: &[u8]) -> Option<KeyId> {
    match value {
        [TINK_START_BYTE, a, b, c, d, ..] => Some(KeyId::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// AES-256-GCM keys prepared once, found by Tink key id.
pub struct TinkGcm {
    /// (Tink key id, prepared key), sorted by id for binary search.
    keys: Vec<(KeyId, LessSafeKey)>,
    /// Index in `keys` of the target key.
    target: usize,
}

impl TinkGcm {
    /// Prepares every key of `keyring`; any `u32` id is a valid Tink key id.
    pub fn new(keyring: &Keyring) -> Result<Self, FormatKeyError> {
        // `Keyring::keys` iterates in id order, so `keys` comes out sorted.
        let keys = keyring
            .keys()
            .map(|key| Ok((key.id(), raw_gcm::prepare("tink-gcm", key)?)))
            .collect::<Result<Vec<_>, FormatKeyError>>()?;
        let target_id = keyring.target().id();
        let target = keys
            .binary_search_by_key(&target_id, |(id, _)| *id)
            .map_err(|_| FormatKeyError {
                format: "tink-gcm",
                problem: format!("target key {target_id} is missing from the keyring"),
            })?;
        Ok(TinkGcm { keys, target })
    }

    /// The prepared key with Tink id `id`.
    fn key(&self, id: KeyId) -> Option<&LessSafeKey> {
        self.keys
            .binary_search_by_key(&id, |(id, _)| *id)
            .ok()
            .map(|i| &self.keys[i].1)
    }
}

impl Codec for TinkGcm {
    fn key_hint(&self, value: &[u8]) -> Option<KeyId> {
        prefixed_id(value)
    }

    /// `Truncated` under 5 bytes or under the fixed overhead; `UnknownKey`
    /// when the prefix is not TINK's or names no key of the keyring;
    /// `AuthFailed` when the tag does not verify under the key it names.
    fn open(&self, value: &[u8], aad: &[u8]) -> Result<Opened, CodecError> {
        if value.len() < PREFIX_LEN {
            return Err(CodecError::Truncated);
        }
        let id = prefixed_id(value).ok_or(CodecError::UnknownKey)?;
        let key = self.key(id).ok_or(CodecError::UnknownKey)?;
        let mut buf = Zeroizing::new(Vec::new());
        open_body(key, &value[PREFIX_LEN..], aad, &mut buf)?;
        Ok(Opened {
            key: id,
            plaintext: buf,
            timestamp: None,
        })
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8], _timestamp: Option<u64>, out: &mut Vec<u8>) {
        let (id, key) = &self.keys[self.target];
        out.clear();
        out.reserve(OVERHEAD + plaintext.len());
        out.extend_from_slice(&prefix(*id));
        seal_body(key, plaintext, aad, out);
    }

    fn target(&self) -> KeyId {
        self.keys[self.target].0
    }

    fn key_prefix(&self, key: KeyId) -> Option<Vec<u8>> {
        Some(prefix(key).to_vec())
    }

    /// `tink:0x1a2b3c4d` for a TINK prefix; anything else is named as not one.
    fn describe_prefix(&self, prefix: &[u8]) -> String {
        match prefix {
            [] => "empty".into(),
            [TINK_START_BYTE, _, _, _, _, ..] => {
                format!("tink:0x{:08x}", prefixed_id(prefix).unwrap_or_default())
            }
            [0x00, a, b, c, d, ..] => {
                format!(
                    "tink legacy/crunchy:0x{:08x} (unsupported prefix)",
                    u32::from_be_bytes([*a, *b, *c, *d])
                )
            }
            other => format!(
                "not a tink prefix (0x{})",
                hex::encode(&other[..other.len().min(PREFIX_LEN)])
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::Key;
    use proptest::prelude::*;

    const OLD: KeyId = 0x0000_0007;
    const NEW: KeyId = 0x1a2b_3c4d;

    fn ring() -> Keyring {
        Keyring::new(
            vec![Key::new(OLD, [1; 32]), Key::new(NEW, [2; 32])],
            NEW,
            None,
        )
        .unwrap()
    }

    fn sealed(codec: &TinkGcm, pt: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        codec.seal(pt, aad, None, &mut out);
        out
    }

    #[test]
    fn seals_under_the_target_key_with_its_prefix() {
        let codec = TinkGcm::new(&ring()).unwrap();
        let out = sealed(&codec, b"+15551234567", b"");
        assert_eq!(&out[..PREFIX_LEN], &[0x01, 0x1a, 0x2b, 0x3c, 0x4d]);
        assert_eq!(out.len(), OVERHEAD + 12);
        assert_eq!(codec.key_hint(&out), Some(NEW));
        assert_eq!(codec.key_prefix(NEW).as_deref(), Some(&out[..PREFIX_LEN]));
        let opened = codec.open(&out, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice(), opened.timestamp),
            (NEW, &b"+15551234567"[..], None)
        );
    }

    #[test]
    fn value_under_an_old_key_opens_and_names_it() {
        let old =
            TinkGcm::new(&Keyring::new(vec![Key::new(OLD, [1; 32])], OLD, None).unwrap()).unwrap();
        let out = sealed(&old, b"from last year", b"ctx");
        let opened = TinkGcm::new(&ring()).unwrap().open(&out, b"ctx").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (OLD, &b"from last year"[..])
        );
    }

    #[test]
    fn tampered_tag_fails_authentication() {
        let codec = TinkGcm::new(&ring()).unwrap();
        let mut out = sealed(&codec, b"secret", b"");
        *out.last_mut().unwrap() ^= 1;
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::AuthFailed));
    }

    #[test]
    fn unknown_key_id_and_foreign_prefixes_are_unknown_keys() {
        let codec = TinkGcm::new(&ring()).unwrap();
        let mut out = sealed(&codec, b"secret", b"");
        out[4] ^= 0xff;
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::UnknownKey));
        out[0] = 0x00;
        assert_eq!(codec.open(&out, b"").err(), Some(CodecError::UnknownKey));
    }

    #[test]
    fn short_value_is_truncated() {
        let codec = TinkGcm::new(&ring()).unwrap();
        assert_eq!(codec.open(&[], b"").err(), Some(CodecError::Truncated));
        assert_eq!(
            codec.open(&[0x01, 0x1a, 0x2b], b"").err(),
            Some(CodecError::Truncated)
        );
        let out = sealed(&codec, b"", b"");
        assert_eq!(
            codec.open(&out[..OVERHEAD - 1], b"").err(),
            Some(CodecError::Truncated)
        );
    }

    #[test]
    fn wrong_key_under_a_known_id_fails_authentication() {
        let impostor = Keyring::new(vec![Key::new(NEW, [9; 32])], NEW, None).unwrap();
        let out = sealed(&TinkGcm::new(&impostor).unwrap(), b"x", b"");
        assert_eq!(
            TinkGcm::new(&ring()).unwrap().open(&out, b"").err(),
            Some(CodecError::AuthFailed)
        );
    }

    #[test]
    fn associated_data_is_bound() {
        let codec = TinkGcm::new(&ring()).unwrap();
        let out = sealed(&codec, b"x", b"row-1");
        assert_eq!(
            codec.open(&out, b"row-2").err(),
            Some(CodecError::AuthFailed)
        );
    }

    #[test]
    fn prefixes_are_described() {
        let codec = TinkGcm::new(&ring()).unwrap();
        assert_eq!(
            codec.describe_prefix(&[0x01, 0x1a, 0x2b, 0x3c, 0x4d]),
            "tink:0x1a2b3c4d"
        );
        assert_eq!(codec.key_label(OLD), "tink:0x00000007");
        assert_eq!(
            codec.describe_prefix(&[0x00, 0, 0, 0, 5]),
            "tink legacy/crunchy:0x00000005 (unsupported prefix)"
        );
        assert_eq!(
            codec.describe_prefix(&[0x80, 1]),
            "not a tink prefix (0x8001)"
        );
        assert_eq!(codec.describe_prefix(&[]), "empty");
    }

    /// Tink layout built by hand with Python `cryptography`:
    /// `b"\x01" + id.to_bytes(4, "big") + iv + AESGCM(b"\x02" * 32).encrypt(iv, b"tink layout KAT", b"")`
    /// with id 0x1a2b3c4d and IV 101112..1b.
    #[test]
    fn known_answer_in_tink_layout_from_python_cryptography() {
        let value = hex::decode("011a2b3c4d101112131415161718191a1b5d2a94410e092d9aad8a01cb7977bb05bd7edbda18bf6fc42ef77518e98928").unwrap();
        let opened = TinkGcm::new(&ring()).unwrap().open(&value, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (NEW, &b"tink layout KAT"[..])
        );
    }

    /// Ciphertexts made by Python `tink` 1.16.1 (`Aead.encrypt`) under the
    /// keyset of `crate::crypto::keyring::tink::tests::TWO_KEYS`: the first under the
    /// old key with associated data, the second under the primary.
    #[test]
    fn known_answers_from_python_tink() {
        let keyring =
            crate::crypto::keyring::tink::parse_json(crate::crypto::keyring::tink::tests::TWO_KEYS)
                .unwrap();
        let codec = TinkGcm::new(&keyring).unwrap();
        let old = hex::decode("013bbff8f28d7bbaf4577d59bf8b941e538e308975b01a83d21dc296faa765c31f840dedc2d6fb62d61ea7").unwrap();
        let opened = codec.open(&old, b"row-7").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (1_002_436_850, &b"old secret"[..])
        );
        let new = hex::decode("013536e43ef6934c9f9678060d35239305b2382477dc03b694dad3de447633638c05bc4e99fe1866436c22").unwrap();
        let opened = codec.open(&new, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (892_789_822, &b"new secret"[..])
        );
        assert_eq!(codec.target(), 892_789_822);
        assert_eq!(codec.key_hint(&new), Some(codec.target()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn open_inverts_seal(pt in proptest::collection::vec(any::<u8>(), 0..512), aad in proptest::collection::vec(any::<u8>(), 0..32)) {
            let codec = TinkGcm::new(&ring()).unwrap();
            let out = sealed(&codec, &pt, &aad);
            let opened = codec.open(&out, &aad).unwrap();
            prop_assert_eq!((opened.key, opened.plaintext.as_slice()), (NEW, pt.as_slice()));
        }

        #[test]
        fn arbitrary_bytes_give_a_typed_error(value in proptest::collection::vec(any::<u8>(), 0..128)) {
            let codec = TinkGcm::new(&ring()).unwrap();
            let err = codec.open(&value, b"").err();
            prop_assert!(matches!(err, Some(CodecError::Truncated | CodecError::UnknownKey | CodecError::AuthFailed)), "{:?}", err);
            let _ = codec.describe_prefix(&value);
        }

        #[test]
        fn arbitrary_bodies_under_a_known_prefix_give_a_typed_error(id in prop::sample::select(vec![OLD, NEW]), body in proptest::collection::vec(any::<u8>(), 0..96)) {
            let codec = TinkGcm::new(&ring()).unwrap();
            let mut value = prefix(id).to_vec();
            value.extend_from_slice(&body);
            let expected = if value.len() < OVERHEAD { CodecError::Truncated } else { CodecError::AuthFailed };
            prop_assert_eq!(codec.open(&value, b"").err(), Some(expected));
        }

        #[test]
        fn open_into_agrees_with_open_whatever_the_buffer_held(value in proptest::collection::vec(any::<u8>(), 0..96), junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let codec = TinkGcm::new(&ring()).unwrap();
            let mut buf = junk;
            prop_assert_eq!(codec.open_into(&value, b"", &mut buf).err(), codec.open(&value, b"").err());
        }

        #[test]
        fn any_flipped_bit_is_refused(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<prop::sample::Index>()) {
            let codec = TinkGcm::new(&ring()).unwrap();
            let mut out = sealed(&codec, &pt, b"");
            let i = bit.index(out.len() * 8);
            out[i / 8] ^= 1 << (i % 8);
            // A flip in the prefix names another (unknown) key; anywhere else the tag fails.
            let expected = if i < PREFIX_LEN * 8 { CodecError::UnknownKey } else { CodecError::AuthFailed };
            prop_assert_eq!(codec.open(&out, b"").err(), Some(expected));
        }
    }
}
