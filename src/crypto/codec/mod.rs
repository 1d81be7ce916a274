//! Ciphertext formats: pure functions from bytes to bytes, one file per format.
//!
//! A [`Codec`] opens a value under whichever key of its keyring made it and
//! seals plaintext under the keyring's target key. Codecs do no I/O and hold
//! prepared keys (expanded once, not per value), so the transform stage can
//! call them from any rayon thread.

pub mod fernet;
pub mod raw_gcm;
pub mod tink_gcm;
pub mod versioned_gcm;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::keyring::{KeyId, Keyring};

/// The ciphertext formats rekey reads and writes (README, "Formats and key sources").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// version byte | 12-byte nonce | AES-256-GCM ciphertext | 16-byte tag.
    VersionedGcm,
    /// Fernet token (0x80 | timestamp | IV | AES-128-CBC | HMAC-SHA256), base64url text.
    Fernet,
    /// Tink AES-GCM: 0x01 | 4-byte key id | 12-byte IV | AES-256-GCM ciphertext | 16-byte tag.
    TinkGcm,
    /// 12-byte nonce | AES-256-GCM ciphertext | 16-byte tag, no key id.
    RawGcm,
}

impl Format {
    /// The name used in job files.
    pub fn name(self) -> &'static str {
        match self {
            Format::VersionedGcm => "versioned-gcm",
            Format::Fernet => "fernet",
            Format::TinkGcm => "tink-gcm",
            Format::RawGcm => "raw-gcm",
        }
    }

    /// The highest key id a value of this format can name: versioned-gcm's
    /// version byte holds 1 to 255; the others name keys in four bytes or
    /// not at all.
    pub fn max_key_id(self) -> KeyId {
        match self {
            Format::VersionedGcm => KeyId::from(u8::MAX),
            Format::Fernet | Format::TinkGcm | Format::RawGcm => KeyId::MAX,
        }
    }

    /// Whether a value of this format labelled `id` could be under a key:
    /// versioned-gcm's version byte 0 is no key's (versions are 1 to 255).
    pub fn names_a_key(self, id: KeyId) -> bool {
        id <= self.max_key_id() && !(self == Format::VersionedGcm && id == 0)
    }

    /// Whether values are text already (Fernet tokens are base64url), so a
    /// `text` column holds them as they are.
    pub fn is_text(self) -> bool {
        matches!(self, Format::Fernet)
    }

    /// Whether each value is sealed under a random 96-bit GCM nonce, so one key
    /// may seal at most 2^32 values (README, Guarantees 7). Fernet's random CBC IVs carry no such limit.
    pub fn random_nonces(self) -> bool {
        !matches!(self, Format::Fernet)
    }

    /// Prepares a codec for this format over `keyring`.
    pub fn codec(self, keyring: &Keyring) -> Result<Arc<dyn Codec>, FormatKeyError> {
        match self {
            Format::VersionedGcm => Ok(Arc::new(versioned_gcm::VersionedGcm::new(keyring)?)),
            Format::Fernet => Ok(Arc::new(fernet::Fernet::new(keyring)?)),
            Format::TinkGcm => Ok(Arc::new(tink_gcm::TinkGcm::new(keyring)?)),
            Format::RawGcm => Ok(Arc::new(raw_gcm::RawGcm::new(keyring)?)),
        }
    }
}

/// A keyring that a format cannot use (e.g. a key id that does not fit its version byte).
#[derive(Debug, thiserror::Error)]
#[error("format {format}: {problem}")]
pub struct FormatKeyError {
    /// The format's name.
    pub format: &'static str,
    /// What is wrong with the keyring for it.
    pub problem: String,
}

/// Why a value could not be opened. Names the failure, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CodecError {
    /// Shorter than the format's fixed overhead.
    #[error("value is truncated")]
    Truncated,
    /// Its key id names no key of the keyring.
    #[error("value names a key id the keyring does not hold")]
    UnknownKey,
    /// The authentication tag did not verify under the key it names (wrong key or tampered).
    #[error("authentication failed (wrong key or tampered value)")]
    AuthFailed,
    /// A text column holds something that is not base64.
    #[error("value is not valid base64")]
    BadEncoding,
    /// A freshly sealed value did not open back to the same plaintext. Never expected.
    #[error("re-encrypted value did not verify")]
    VerifyMismatch,
    /// A search hash that is no hash key's HMAC of its row's plaintext (or
    /// stands beside no ciphertext): left untouched, never overwritten.
    #[error("search hash matches no hash key for its plaintext")]
    HashMismatch,
}

impl CodecError {
    /// The stable name stored in `rekey.quarantine.error_kind`.
    pub fn kind(self) -> &'static str {
        match self {
            CodecError::Truncated => "truncated",
            CodecError::UnknownKey => "unknown_key",
            CodecError::AuthFailed => "auth_failed",
            CodecError::BadEncoding => "bad_encoding",
            CodecError::VerifyMismatch => "verify_mismatch",
            CodecError::HashMismatch => "hash_mismatch",
        }
    }
}

/// A value opened: which key made it, and the plaintext (wiped on drop).
pub struct Opened {
    /// The key that authenticated the value.
    pub key: KeyId,
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// When the value was made, where the format records it (Fernet); a
    /// rewrite keeps it.
    pub timestamp: Option<u64>,
}

/// One ciphertext format bound to one keyring.
pub trait Codec: Send + Sync {
    /// The key id a value claims without decrypting it, where the format carries one.
    fn key_hint(&self, value: &[u8]) -> Option<KeyId>;

    /// Decrypts and authenticates `value` with the key that made it.
    fn open(&self, value: &[u8], aad: &[u8]) -> Result<Opened, CodecError>;

    /// Opens `value` into `plaintext` (cleared first, its capacity reused),
    /// returning the key and timestamp: [`Codec::open`] without an allocation
    /// per value. The caller wipes `plaintext` when done; on error its
    /// contents are unspecified (and must be wiped too).
    fn open_into(
        &self,
        value: &[u8],
        aad: &[u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<(KeyId, Option<u64>), CodecError> {
        let opened = self.open(value, aad)?;
        plaintext.clear();
        plaintext.extend_from_slice(&opened.plaintext);
        Ok((opened.key, opened.timestamp))
    }

    /// Encrypts `plaintext` under the target key into `out` (cleared first).
    /// `timestamp` is the original value's, for formats that record one
    /// (`None`: now).
    fn seal(&self, plaintext: &[u8], aad: &[u8], timestamp: Option<u64>, out: &mut Vec<u8>);

    /// The id new values are sealed under.
    fn target(&self) -> KeyId;

    /// The leading bytes every value sealed under `key` starts with, where the
    /// format has such a prefix: lets SQL count keys and skip current values.
    fn key_prefix(&self, key: KeyId) -> Option<Vec<u8>>;

    /// A readable name for a key prefix found in the data (`plan`, `verify`).
    fn describe_prefix(&self, prefix: &[u8]) -> String;

    /// A readable name for a key of the keyring (`verify`'s `by_key`).
    fn key_label(&self, key: KeyId) -> String {
        match self.key_prefix(key) {
            Some(p) => self.describe_prefix(&p),
            None => format!("key {key}"),
        }
    }

    /// Whether the format can bind associated data (Fernet cannot).
    fn supports_aad(&self) -> bool {
        true
    }
}
