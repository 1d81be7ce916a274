//! `fernet`: Fernet tokens, as Python `cryptography`'s `Fernet` writes them.
//!
//! Applications following the healthprep policy store `Fernet.encrypt` output
//! (base64url text with padding) and rotate with `MultiFernet`; this codec
//! reads and writes those tokens byte for byte, so rekey can re-key them or
//! migrate them to another format. Token layout (before base64url):
//!
//! ```text
//! 0x80 | timestamp (8, big-endian seconds) | IV (16) | AES-128-CBC, PKCS#7 | HMAC-SHA256 (32)
//! ```
//!
//! The HMAC covers every byte before it. A 32-byte key is the signing key
//! (first 16 bytes) followed by the encryption key (last 16). Tokens carry no
//! key id, so [`Fernet::open`](Codec::open) tries the target key first and
//! then the others in id order, as `MultiFernet` does with its key list.
//!
//! Both halves of each key are prepared once in [`Fernet::new`]: the AES key
//! schedule, and ring's HMAC key (the states after absorbing the padded
//! signing key), which each value starts from instead of re-deriving. The AES
//! schedule wipes itself on drop; ring's HMAC key, like the AES-GCM keys of
//! the other codecs, does not.
//! Opening a value allocates only the returned plaintext buffer; sealing
//! allocates nothing beyond `out` for values up to [`STACK_TOKEN`] bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use aes::Aes128;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use ring::hmac;
use zeroize::Zeroizing;

use super::{Codec, CodecError, FormatKeyError, Opened};
use crate::crypto::keyring::{Key, KeyId, Keyring};
use crate::crypto::nonce;

/// The version byte every Fernet token starts with.
pub const VERSION: u8 = 0x80;
/// Length of the big-endian seconds-since-epoch field.
const TIMESTAMP_LEN: usize = 8;
/// Length of the CBC IV.
const IV_LEN: usize = 16;
/// AES block length: the ciphertext is whole blocks.
const BLOCK_LEN: usize = 16;
/// Length of the HMAC-SHA256 tag.
const TAG_LEN: usize = 32;
/// Bytes between the start of a decoded token and its ciphertext.
const HEADER_LEN: usize = 1 + TIMESTAMP_LEN + IV_LEN;
/// The shortest decoded token: header, one ciphertext block (PKCS#7 always
/// adds at least one byte), tag.
pub const MIN_TOKEN_LEN: usize = HEADER_LEN + BLOCK_LEN + TAG_LEN;
/// Decoded tokens up to this many bytes are built on the stack when sealing
/// (plaintexts up to 959 bytes); longer ones use a temporary heap buffer.
pub const STACK_TOKEN: usize = 1024;

/// One Fernet key, both halves prepared.
struct FernetKey {
    /// The keyring id of the key.
    id: KeyId,
    /// HMAC-SHA256 keyed with the signing half.
    mac: hmac::Key,
    /// AES-128 keyed with the encryption half (schedule expanded once).
    cipher: Aes128,
}

impl FernetKey {
    /// Splits `key` into its signing and encryption halves and prepares both.
    fn new(key: &Key) -> Result<Self, FormatKeyError> {
        let (signing, encryption) = key.material().split_at(16);
        let refused = |what: &str| FormatKeyError {
            format: "fernet",
            problem: format!("{what} refused key {}", key.id()),
        };
        Ok(FernetKey {
            id: key.id(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, signing),
            cipher: Aes128::new_from_slice(encryption).map_err(|_| refused("AES-128"))?,
        })
    }

    /// The HMAC-SHA256 of `data` under this key's signing half.
    fn tag(&self, data: &[u8]) -> hmac::Tag {
        hmac::sign(&self.mac, data)
    }

    /// Whether `tag` is the HMAC of `data` under this key (constant time).
    fn verifies(&self, data: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.mac, data, tag).is_ok()
    }
}

/// Fernet keys prepared once: the target key first, then the others in id order.
pub struct Fernet {
    /// Prepared keys in the order `open` tries them; `keys[0]` is the target.
    keys: Vec<FernetKey>,
}

impl Fernet {
    /// Prepares every key of `keyring` (any id; 32 bytes = signing | encryption half).
    pub fn new(keyring: &Keyring) -> Result<Self, FormatKeyError> {
        let target = keyring.target();
        let mut keys = vec![FernetKey::new(target)?];
        for key in keyring.keys().filter(|k| k.id() != target.id()) {
            keys.push(FernetKey::new(key)?);
        }
        Ok(Fernet { keys })
    }

    /// Seals `plaintext` under the target key with a given IV and timestamp
    /// into `out` (the token's ASCII bytes; cleared first). [`Codec::seal`]
    /// draws the IV; tests fix it to reproduce known tokens.
    fn seal_with_iv(&self, plaintext: &[u8], timestamp: u64, iv: &[u8; IV_LEN], out: &mut Vec<u8>) {
        out.clear();
        let key = &self.keys[0];
        let ct_len = (plaintext.len() / BLOCK_LEN + 1) * BLOCK_LEN;
        let Some(len) = ct_len.checked_add(HEADER_LEN + TAG_LEN) else {
            return;
        };
        let Some(text_len) = base64::encoded_len(len, true) else {
            return;
        };
        let mut stack = [0u8; STACK_TOKEN];
        let mut heap;
        let raw: &mut [u8] = if len <= STACK_TOKEN {
            &mut stack[..len]
        } else {
            heap = vec![0u8; len];
            &mut heap
        };
        raw[0] = VERSION;
        raw[1..1 + TIMESTAMP_LEN].copy_from_slice(&timestamp.to_be_bytes());
        raw[1 + TIMESTAMP_LEN..HEADER_LEN].copy_from_slice(iv);
        let encrypted = cbc::Encryptor::<&Aes128>::inner_iv_init(&key.cipher, iv.into())
            .encrypt_padded_b2b_mut::<Pkcs7>(plaintext, &mut raw[HEADER_LEN..len - TAG_LEN])
            .map(|ct| ct.len());
        if !matches!(encrypted, Ok(n) if n == ct_len) {
            // Unreachable: the buffer is sized for the padded plaintext. An
            // empty output fails verify-before-write and is never written.
            return;
        }
        let tag = key.tag(&raw[..len - TAG_LEN]);
        raw[len - TAG_LEN..].copy_from_slice(tag.as_ref());
        out.resize(text_len, 0);
        if URL_SAFE.encode_slice(&*raw, out.as_mut_slice()) != Ok(text_len) {
            out.clear();
        }
    }
}

/// Seconds since the Unix epoch, as Python's `int(time.time())`.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Codec for Fernet {
    fn key_hint(&self, _value: &[u8]) -> Option<KeyId> {
        None
    }

    /// Decodes the token, then, for each key in turn (target first), checks
    /// the HMAC in constant time and decrypts; the first key that does both
    /// made it. Associated data is ignored: Fernet has none.
    fn open(&self, value: &[u8], _aad: &[u8]) -> Result<Opened, CodecError> {
        // Decode straight into the buffer the plaintext is returned in, so
        // the only allocation is the output.
        let mut buf = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(value.len())]);
        let decode = |buf: &mut [u8]| {
            URL_SAFE
                .decode_slice(value, buf)
                .map_err(|_| CodecError::BadEncoding)
        };
        let len = decode(buf.as_mut_slice())?;
        if len < MIN_TOKEN_LEN {
            return Err(CodecError::Truncated);
        }
        if buf[0] != VERSION {
            // The version byte is under the HMAC: another value is a forgery
            // or not a Fernet token; Python raises InvalidToken alike.
            return Err(CodecError::AuthFailed);
        }
        if !(len - HEADER_LEN - TAG_LEN).is_multiple_of(BLOCK_LEN) {
            // Not whole cipher blocks: cut short (or extended) in storage.
            return Err(CodecError::Truncated);
        }
        let mut timestamp = [0u8; TIMESTAMP_LEN];
        timestamp.copy_from_slice(&buf[1..1 + TIMESTAMP_LEN]);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&buf[1 + TIMESTAMP_LEN..HEADER_LEN]);
        for key in &self.keys {
            let (signed, tag) = buf[..len].split_at(len - TAG_LEN);
            if !key.verifies(signed, tag) {
                continue;
            }
            // Authentic under this key's signing half: decrypt in place.
            let decrypted = cbc::Decryptor::<&Aes128>::inner_iv_init(&key.cipher, (&iv).into())
                .decrypt_padded_mut::<Pkcs7>(&mut buf[HEADER_LEN..len - TAG_LEN])
                .map(|pt| pt.len());
            match decrypted {
                Ok(pt_len) => {
                    buf.copy_within(HEADER_LEN..HEADER_LEN + pt_len, 0);
                    buf[pt_len..].fill(0);
                    buf.truncate(pt_len);
                    return Ok(Opened {
                        key: key.id,
                        plaintext: buf,
                        timestamp: Some(u64::from_be_bytes(timestamp)),
                    });
                }
                Err(_) => {
                    // Bad padding under this key's encryption half (another
                    // key with the same signing half made it): as MultiFernet,
                    // go on to the next key, with the ciphertext restored.
                    decode(buf.as_mut_slice())?;
                }
            }
        }
        Err(CodecError::AuthFailed)
    }

    /// Seals under the target key with a fresh random IV, keeping `timestamp`
    /// (the original token's) when given, else now. Associated data is
    /// ignored: Fernet cannot bind it (see [`Codec::supports_aad`]).
    fn seal(&self, plaintext: &[u8], _aad: &[u8], timestamp: Option<u64>, out: &mut Vec<u8>) {
        let mut iv = [0u8; IV_LEN];
        nonce::fill(&mut iv);
        self.seal_with_iv(plaintext, timestamp.unwrap_or_else(now), &iv, out);
    }

    fn target(&self) -> KeyId {
        self.keys[0].id
    }

    fn key_prefix(&self, _key: KeyId) -> Option<Vec<u8>> {
        None
    }

    fn describe_prefix(&self, _prefix: &[u8]) -> String {
        "fernet (no key id)".into()
    }

    fn supports_aad(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
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
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae,
        0xaf,
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
        let out = sealed(
            &Fernet::new(&Keyring::new(vec![Key::new(2, b)], 2, None).unwrap()).unwrap(),
            b"payload",
            Some(1),
        );
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
}
