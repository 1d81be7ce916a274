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
    key_id.map(|id| format!(" for key {id}")).unwrap_or_default()
}

/// Parses a Tink cleartext JSON keyset into a keyring whose current key is
/// the keyset's primary (no pending key).
pub fn parse_json(json: &str) -> Result<Keyring, TinkKeysetError> {
    let mut value: Value =
        serde_json::from_str(json).map_err(|e| TinkKeysetError::Json { line: e.line(), column: e.column() })?;
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
    let entries = keyset.get("key").and_then(Value::as_array).ok_or(TinkKeysetError::Field { field: "key", key_id: None })?;
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
fn key_id(value: Option<&Value>, field: &'static str, key_id: Option<KeyId>) -> Result<KeyId, TinkKeysetError> {
    let number = value.and_then(Value::as_number).ok_or(TinkKeysetError::Field { field, key_id })?;
    let out_of_range = || TinkKeysetError::KeyIdRange { field, value: number.to_string() };
    match (number.as_u64(), number.as_i64()) {
        (Some(n), _) => KeyId::try_from(n).map_err(|_| out_of_range()),
        (None, Some(n)) => i32::try_from(n).map(|n| n as KeyId).map_err(|_| out_of_range()),
        (None, None) => Err(out_of_range()),
    }
}

/// The string at `path` under `value`, or a [`TinkKeysetError::Field`] naming `field`.
fn text<'a>(value: &'a Value, path: &[&str], field: &'static str, key_id: KeyId) -> Result<&'a str, TinkKeysetError> {
    path.iter()
        .try_fold(value, |v, name| v.get(name))
        .and_then(Value::as_str)
        .ok_or(TinkKeysetError::Field { field, key_id: Some(key_id) })
}

/// One keyset entry as a key, `None` for a DISABLED or DESTROYED one.
fn key_from(entry: &Value, id: KeyId) -> Result<Option<Key>, TinkKeysetError> {
    match text(entry, &["status"], "status", id)? {
        "ENABLED" => {}
        "DISABLED" | "DESTROYED" => return Ok(None),
        other => return Err(TinkKeysetError::UnknownStatus { key_id: id, status: other.to_owned() }),
    }
    let type_url = text(entry, &["keyData", "typeUrl"], "keyData.typeUrl", id)?;
    let material_type = text(entry, &["keyData", "keyMaterialType"], "keyData.keyMaterialType", id)?;
    if type_url != AES_GCM_TYPE_URL || material_type != "SYMMETRIC" {
        return Err(TinkKeysetError::UnsupportedKeyType {
            key_id: id,
            type_url: type_url.to_owned(),
            material_type: material_type.to_owned(),
        });
    }
    let prefix = text(entry, &["outputPrefixType"], "outputPrefixType", id)?;
    if prefix != "TINK" {
        return Err(TinkKeysetError::UnsupportedPrefix { key_id: id, prefix: prefix.to_owned() });
    }
    let encoded = text(entry, &["keyData", "value"], "keyData.value", id)?;
    let malformed = |problem| TinkKeysetError::MalformedKey { key_id: id, problem };
    let proto = Zeroizing::new(
        STANDARD.decode(encoded).or_else(|_| URL_SAFE.decode(encoded)).map_err(|_| malformed("not base64"))?,
    );
    let (version, material) = decode_aes_gcm_key(&proto).map_err(malformed)?;
    if version != 0 {
        return Err(TinkKeysetError::UnsupportedVersion { key_id: id, version });
    }
    let material: &[u8; KEY_LEN] =
        material.try_into().map_err(|_| TinkKeysetError::UnsupportedKeySize { key_id: id, bytes: material.len() })?;
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
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by Python `tink` 1.16.1: two AES256_GCM keys, the second primary.
    pub(crate) const TWO_KEYS: &str = r#"{
  "primaryKeyId": 892789822,
  "key": [
    {
      "keyData": {
        "typeUrl": "type.googleapis.com/google.crypto.tink.AesGcmKey",
        "value": "GiA4jmbI9CvQWCWk0sIhw2AoF+Dm8jrXASX2Osqle70KcA==",
        "keyMaterialType": "SYMMETRIC"
      },
      "status": "ENABLED",
      "keyId": 1002436850,
      "outputPrefixType": "TINK"
    },
    {
      "keyData": {
        "typeUrl": "type.googleapis.com/google.crypto.tink.AesGcmKey",
        "value": "GiA5oRMNinJs2zT9DQR4m9THQE/sd4794i5oChWglvZKqw==",
        "keyMaterialType": "SYMMETRIC"
      },
      "status": "ENABLED",
      "keyId": 892789822,
      "outputPrefixType": "TINK"
    }
  ]
}"#;

    /// One key of `tink` 1.16.1's given template, with id 7, primary.
    fn one_key(type_url: &str, value: &str, prefix: &str, status: &str) -> String {
        serde_json::json!({
            "primaryKeyId": 7,
            "key": [{
                "keyData": { "typeUrl": type_url, "value": value, "keyMaterialType": "SYMMETRIC" },
                "status": status, "keyId": 7, "outputPrefixType": prefix,
            }],
        })
        .to_string()
    }

    const AES256_VALUE: &str = "GiA4jmbI9CvQWCWk0sIhw2AoF+Dm8jrXASX2Osqle70KcA==";
    /// AES128_GCM from `tink` 1.16.1.
    const AES128_VALUE: &str = "GhA1ynw/ohOJlNMbDRZLr7bc";

    #[test]
    fn reads_a_keyset_written_by_python_tink() {
        let ring = parse_json(TWO_KEYS).unwrap();
        assert_eq!(ring.current_id(), 892_789_822);
        assert_eq!(ring.target().id(), 892_789_822);
        assert_eq!(ring.keys().map(Key::id).collect::<Vec<_>>(), vec![892_789_822, 1_002_436_850]);
        let old = ring.get(1_002_436_850).unwrap();
        assert_eq!(&old.material()[..4], &[0x38, 0x8e, 0x66, 0xc8]);
    }

    #[test]
    fn refuses_aes128_keys_naming_the_key() {
        let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES128_VALUE, "TINK", "ENABLED")).unwrap_err();
        assert_eq!(err, TinkKeysetError::UnsupportedKeySize { key_id: 7, bytes: 16 });
        assert!(err.to_string().contains("key 7"));
    }

    #[test]
    fn refuses_other_output_prefixes() {
        for prefix in ["RAW", "LEGACY", "CRUNCHY"] {
            let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES256_VALUE, prefix, "ENABLED")).unwrap_err();
            assert_eq!(err, TinkKeysetError::UnsupportedPrefix { key_id: 7, prefix: prefix.into() });
        }
    }

    #[test]
    fn refuses_other_key_types() {
        let siv = "type.googleapis.com/google.crypto.tink.AesGcmSivKey";
        let err = parse_json(&one_key(siv, AES256_VALUE, "TINK", "ENABLED")).unwrap_err();
        assert!(matches!(err, TinkKeysetError::UnsupportedKeyType { key_id: 7, .. }), "{err:?}");
        assert!(err.to_string().contains("AesGcmSivKey"));
    }

    #[test]
    fn leaves_out_disabled_keys_but_needs_an_enabled_primary() {
        let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES256_VALUE, "TINK", "DISABLED")).unwrap_err();
        assert_eq!(err, TinkKeysetError::PrimaryMissing(7));
        let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES256_VALUE, "TINK", "SOMETIMES")).unwrap_err();
        assert_eq!(err, TinkKeysetError::UnknownStatus { key_id: 7, status: "SOMETIMES".into() });
        let disabled_old = TWO_KEYS.replacen("\"ENABLED\"", "\"DISABLED\"", 1);
        let ring = parse_json(&disabled_old).unwrap();
        assert_eq!(ring.keys().map(Key::id).collect::<Vec<_>>(), vec![892_789_822]);
    }

    #[test]
    fn refuses_malformed_keysets_without_echoing_key_bytes() {
        assert!(matches!(parse_json("{not json"), Err(TinkKeysetError::Json { line: 1, .. })));
        assert_eq!(parse_json("{}").unwrap_err(), TinkKeysetError::Field { field: "primaryKeyId", key_id: None });
        let duplicate = TWO_KEYS.replace("892789822", "1002436850");
        assert_eq!(parse_json(&duplicate).unwrap_err(), TinkKeysetError::DuplicateKeyId(1_002_436_850));
        // Key bytes in a field of the wrong type are not repeated in the error.
        let misplaced = TWO_KEYS.replacen("1002436850", &format!("\"{AES256_VALUE}\""), 1);
        let err = parse_json(&misplaced).unwrap_err();
        assert_eq!(err, TinkKeysetError::Field { field: "keyId", key_id: None });
        assert!(!format!("{err} {err:?}").contains("GiA4"));
        let truncated = one_key(AES_GCM_TYPE_URL, "GiA4jmbI", "TINK", "ENABLED");
        let err = parse_json(&truncated).unwrap_err();
        assert_eq!(err, TinkKeysetError::MalformedKey { key_id: 7, problem: "truncated field" });
        assert!(!format!("{err} {err:?}").contains("GiA4"));
        let too_big = TWO_KEYS.replace("892789822", "4294967296");
        assert!(matches!(parse_json(&too_big), Err(TinkKeysetError::KeyIdRange { field: "primaryKeyId", .. })));
    }

    #[test]
    fn reads_negative_ids_as_java_tink_does() {
        let ring = parse_json(&TWO_KEYS.replace("1002436850", "-1")).unwrap();
        assert!(ring.get(u32::MAX).is_some());
    }

    #[test]
    fn decodes_the_aes_gcm_key_protobuf() {
        let mut proto = vec![0x08, 0x00, 0x12, 0x02, 0x10, 0x20, 0x1a, 0x03, 1, 2, 3, 0x25, 0, 0, 0, 0];
        assert_eq!(decode_aes_gcm_key(&proto), Ok((0, &[1u8, 2, 3][..])));
        proto[1] = 1;
        assert_eq!(decode_aes_gcm_key(&proto).map(|(v, _)| v), Ok(1));
        assert_eq!(decode_aes_gcm_key(&[0x08, 0x80]), Err("malformed varint"));
        assert_eq!(decode_aes_gcm_key(&[0x08, 0x00]), Err("no key_value"));
        assert_eq!(decode_aes_gcm_key(&[0x1a, 0x05, 1]), Err("truncated field"));
        assert_eq!(decode_aes_gcm_key(&[0x0b]), Err("unsupported wire type"));
    }

    /// A key id field as keysets hold them, and as they should not.
    fn id_field() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(Some(serde_json::json!(7))),
            Just(Some(serde_json::json!(8))),
            Just(Some(serde_json::json!(-1))),
            Just(Some(serde_json::json!(-2_147_483_649_i64))),
            Just(Some(serde_json::json!(4_294_967_296_u64))),
            Just(Some(serde_json::json!(u64::MAX))),
            Just(Some(serde_json::json!(7.5))),
            Just(Some(serde_json::json!("7"))),
            Just(Some(Value::Null)),
            Just(None),
        ]
    }

    /// A text field: one of the values that mean something, or anything.
    fn text_field(good: &'static [&'static str]) -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            4 => prop::sample::select(good).prop_map(|s| Some(Value::String(s.into()))),
            1 => "\\PC{0,12}".prop_map(|s| Some(Value::String(s))),
            1 => Just(Some(serde_json::json!(1))),
            1 => Just(None),
        ]
    }

    /// `keyData.value`: a well-formed `AesGcmKey` of some key size and
    /// version, arbitrary protobuf bytes, or text that is not base64.
    fn key_value() -> impl Strategy<Value = Option<Value>> {
        let proto = (0u8..3, prop::sample::select(vec![16usize, 24, 32, 33]), proptest::collection::vec(any::<u8>(), 33)).prop_map(|(version, len, bytes)| {
            let mut p = vec![0x08, version, 0x1a, len as u8];
            p.extend_from_slice(&bytes[..len.min(bytes.len())]);
            p
        });
        prop_oneof![
            4 => proto.prop_map(|p| Some(Value::String(STANDARD.encode(p)))),
            2 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(|p| Some(Value::String(URL_SAFE.encode(p)))),
            1 => "\\PC{0,20}".prop_map(|s| Some(Value::String(s))),
            1 => Just(None),
        ]
    }

    /// A keyset entry, fields left out where the strategy says `None`.
    fn entry() -> impl Strategy<Value = Value> {
        (
            id_field(),
            text_field(&["ENABLED", "DISABLED", "DESTROYED"]),
            text_field(&[AES_GCM_TYPE_URL, "type.googleapis.com/google.crypto.tink.AesGcmSivKey"]),
            text_field(&["SYMMETRIC", "REMOTE"]),
            text_field(&["TINK", "RAW", "LEGACY"]),
            key_value(),
        )
            .prop_map(|(id, status, type_url, material_type, prefix, value)| {
                let mut data = serde_json::Map::new();
                let mut entry = serde_json::Map::new();
                for (name, field) in [("typeUrl", type_url), ("keyMaterialType", material_type), ("value", value)] {
                    if let Some(v) = field {
                        data.insert(name.into(), v);
                    }
                }
                entry.insert("keyData".into(), Value::Object(data));
                for (name, field) in [("keyId", id), ("status", status), ("outputPrefixType", prefix)] {
                    if let Some(v) = field {
                        entry.insert(name.into(), v);
                    }
                }
                Value::Object(entry)
            })
    }

    /// Every `keyData.value` string of a keyset.
    fn key_values(keyset: &Value) -> Vec<String> {
        let entries = keyset.get("key").and_then(Value::as_array).cloned().unwrap_or_default();
        entries.iter().filter_map(|e| e.pointer("/keyData/value").and_then(Value::as_str).map(str::to_owned)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_protobuf_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_aes_gcm_key(&bytes);
        }

        #[test]
        fn arbitrary_text_gives_a_keyring_or_a_typed_error(text in "\\PC{0,200}") {
            prop_assert!(parse_json(&text).is_err());
        }

        #[test]
        fn keyset_shaped_json_gives_a_keyring_or_an_error_without_key_bytes(primary in id_field(), entries in proptest::collection::vec(entry(), 0..4)) {
            let mut keyset = serde_json::Map::new();
            if let Some(p) = primary {
                keyset.insert("primaryKeyId".into(), p);
            }
            keyset.insert("key".into(), Value::Array(entries));
            let keyset = Value::Object(keyset);
            match parse_json(&keyset.to_string()) {
                Ok(ring) => {
                    prop_assert_eq!(Some(ring.current_id()), keyset["primaryKeyId"].as_i64().map(|id| id as KeyId));
                    prop_assert!(ring.keys().all(|k| k.material().len() == KEY_LEN));
                }
                Err(err) => {
                    let shown = format!("{err} {err:?}");
                    for value in key_values(&keyset).iter().filter(|v| v.len() >= 8) {
                        prop_assert!(!shown.contains(value.as_str()), "{} repeats a key value", shown);
                    }
                }
            }
        }
    }
}
