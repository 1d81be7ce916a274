//! Search hashes (blind indexes): a keyed HMAC of a plaintext, stored beside
//! its ciphertext so an application can look rows up by value without
//! decrypting. A hash key can only be rotated by someone holding the
//! plaintext; a rotation run holds it for a moment, so it rehashes here.
//!
//! Pure: no I/O. Keys come from a [`Keyring`] (the same stores as the
//! ciphertext keys); each key's HMAC state is expanded once and wiped on drop.

use std::fmt;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2_hmac::Sha256;

use super::keyring::{KeyId, Keyring};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of an HMAC-SHA256 output.
pub const HMAC_SHA256_LEN: usize = 32;

/// The longest stored form: all 32 bytes as hex (base64 takes 44).
const STORED_MAX: usize = 2 * HMAC_SHA256_LEN;

/// The keyed hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashAlgorithm {
    /// HMAC with SHA-256 (RFC 2104), what Python's `hmac.new(key, msg, "sha256")` computes.
    HmacSha256,
}

/// How a hash is stored in its column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashOutput {
    /// Lowercase hex text (Python's `hexdigest()`).
    #[default]
    Hex,
    /// The bytes themselves (`bytea`).
    Raw,
    /// Standard base64 with padding (Python's `base64.b64encode`).
    Base64,
}

impl HashOutput {
    /// The name as written in a job file.
    pub fn name(self) -> &'static str {
        match self {
            HashOutput::Hex => "hex",
            HashOutput::Raw => "raw",
            HashOutput::Base64 => "base64",
        }
    }
}

/// Why a hasher could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// `truncate` outside 1..=32.
    #[error(
        "truncate = {0} is out of range: an HMAC-SHA256 has 32 bytes, so truncate must be 1 to 32"
    )]
    Truncate(usize),
    /// The MAC refused a key (never expected: HMAC takes keys of any length).
    #[error("HMAC-SHA256 refused hash key {0}")]
    KeyRefused(KeyId),
}

/// Computes and recognises the search hashes of one column under every key
/// of a keyring; the target key (pending, else current) is the one written.
pub struct SearchHasher {
    /// One expanded HMAC state per key, target first.
    macs: Vec<(KeyId, HmacSha256)>,
    /// The key new hashes are written under.
    target: KeyId,
    /// How hashes are stored.
    output: HashOutput,
    /// Bytes of the MAC kept (the leading ones), before encoding.
    len: usize,
}

impl SearchHasher {
    /// A hasher over every key of `keyring`, writing under its target key.
    pub fn new(
        keyring: &Keyring,
        output: HashOutput,
        truncate: Option<usize>,
    ) -> Result<Self, HashError> {
        let len = truncate.unwrap_or(HMAC_SHA256_LEN);
        if len == 0 || len > HMAC_SHA256_LEN {
            return Err(HashError::Truncate(len));
        }
        let target = keyring.target().id();
        let mut macs = keyring
            .keys()
            .map(|k| {
                <HmacSha256 as KeyInit>::new_from_slice(k.material())
                    .map(|mac| (k.id(), mac))
                    .map_err(|_| HashError::KeyRefused(k.id()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        macs.sort_by_key(|(id, _)| (*id != target, *id));
        Ok(SearchHasher {
            macs,
            target,
            output,
            len,
        })
    }

    /// The key new hashes are written under.
    pub fn target(&self) -> KeyId {
        self.target
    }

    /// The stored form of the hash of `plaintext` under key `key`, if held.
    pub fn hash(&self, key: KeyId, plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.hash_into(key, plaintext, &mut out).then_some(out)
    }

    /// Appends the stored form of the hash of `plaintext` under key `key` to
    /// `out` (a run's buffer of new values); false, and nothing appended,
    /// when the key is not held.
    pub fn hash_into(&self, key: KeyId, plaintext: &[u8], out: &mut Vec<u8>) -> bool {
        match self.macs.iter().find(|(id, _)| *id == key) {
            Some((_, mac)) => {
                self.encode(mac, plaintext, |stored| out.extend_from_slice(stored));
                true
            }
            None => false,
        }
    }

    /// Which key's hash of `plaintext` `stored` is, in its exact stored form
    /// (the target key is tried first); `None` when no key's is.
    pub fn identify(&self, plaintext: &[u8], stored: &[u8]) -> Option<KeyId> {
        self.macs
            .iter()
            .find(|(_, mac)| self.encode(mac, plaintext, |mine| mine == stored))
            .map(|(id, _)| *id)
    }

    /// Hands `then` the stored form of the hash of `plaintext` under `mac`,
    /// encoded on the stack: a run hashes every row of a hashed column, and
    /// each hash is read once.
    fn encode<R>(&self, mac: &HmacSha256, plaintext: &[u8], then: impl FnOnce(&[u8]) -> R) -> R {
        let mut mac = mac.clone();
        mac.update(plaintext);
        let full = mac.finalize().into_bytes();
        let kept = &full[..self.len];
        let mut text = [0u8; STORED_MAX];
        match self.output {
            HashOutput::Raw => then(kept),
            HashOutput::Hex => {
                let hex = &mut text[..2 * kept.len()];
                hex::encode_to_slice(kept, hex).expect("a slice twice the bytes' length");
                then(hex)
            }
            HashOutput::Base64 => {
                let n = base64::engine::general_purpose::STANDARD
                    .encode_slice(kept, &mut text)
                    .expect("64 bytes hold 32 bytes in base64 (44)");
                then(&text[..n])
            }
        }
    }
}

impl fmt::Debug for SearchHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchHasher")
            .field(
                "keys",
                &self.macs.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .field("target", &self.target)
            .field("output", &self.output)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::Key;

    fn ring() -> Keyring {
        Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])], 1, Some(2)).unwrap()
    }

    #[test]
    fn matches_rfc_4231_test_case_2() {
        // RFC 4231 4.3: key "Jefe", data "what do ya want for nothing?"; a
        // 32-byte key is what a keyring holds, so check through the same MAC type.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn writes_under_the_pending_key_and_recognises_every_key() {
        let h = SearchHasher::new(&ring(), HashOutput::Hex, None).unwrap();
        assert_eq!(h.target(), 2);
        let old = h.hash(1, b"123-45-6789").unwrap();
        let new = h.hash(2, b"123-45-6789").unwrap();
        assert_ne!(old, new);
        assert_eq!(new.len(), 64);
        assert_eq!(h.identify(b"123-45-6789", &old), Some(1));
        assert_eq!(h.identify(b"123-45-6789", &new), Some(2));
        assert_eq!(h.identify(b"123-45-6780", &new), None);
        assert_eq!(h.identify(b"123-45-6789", &new.to_ascii_uppercase()), None);
    }

    #[test]
    fn truncates_before_encoding() {
        for (output, len) in [
            (HashOutput::Raw, 16),
            (HashOutput::Hex, 32),
            (HashOutput::Base64, 24),
        ] {
            let h = SearchHasher::new(&ring(), output, Some(16)).unwrap();
            assert_eq!(h.hash(2, b"x").unwrap().len(), len, "{output:?}");
        }
        let full = SearchHasher::new(&ring(), HashOutput::Raw, None).unwrap();
        let cut = SearchHasher::new(&ring(), HashOutput::Raw, Some(10)).unwrap();
        assert_eq!(
            full.hash(2, b"x").unwrap()[..10],
            cut.hash(2, b"x").unwrap()[..]
        );
        assert_eq!(
            SearchHasher::new(&ring(), HashOutput::Raw, Some(0)).err(),
            Some(HashError::Truncate(0))
        );
        assert!(SearchHasher::new(&ring(), HashOutput::Raw, Some(33)).is_err());
    }

    #[test]
    fn each_stored_form_is_the_mac_as_python_writes_it() {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&[2; 32]).unwrap();
        mac.update(b"123-45-6789");
        let full = mac.finalize().into_bytes();
        for (output, truncate, expected) in [
            (HashOutput::Raw, None, full.to_vec()),
            (HashOutput::Hex, None, hex::encode(full).into_bytes()),
            (
                HashOutput::Hex,
                Some(7),
                hex::encode(&full[..7]).into_bytes(),
            ),
            (
                HashOutput::Base64,
                None,
                base64::engine::general_purpose::STANDARD
                    .encode(full)
                    .into_bytes(),
            ),
            (
                HashOutput::Base64,
                Some(31),
                base64::engine::general_purpose::STANDARD
                    .encode(&full[..31])
                    .into_bytes(),
            ),
        ] {
            let h = SearchHasher::new(&ring(), output, truncate).unwrap();
            assert_eq!(h.hash(2, b"123-45-6789").unwrap(), expected, "{output:?}");
            assert_eq!(h.identify(b"123-45-6789", &expected), Some(2));
        }
    }

    #[test]
    fn a_hash_is_appended_after_what_the_buffer_holds_and_an_unheld_key_appends_nothing() {
        let h = SearchHasher::new(&ring(), HashOutput::Hex, None).unwrap();
        let mut out = b"before".to_vec();
        assert!(h.hash_into(2, b"123-45-6789", &mut out));
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], h.hash(2, b"123-45-6789").unwrap()[..]);
        assert!(!h.hash_into(3, b"123-45-6789", &mut out));
        assert_eq!(out.len(), 6 + 64);
    }

    #[test]
    fn debug_shows_ids_never_material() {
        let shown = format!(
            "{:?}",
            SearchHasher::new(&ring(), HashOutput::Hex, None).unwrap()
        );
        assert!(shown.contains("keys: [2, 1]"), "{shown}");
        assert!(
            !shown.contains("1, 1, 1") && !shown.contains("0101"),
            "{shown}"
        );
    }
}
