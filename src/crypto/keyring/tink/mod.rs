//! Tink cleartext JSON keysets: the keys of the `tink-gcm` format.
//!
//! Applications on Google Tink keep their AEAD keys in a keyset; the
//! cleartext JSON form is what `cleartext_keyset_handle.write(
//! tink.JsonKeysetWriter(...))` (Python) or `CleartextKeysetHandle.write`
//! (Java) produce:
//!
//! ```json
//! {"primaryKeyId": 892789822, "key": [{"keyData": {
//!     "typeUrl": "type.googleapis.com/google.crypto.tink.AesGcmKey",
//!     "value": "<base64 of a serialized AesGcmKey>", "keyMaterialType": "SYMMETRIC"},
//!   "status": "ENABLED", "keyId": 892789822, "outputPrefixType": "TINK"}]}
//! ```
//!
//! [`parse_json`] turns one into a [`Keyring`] whose ids are Tink's key ids
//! and whose current key is the keyset's primary. The serialized `AesGcmKey`
//! protobuf is decoded by hand: `uint32 version = 1` (must be 0) and
//! `bytes key_value = 3` (Tink's `aes_gcm.proto`; field 2, once the params,
//! is unused), other fields skipped. Only what `tink-gcm` can use is
//! accepted: ENABLED 32-byte AES-GCM keys with the TINK output prefix. Keys
//! that are DISABLED or DESTROYED are left out, as Tink itself never decrypts
//! with them. Errors name key ids and what is unsupported, never key bytes;
//! the decoded JSON is wiped once read.

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use super::{Key, KeyId, Keyring, KeyringError, KEY_LEN};

/// The type URL of Tink's AES-GCM keys.
pub const AES_GCM_TYPE_URL: &str = "type.googleapis.com/google.crypto.tink.AesGcmKey";

/// Why a Tink keyset was refused. Names key ids and fields, never key bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TinkKeysetError {
    /// The text is not JSON.
    #[error("the Tink keyset is not valid JSON (line {line}, column {column})")]
    Json {
        /// Line of the first error, from 1.
        line: usize,
        /// Column of the first error, from 1.
        column: usize,
    },
    /// A required field is absent or has the wrong JSON type.
    #[error("the Tink keyset has no valid {field}{}", key_context(*.key_id))]
    Field {
        /// The field's JSON name (e.g. `primaryKeyId`, `keyData.value`).
        field: &'static str,
        /// The key the field belongs to, when it is known.
        key_id: Option<KeyId>,
    },
    /// A `keyId` or `primaryKeyId` outside Tink's 32-bit range.
    #[error("the Tink keyset's {field} {value} is not a 32-bit key id")]
    KeyIdRange {
        /// The field's JSON name.
        field: &'static str,
        /// The number found.
        value: String,
    },
    /// Two keys share an id.
    #[error("the Tink keyset holds key id {0} twice")]
    DuplicateKeyId(KeyId),
    /// A key's status is none of ENABLED, DISABLED, DESTROYED.
    #[error("Tink key {key_id}: unknown status {status:?}")]
    UnknownStatus {
        /// The key.
        key_id: KeyId,
        /// The status found.
        status: String,
    },
    /// A key is not an AES-GCM key (e.g. AES-GCM-SIV, AES-CTR-HMAC, ChaCha20-Poly1305).
    #[error("Tink key {key_id}: key type {type_url} ({material_type}) is not supported; rekey's tink-gcm format reads only {AES_GCM_TYPE_URL} (SYMMETRIC)")]
    UnsupportedKeyType {
        /// The key.
        key_id: KeyId,
        /// Its `keyData.typeUrl`.
        type_url: String,
        /// Its `keyData.keyMaterialType`.
        material_type: String,
    },
    /// A key's ciphertexts carry another output prefix than TINK.
    #[error("Tink key {key_id}: output prefix type {prefix} is not supported; rekey's tink-gcm format reads only TINK (0x01 + key id)")]
    UnsupportedPrefix {
        /// The key.
        key_id: KeyId,
        /// Its `outputPrefixType` (RAW, LEGACY, CRUNCHY, ...).
        prefix: String,
    },
    /// An AES-GCM key that is not AES-256 (Tink's AES128_GCM template makes 16-byte keys).
    #[error("Tink key {key_id}: a {bytes}-byte AES-GCM key is not supported; only 32-byte (AES-256-GCM) keys are")]
    UnsupportedKeySize {
        /// The key.
        key_id: KeyId,
        /// Its length in bytes.
        bytes: usize,
    },
    /// An `AesGcmKey` of a version other than 0.
    #[error("Tink key {key_id}: AesGcmKey version {version} is not supported (only 0)")]
    UnsupportedVersion {
        /// The key.
        key_id: KeyId,
        /// The version found.
        version: u64,
    },
    /// `keyData.value` is not base64 of a well-formed `AesGcmKey` protobuf.
    #[error("Tink key {key_id}: keyData.value is not a valid serialized AesGcmKey ({problem})")]
    MalformedKey {
        /// The key.
        key_id: KeyId,
        /// What is wrong, in words.
        problem: &'static str,
    },
    /// The primary key is not among the ENABLED keys.
    #[error("the Tink keyset's primary key {0} is not an ENABLED key of the keyset")]
    PrimaryMissing(KeyId),
    /// The keys are valid but cannot form a keyring (none enabled, or two share material).
    #[error("the Tink keyset's keys do not form a keyring: {0}")]
    Keyring(#[from] KeyringError),
}

/// " for key N" when the key is known, for [`TinkKeysetError::Field`].
fn key_context(key_id: Option<KeyId>) -> String {
    key_id
        .map(|id| format!(" for key {id}"))
        .unwrap_or_default()
}

/// Parses a Tink cleartext JSON keyset into a keyring whose current key is
/// the keyset's primary (no pending key).
pub fn parse_json(json: &str) -> Result<Keyring, TinkKeysetError> {
    let mut value: Value = serde_json::from_str(json).map_err(|e| TinkKeysetError::Json {
        line: e.line(),
        column: e.column(),
    })?;
    let parsed = keyring_from(&value);
    wipe(&mut value);
    parsed
}

/// Zeroes every string of a JSON tree (the key material is in `keyData.value`).
fn wipe(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(wipe),
        Value::Object(map) => map.values_mut().for_each(wipe),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The keyring of a parsed keyset: its ENABLED keys, current = primary.
fn keyring_from(keyset: &Value) -> Result<Keyring, TinkKeysetError> {
    let primary = key_id(keyset.get("primaryKeyId"), "primaryKeyId", None)?;
    let entries = keyset
        .get("key")
        .and_then(Value::as_array)
        .ok_or(TinkKeysetError::Field {
            field: "key",
            key_id: None,
        })?;
    let mut keys: Vec<Key> = Vec::with_capacity(entries.len());
    let mut seen: Vec<KeyId> = Vec::with_capacity(entries.len());
    for entry in entries {
        let id = key_id(entry.get("keyId"), "keyId", None)?;
        if seen.contains(&id) {
            return Err(TinkKeysetError::DuplicateKeyId(id));
        }
        seen.push(id);
        if let Some(key) = key_from(entry, id)? {
            keys.push(key);
        }
    }
    if !keys.iter().any(|k| k.id() == primary) {
        return Err(TinkKeysetError::PrimaryMissing(primary));
    }
    Ok(Keyring::new(keys, primary, None)?)
}

/// A Tink key id: a JSON number in `uint32` range. Negative numbers down to
/// -2^31 are read as their two's complement, as Java Tink's reader does for
/// keysets written by old Java versions.
fn key_id(
    value: Option<&Value>,
    field: &'static str,
    key_id: Option<KeyId>,
) -> Result<KeyId, TinkKeysetError> {
    let number = value
        .and_then(Value::as_number)
        .ok_or(TinkKeysetError::Field { field, key_id })?;
    let out_of_range = || TinkKeysetError::KeyIdRange {
        field,
        value: number.to_string(),
    };
    match (number.as_u64(), number.as_i64()) {
        (Some(n), _) => KeyId::try_from(n).map_err(|_| out_of_range()),
        (None, Some(n)) => i32::try_from(n)
            .map(|n| n as KeyId)
            .map_err(|_| out_of_range()),
        (None, None) => Err(out_of_range()),
    }
}

/// The string at `path` under `value`, or a [`TinkKeysetError::Field`] naming `field`.
fn text<'a>(
    value: &'a Value,
    path: &[&str],
    field: &'static str,
    key_id: KeyId,
) -> Result<&'a str, TinkKeysetError> {
    path.iter()
        .try_fold(value, |v, name| v.get(name))
        .and_then(Value::as_str)
        .ok_or(TinkKeysetError::Field {
            field,
            key_id: Some(key_id),
        })
}

/// One keyset entry as a key, `None` for a DISABLED or DESTROYED one.
fn key_from(entry: &Value, id: KeyId) -> Result<Option<Key>, TinkKeysetError> {
    match text(entry, &["status"], "status", id)? {
        "ENABLED" => {}
        "DISABLED" | "DESTROYED" => return Ok(None),
        other => {
            return Err(TinkKeysetError::UnknownStatus {
                key_id: id,
                status: other.to_owned(),
            })
        }
    }
    let type_url = text(entry, &["keyData", "typeUrl"], "keyData.typeUrl", id)?;
    let material_type = text(
        entry,
        &["keyData", "keyMaterialType"],
        "keyData.keyMaterialType",
        id,
    )?;
    if type_url != AES_GCM_TYPE_URL || material_type != "SYMMETRIC" {
        return Err(TinkKeysetError::UnsupportedKeyType {
            key_id: id,
            type_url: type_url.to_owned(),
            material_type: material_type.to_owned(),
        });
    }
    let prefix = text(entry, &["outputPrefixType"], "outputPrefixType", id)?;
    if prefix != "TINK" {
        return Err(TinkKeysetError::UnsupportedPrefix {
            key_id: id,
            prefix: prefix.to_owned(),
        });
    }
    let encoded = text(entry, &["keyData", "value"], "keyData.value", id)?;
    let malformed = |problem| TinkKeysetError::MalformedKey {
        key_id: id,
        problem,
    };
    let proto = Zeroizing::new(
        STANDARD
            .decode(encoded)
            .or_else(|_| URL_SAFE.decode(encoded))
            .map_err(|_| malformed("not base64"))?,
    );
    let (version, material) = decode_aes_gcm_key(&proto).map_err(malformed)?;
    if version != 0 {
        return Err(TinkKeysetError::UnsupportedVersion {
            key_id: id,
            version,
        });
    }
    let material: &[u8; KEY_LEN] =
        material
            .try_into()
            .map_err(|_| TinkKeysetError::UnsupportedKeySize {
                key_id: id,
                bytes: material.len(),
            })?;
    Ok(Some(Key::new(id, *material)))
}

/// Decodes a serialized `AesGcmKey` into (version, key_value), skipping
/// fields it does not know. The key bytes are borrowed from `proto`.
fn decode_aes_gcm_key(proto: &[u8]) -> Result<(u64, &[u8]), &'static str> {
    let mut rest = proto;
    let mut version = 0;
    let mut key_value = None;
    while !rest.is_empty() {
        let tag = varint(&mut rest)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => version = varint(&mut rest)?,
            (3, 2) => key_value = Some(length_delimited(&mut rest)?),
            (0, _) => return Err("field number 0"),
            (_, 0) => {
                varint(&mut rest)?;
            }
            (_, 1) => rest = rest.get(8..).ok_or("truncated field")?,
            (_, 2) => {
                length_delimited(&mut rest)?;
            }
            (_, 5) => rest = rest.get(4..).ok_or("truncated field")?,
            _ => return Err("unsupported wire type"),
        }
    }
    Ok((version, key_value.ok_or("no key_value")?))
}

/// Reads one base-128 varint (at most 10 bytes) off the front of `rest`.
fn varint(rest: &mut &[u8]) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for (i, &byte) in rest.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Ok(value);
        }
    }
    Err("malformed varint")
}

/// Reads a length-prefixed byte string off the front of `rest`.
fn length_delimited<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], &'static str> {
    let len = usize::try_from(varint(rest)?).map_err(|_| "length out of range")?;
    if len > rest.len() {
        return Err("truncated field");
    }
    let (field, tail) = rest.split_at(len);
    *rest = tail;
    Ok(field)
}

#[cfg(test)]
pub(crate) mod tests;
