//! Fernet: the specification's vectors, MultiFernet key order, and what a damaged token gives.
use super::*;
use proptest::prelude::*;

/// Known answers from Python `cryptography` 48.0.0: `Fernet(KAT_KEY)
/// ._encrypt_from_parts(plaintext, 1700000000, bytes(range(0xa0, 0xb0)))`.
const KAT_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KAT_TIMESTAMP: u64 = 1_700_000_000;
const KAT: [(&[u8], &str); 3] = [
    (b"+1 555 0100 (KAT)", "gAAAAABlU_EAoKGio6SlpqeoqaqrrK2ur-N1pts8fPHJFROj-n6m8IROs4CouwzUxtgLTMXUbUtdSSl-o4904BGwgIy1Za-QB1VWPG3NIbUjRNzdr9cAnUk="),
    (b"", "gAAAAABlU_EAoKGio6SlpqeoqaqrrK2ur9O7erZFnrP5QdmHcSLL6VFXYIixxl1AmTRA6zW1v27gD2v8Il0NNOcHT_InaMMxDQ=="),
    (b"0123456789abcdef", "gAAAAABlU_EAoKGio6SlpqeoqaqrrK2urynNqNPaVpvoj53cifbv3U7vIS3mPVH4s4-IuMvWgTxT78aFCil8vOYYWL495JfjkOoLI2oZikwINuaarJvS868="),
];
const KAT_IV: [u8; IV_LEN] = [
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
];

fn kat_ring() -> Keyring {
    Keyring::new(vec![Key::parse(1, KAT_KEY).unwrap()], 1, None).unwrap()
}

/// Keys 1 and 2; `target` names which one seals.
fn ring_with_target(target: KeyId) -> Keyring {
    Keyring::new(
        vec![Key::new(1, [1; 32]), Key::new(2, [2; 32])],
        target,
        None,
    )
    .unwrap()
}

fn sealed(codec: &Fernet, pt: &[u8], timestamp: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    codec.seal(pt, b"", timestamp, &mut out);
    out
}

/// Decodes a token, lets `edit` change the raw bytes, encodes it again.
fn edited(token: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut raw = URL_SAFE.decode(token).unwrap();
    edit(&mut raw);
    URL_SAFE.encode(raw).into_bytes()
}

#[test]
fn opens_tokens_made_by_python_cryptography() {
    let codec = Fernet::new(&kat_ring()).unwrap();
    for (plaintext, token) in KAT {
        let opened = codec.open(token.as_bytes(), b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice(), opened.timestamp),
            (1, plaintext, Some(KAT_TIMESTAMP))
        );
    }
}

#[test]
fn seals_the_same_parts_into_python_cryptographys_exact_token() {
    let codec = Fernet::new(&kat_ring()).unwrap();
    for (plaintext, token) in KAT {
        let mut out = Vec::new();
        codec.seal_with_iv(plaintext, KAT_TIMESTAMP, &KAT_IV, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), token);
    }
}

#[test]
fn round_trip_keeps_a_given_timestamp_or_stamps_now() {
    let codec = Fernet::new(&ring_with_target(2)).unwrap();
    let out = sealed(&codec, b"+15551234567", Some(1_600_000_000));
    assert!(out
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(b)));
    let opened = codec.open(&out, b"").unwrap();
    assert_eq!(
        (opened.key, opened.plaintext.as_slice(), opened.timestamp),
        (2, &b"+15551234567"[..], Some(1_600_000_000))
    );
    let before = now();
    let opened = codec.open(&sealed(&codec, b"x", None), b"").unwrap();
    assert!(opened.timestamp.is_some_and(|t| t >= before && t <= now()));
    assert_eq!(
        (
            codec.target(),
            codec.key_hint(&out),
            codec.key_prefix(2),
            codec.supports_aad()
        ),
        (2, None, None, false)
    );
    assert_eq!(codec.key_label(2), "key 2");
}

#[test]
fn fresh_ivs_make_distinct_tokens() {
    let codec = Fernet::new(&ring_with_target(2)).unwrap();
    assert_ne!(
        sealed(&codec, b"same", Some(1)),
        sealed(&codec, b"same", Some(1))
    );
}

#[test]
fn token_under_an_old_key_opens_and_names_it() {
    let out = sealed(
        &Fernet::new(&ring_with_target(1)).unwrap(),
        b"from last year",
        Some(5),
    );
    let opened = Fernet::new(&ring_with_target(2))
        .unwrap()
        .open(&out, b"")
        .unwrap();
    assert_eq!(
        (opened.key, opened.plaintext.as_slice(), opened.timestamp),
        (1, &b"from last year"[..], Some(5))
    );
}

#[test]
fn tampered_tokens_fail_authentication() {
    let codec = Fernet::new(&ring_with_target(2)).unwrap();
    let out = sealed(&codec, b"secret", None);
    let last = |raw: &mut Vec<u8>| *raw.last_mut().unwrap() ^= 1;
    assert_eq!(
        codec.open(&edited(&out, last), b"").err(),
        Some(CodecError::AuthFailed)
    );
    let ciphertext = |raw: &mut Vec<u8>| raw[HEADER_LEN] ^= 1;
    assert_eq!(
        codec.open(&edited(&out, ciphertext), b"").err(),
        Some(CodecError::AuthFailed)
    );
    let timestamp = |raw: &mut Vec<u8>| raw[8] ^= 1;
    assert_eq!(
        codec.open(&edited(&out, timestamp), b"").err(),
        Some(CodecError::AuthFailed)
    );
    let version = |raw: &mut Vec<u8>| raw[0] = 0x81;
    assert_eq!(
        codec.open(&edited(&out, version), b"").err(),
        Some(CodecError::AuthFailed)
    );
}

#[test]
fn wrong_key_fails_authentication() {
    let stranger = Keyring::new(vec![Key::new(1, [9; 32])], 1, None).unwrap();
    let out = sealed(&Fernet::new(&stranger).unwrap(), b"x", None);
    assert_eq!(
        Fernet::new(&ring_with_target(2))
            .unwrap()
            .open(&out, b"")
            .err(),
        Some(CodecError::AuthFailed)
    );
}

#[test]
fn short_or_ragged_tokens_are_truncated() {
    let codec = Fernet::new(&ring_with_target(2)).unwrap();
    assert_eq!(codec.open(b"", b"").err(), Some(CodecError::Truncated));
    let out = sealed(&codec, b"secret", None);
    let short = |raw: &mut Vec<u8>| raw.truncate(MIN_TOKEN_LEN - 1);
    assert_eq!(
        codec.open(&edited(&out, short), b"").err(),
        Some(CodecError::Truncated)
    );
    let ragged = |raw: &mut Vec<u8>| raw.insert(HEADER_LEN, 0);
    assert_eq!(
        codec.open(&edited(&out, ragged), b"").err(),
        Some(CodecError::Truncated)
    );
}

#[test]
fn invalid_base64_is_a_bad_encoding() {
    let codec = Fernet::new(&kat_ring()).unwrap();
    assert_eq!(
        codec.open(b"not a token!", b"").err(),
        Some(CodecError::BadEncoding)
    );
    let token = KAT[0].1;
    // Standard-alphabet characters, and a token with its padding cut.
    assert_eq!(
        codec.open(token.replace('_', "/").as_bytes(), b"").err(),
        Some(CodecError::BadEncoding)
    );
    assert_eq!(
        codec
            .open(token.trim_end_matches('=').as_bytes(), b"")
            .err(),
        Some(CodecError::BadEncoding)
    );
    assert_eq!(
        codec.open(&token.as_bytes()[..token.len() - 3], b"").err(),
        Some(CodecError::BadEncoding)
    );
}

#[test]
fn bad_padding_under_a_verified_tag_fails_then_tries_the_next_key() {
    // Keys 1 and 2 share a signing half; key 2's encryption half made the
    // token, so key 1 (the target, tried first) verifies it but unpads
    // garbage, and key 2 must still open it (MultiFernet semantics).
    let mut a = [1u8; 32];
    let mut b = [1u8; 32];
    a[16..].fill(7);
    b[16..].fill(8);
    // a fixed IV: with a random one, 1 time in 256 key 1's garbage ends in a
    // valid padding byte by chance, and the test would see key 1 "open" it
    let mut out = Vec::new();
    Fernet::new(&Keyring::new(vec![Key::new(2, b)], 2, None).unwrap())
        .unwrap()
        .seal_with_iv(b"payload", 1, &KAT_IV, &mut out);
    let both = Keyring::new(vec![Key::new(1, a), Key::new(2, b)], 1, None).unwrap();
    let opened = Fernet::new(&both).unwrap().open(&out, b"").unwrap();
    assert_eq!(
        (opened.key, opened.plaintext.as_slice()),
        (2, &b"payload"[..])
    );
    let only_a = Keyring::new(vec![Key::new(1, a)], 1, None).unwrap();
    assert_eq!(
        Fernet::new(&only_a).unwrap().open(&out, b"").err(),
        Some(CodecError::AuthFailed)
    );
}

#[test]
fn long_plaintexts_use_the_heap_path() {
    let codec = Fernet::new(&ring_with_target(2)).unwrap();
    // 959 bytes is the longest plaintext whose token fits STACK_TOKEN.
    for len in [959, 960, 5000] {
        let pt = vec![0x5a; len];
        let opened = codec.open(&sealed(&codec, &pt, Some(3)), b"").unwrap();
        assert_eq!(opened.plaintext.as_slice(), pt.as_slice());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn open_inverts_seal(pt in proptest::collection::vec(any::<u8>(), 0..512), ts in any::<u64>()) {
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let opened = codec.open(&sealed(&codec, &pt, Some(ts)), b"").unwrap();
        prop_assert_eq!(opened.plaintext.as_slice(), pt.as_slice());
        prop_assert_eq!(opened.timestamp, Some(ts));
    }

    #[test]
    fn arbitrary_bytes_give_a_typed_error(value in proptest::collection::vec(any::<u8>(), 0..256)) {
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let err = codec.open(&value, b"").err();
        prop_assert!(matches!(err, Some(CodecError::BadEncoding | CodecError::Truncated | CodecError::AuthFailed)), "{:?}", err);
    }

    #[test]
    fn arbitrary_text_in_the_token_alphabet_gives_a_typed_error(text in "[A-Za-z0-9_=-]{0,200}") {
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let err = codec.open(text.as_bytes(), b"").err();
        prop_assert!(matches!(err, Some(CodecError::BadEncoding | CodecError::Truncated | CodecError::AuthFailed)), "{:?}", err);
    }

    #[test]
    fn arbitrary_well_encoded_tokens_are_refused(mut raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Some(first) = raw.first_mut() {
            *first = VERSION;
        }
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let err = codec.open(URL_SAFE.encode(&raw).as_bytes(), b"").err();
        prop_assert!(matches!(err, Some(CodecError::Truncated | CodecError::AuthFailed)), "{:?}", err);
    }

    #[test]
    fn open_into_agrees_with_open_whatever_the_buffer_held(text in "[A-Za-z0-9_=-]{0,160}", junk in proptest::collection::vec(any::<u8>(), 0..64)) {
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let mut buf = junk;
        prop_assert_eq!(codec.open_into(text.as_bytes(), b"", &mut buf).err(), codec.open(text.as_bytes(), b"").err());
    }

    #[test]
    fn any_flipped_bit_of_the_token_is_refused(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<prop::sample::Index>()) {
        let codec = Fernet::new(&ring_with_target(2)).unwrap();
        let out = sealed(&codec, &pt, Some(7));
        let flipped = edited(&out, |raw| {
            let i = bit.index(raw.len() * 8);
            raw[i / 8] ^= 1 << (i % 8);
        });
        prop_assert_eq!(codec.open(&flipped, b"").err(), Some(CodecError::AuthFailed));
    }
}
