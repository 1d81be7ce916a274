//! Tink keysets: parsed as Tink writes them, refused without echoing key bytes.

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
    assert_eq!(
        ring.keys().map(Key::id).collect::<Vec<_>>(),
        vec![892_789_822, 1_002_436_850]
    );
    let old = ring.get(1_002_436_850).unwrap();
    assert_eq!(&old.material()[..4], &[0x38, 0x8e, 0x66, 0xc8]);
}

#[test]
fn refuses_aes128_keys_naming_the_key() {
    let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES128_VALUE, "TINK", "ENABLED")).unwrap_err();
    assert_eq!(
        err,
        TinkKeysetError::UnsupportedKeySize {
            key_id: 7,
            bytes: 16
        }
    );
    assert!(err.to_string().contains("key 7"));
}

#[test]
fn refuses_other_output_prefixes() {
    for prefix in ["RAW", "LEGACY", "CRUNCHY"] {
        let err =
            parse_json(&one_key(AES_GCM_TYPE_URL, AES256_VALUE, prefix, "ENABLED")).unwrap_err();
        assert_eq!(
            err,
            TinkKeysetError::UnsupportedPrefix {
                key_id: 7,
                prefix: prefix.into()
            }
        );
    }
}

#[test]
fn refuses_other_key_types() {
    let siv = "type.googleapis.com/google.crypto.tink.AesGcmSivKey";
    let err = parse_json(&one_key(siv, AES256_VALUE, "TINK", "ENABLED")).unwrap_err();
    assert!(
        matches!(err, TinkKeysetError::UnsupportedKeyType { key_id: 7, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("AesGcmSivKey"));
}

#[test]
fn leaves_out_disabled_keys_but_needs_an_enabled_primary() {
    let err = parse_json(&one_key(AES_GCM_TYPE_URL, AES256_VALUE, "TINK", "DISABLED")).unwrap_err();
    assert_eq!(err, TinkKeysetError::PrimaryMissing(7));
    let err = parse_json(&one_key(
        AES_GCM_TYPE_URL,
        AES256_VALUE,
        "TINK",
        "SOMETIMES",
    ))
    .unwrap_err();
    assert_eq!(
        err,
        TinkKeysetError::UnknownStatus {
            key_id: 7,
            status: "SOMETIMES".into()
        }
    );
    let disabled_old = TWO_KEYS.replacen("\"ENABLED\"", "\"DISABLED\"", 1);
    let ring = parse_json(&disabled_old).unwrap();
    assert_eq!(
        ring.keys().map(Key::id).collect::<Vec<_>>(),
        vec![892_789_822]
    );
}

#[test]
fn refuses_malformed_keysets_without_echoing_key_bytes() {
    assert!(matches!(
        parse_json("{not json"),
        Err(TinkKeysetError::Json { line: 1, .. })
    ));
    assert_eq!(
        parse_json("{}").unwrap_err(),
        TinkKeysetError::Field {
            field: "primaryKeyId",
            key_id: None
        }
    );
    let duplicate = TWO_KEYS.replace("892789822", "1002436850");
    assert_eq!(
        parse_json(&duplicate).unwrap_err(),
        TinkKeysetError::DuplicateKeyId(1_002_436_850)
    );
    // Key bytes in a field of the wrong type are not repeated in the error.
    let misplaced = TWO_KEYS.replacen("1002436850", &format!("\"{AES256_VALUE}\""), 1);
    let err = parse_json(&misplaced).unwrap_err();
    assert_eq!(
        err,
        TinkKeysetError::Field {
            field: "keyId",
            key_id: None
        }
    );
    assert!(!format!("{err} {err:?}").contains("GiA4"));
    let truncated = one_key(AES_GCM_TYPE_URL, "GiA4jmbI", "TINK", "ENABLED");
    let err = parse_json(&truncated).unwrap_err();
    assert_eq!(
        err,
        TinkKeysetError::MalformedKey {
            key_id: 7,
            problem: "truncated field"
        }
    );
    assert!(!format!("{err} {err:?}").contains("GiA4"));
    let too_big = TWO_KEYS.replace("892789822", "4294967296");
    assert!(matches!(
        parse_json(&too_big),
        Err(TinkKeysetError::KeyIdRange {
            field: "primaryKeyId",
            ..
        })
    ));
}

#[test]
fn reads_negative_ids_as_java_tink_does() {
    let ring = parse_json(&TWO_KEYS.replace("1002436850", "-1")).unwrap();
    assert!(ring.get(u32::MAX).is_some());
}

#[test]
fn decodes_the_aes_gcm_key_protobuf() {
    let mut proto = vec![
        0x08, 0x00, 0x12, 0x02, 0x10, 0x20, 0x1a, 0x03, 1, 2, 3, 0x25, 0, 0, 0, 0,
    ];
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
    let proto = (
        0u8..3,
        prop::sample::select(vec![16usize, 24, 32, 33]),
        proptest::collection::vec(any::<u8>(), 33),
    )
        .prop_map(|(version, len, bytes)| {
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
        text_field(&[
            AES_GCM_TYPE_URL,
            "type.googleapis.com/google.crypto.tink.AesGcmSivKey",
        ]),
        text_field(&["SYMMETRIC", "REMOTE"]),
        text_field(&["TINK", "RAW", "LEGACY"]),
        key_value(),
    )
        .prop_map(|(id, status, type_url, material_type, prefix, value)| {
            let mut data = serde_json::Map::new();
            let mut entry = serde_json::Map::new();
            for (name, field) in [
                ("typeUrl", type_url),
                ("keyMaterialType", material_type),
                ("value", value),
            ] {
                if let Some(v) = field {
                    data.insert(name.into(), v);
                }
            }
            entry.insert("keyData".into(), Value::Object(data));
            for (name, field) in [
                ("keyId", id),
                ("status", status),
                ("outputPrefixType", prefix),
            ] {
                if let Some(v) = field {
                    entry.insert(name.into(), v);
                }
            }
            Value::Object(entry)
        })
}

/// Every `keyData.value` string of a keyset.
fn key_values(keyset: &Value) -> Vec<String> {
    let entries = keyset
        .get("key")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    entries
        .iter()
        .filter_map(|e| {
            e.pointer("/keyData/value")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
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
