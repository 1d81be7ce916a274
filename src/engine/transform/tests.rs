//! Tests of the transform: arbitrary input fails with a typed error, a
//! rewrite opens to its plaintext, and a faulty encryptor never reaches the sink.

use super::*;
use crate::crypto::codec::Format;
use crate::crypto::keyring::{Key, Keyring};
use crate::job::catalog::{TableColumn, TableRef};
use crate::job::Column;
use crate::job::Side;
use proptest::prelude::*;

const FORMATS: [Format; 4] = [
    Format::VersionedGcm,
    Format::Fernet,
    Format::TinkGcm,
    Format::RawGcm,
];

/// Key 1 only: how old values were written.
fn old_ring() -> Keyring {
    Keyring::new(vec![Key::new(1, [1; 32])], 1, None).unwrap()
}

/// Keys 1 and 2, target 2: the rotation.
fn new_ring() -> Keyring {
    Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])], 1, Some(2)).unwrap()
}

fn side(format: Format, keyring: Keyring) -> Side {
    Side {
        format,
        codec: format.codec(&keyring).unwrap(),
        keyring,
        source: None,
    }
}

/// One encrypted column `c` stored with `encoding`, read in `from`, written in `to`.
fn target(from: Format, to: Format, encoding: Encoding) -> Target {
    let type_name = if encoding == Encoding::Raw && from != Format::Fernet {
        "bytea"
    } else {
        "text"
    };
    Target {
        index: 0,
        table: TableRef {
            schema: "public".into(),
            name: "t".into(),
        },
        oid: 0,
        key: vec![TableColumn {
            name: "id".into(),
            type_name: "bigint".into(),
        }],
        columns: vec![Column {
            name: "c".into(),
            type_name: type_name.into(),
            read: encoding,
            write: encoding,
        }],
        hash: None,
        read: side(from, new_ring()),
        write: side(to, new_ring()),
        migrating: from != to,
        aad: Aad::None,
        filter: None,
        after_triggers: false,
        update_triggers: false,
        reads_labelled: false,
        cautions: Vec::new(),
    }
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop::sample::select(vec![Encoding::Raw, Encoding::Base64])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_stored_bytes_are_failed_with_a_typed_error_never_rewritten(
        from in prop::sample::select(FORMATS.to_vec()),
        to in prop::sample::select(FORMATS.to_vec()),
        encoding in encoding(),
        stored in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let target = target(from, to, encoding);
        let mut out = Vec::new();
        let cell = rewrite_value(&target, 0, &stored, b"", &mut out);
        prop_assert!(matches!(cell, Cell::Failed(CodecError::Truncated | CodecError::UnknownKey | CodecError::AuthFailed | CodecError::BadEncoding)), "{:?}", cell);
        prop_assert!(out.is_empty());
        let seen = classify_value(&target, 0, &stored, b"");
        prop_assert!(matches!(seen, Cell::Failed(_)), "{:?}", seen);
    }

    #[test]
    fn arbitrary_base64_text_is_failed_with_a_typed_error(format in prop::sample::select(FORMATS.to_vec()), text in "[A-Za-z0-9+/=]{0,120}") {
        let cell = rewrite_value(&target(format, format, Encoding::Base64), 0, text.as_bytes(), b"", &mut Vec::new());
        prop_assert!(matches!(cell, Cell::Failed(CodecError::Truncated | CodecError::UnknownKey | CodecError::AuthFailed | CodecError::BadEncoding)), "{:?}", cell);
    }

    #[test]
    fn a_value_under_the_old_key_is_rewritten_to_one_that_opens_to_its_plaintext(
        from in prop::sample::select(FORMATS.to_vec()),
        to in prop::sample::select(FORMATS.to_vec()),
        encoding in encoding(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let target = target(from, to, encoding);
        let mut sealed = Vec::new();
        from.codec(&old_ring()).unwrap().seal(&plaintext, b"", Some(1_700_000_000), &mut sealed);
        let mut stored = Vec::new();
        encode_into(encoding, &sealed, &mut stored).unwrap();
        // appended after what the buffer holds already
        let mut out = b"earlier".to_vec();
        let Cell::Rewritten(span) = rewrite_value(&target, 0, &stored, b"", &mut out) else {
            return Err(TestCaseError::fail("not rewritten"));
        };
        prop_assert!(out.starts_with(b"earlier"));
        let new = span.of(&out).to_vec();
        let opened = target.write.codec.open(&decode(encoding, &new).unwrap(), b"").unwrap();
        prop_assert_eq!((opened.key, opened.plaintext.as_slice()), (2, plaintext.as_slice()));
        prop_assert_eq!(rewrite_value(&target, 0, &new, b"", &mut out), Cell::Current);
    }
}

/// A faulty encryptor: seals through a real codec, then `damage` spoils the result.
struct Faulty {
    inner: std::sync::Arc<dyn Codec>,
    damage: fn(&mut Vec<u8>),
}

impl Codec for Faulty {
    fn key_hint(&self, value: &[u8]) -> Option<crate::crypto::keyring::KeyId> {
        self.inner.key_hint(value)
    }
    fn open(&self, value: &[u8], aad: &[u8]) -> Result<crate::crypto::codec::Opened, CodecError> {
        self.inner.open(value, aad)
    }
    fn seal(&self, plaintext: &[u8], aad: &[u8], timestamp: Option<u64>, out: &mut Vec<u8>) {
        self.inner.seal(plaintext, aad, timestamp, out);
        (self.damage)(out);
    }
    fn target(&self) -> crate::crypto::keyring::KeyId {
        self.inner.target()
    }
    fn key_prefix(&self, key: crate::crypto::keyring::KeyId) -> Option<Vec<u8>> {
        self.inner.key_prefix(key)
    }
    fn describe_prefix(&self, prefix: &[u8]) -> String {
        self.inner.describe_prefix(prefix)
    }
}

#[test]
fn a_ciphertext_that_does_not_open_to_the_same_plaintext_is_never_handed_to_the_sink() {
    let read = Format::VersionedGcm.codec(&old_ring()).unwrap();
    let mut old = Vec::new();
    read.seal(b"+15551234567", b"", None, &mut old);
    let damages: [fn(&mut Vec<u8>); 3] = [
        |v| {
            let last = v.len() - 1;
            v[last] ^= 1; // a broken tag
        },
        |v| v.truncate(v.len() / 2), // a short write
        |v| {
            let n = v.len();
            v[n - 20] ^= 0x40; // a flipped ciphertext bit
        },
    ];
    for damage in damages {
        let write = Faulty {
            inner: Format::VersionedGcm.codec(&new_ring()).unwrap(),
            damage,
        };
        let reader = Format::VersionedGcm.codec(&new_ring()).unwrap();
        let mut handed = false;
        let emit = |_: &[u8]| {
            handed = true;
            Ok(())
        };
        assert_eq!(
            reseal(&*reader, &write, &old, b"", true, emit),
            Err(CodecError::VerifyMismatch)
        );
        assert!(!handed);
    }
}

#[test]
fn a_ciphertext_sealed_under_another_key_than_the_target_is_refused() {
    let read = Format::VersionedGcm.codec(&old_ring()).unwrap();
    let mut old = Vec::new();
    read.seal(b"+15551234567", b"", None, &mut old);
    // claims to seal under key 2 but seals under key 1: opens, to the right plaintext, under the wrong key
    let write = Faulty {
        inner: Format::VersionedGcm.codec(&old_ring()).unwrap(),
        damage: |_| {},
    };
    struct Claims2(Faulty);
    impl Codec for Claims2 {
        fn key_hint(&self, v: &[u8]) -> Option<crate::crypto::keyring::KeyId> {
            self.0.key_hint(v)
        }
        fn open(&self, v: &[u8], aad: &[u8]) -> Result<crate::crypto::codec::Opened, CodecError> {
            self.0.open(v, aad)
        }
        fn seal(&self, p: &[u8], aad: &[u8], t: Option<u64>, out: &mut Vec<u8>) {
            self.0.seal(p, aad, t, out)
        }
        fn target(&self) -> crate::crypto::keyring::KeyId {
            2
        }
        fn key_prefix(&self, k: crate::crypto::keyring::KeyId) -> Option<Vec<u8>> {
            self.0.key_prefix(k)
        }
        fn describe_prefix(&self, p: &[u8]) -> String {
            self.0.describe_prefix(p)
        }
    }
    let reader = Format::VersionedGcm.codec(&new_ring()).unwrap();
    let mut handed = false;
    let emit = |_: &[u8]| {
        handed = true;
        Ok(())
    };
    assert_eq!(
        reseal(&*reader, &Claims2(write), &old, b"", false, emit),
        Err(CodecError::VerifyMismatch)
    );
    assert!(!handed);
}
