//! Keys and keyrings: the material every codec works from.
//!
//! A [`Keyring`] holds (key id, 32-byte key) pairs with one current id and at
//! most one pending id. The *target* key of a run is the pending key when one is
//! staged, else the current key; every other key is *old*. Key material lives
//! in [`Zeroizing`] buffers, so it is wiped when dropped, and no `Debug` or
//! `Display` implementation here prints it: they show ids and a fingerprint.

pub mod env;
pub mod tink;

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use ring::digest::{Context, SHA256};
use zeroize::Zeroizing;

/// Identifies a key inside a keyring: the version byte of `versioned-gcm`.
pub type KeyId = u32;

/// Length of every key rekey handles (AES-256, and Fernet's signing + encryption halves).
pub const KEY_LEN: usize = 32;

/// Why a key string was refused. Never carries the string itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    /// The value is neither 64 hex characters nor base64 of 32 bytes.
    #[error("is not a 32-byte key: expected 64 hex characters (e.g. from `openssl rand -hex 32` or `rekey keygen`) or base64 of 32 bytes, got {len} characters")]
    Malformed {
        /// Length of the refused value, in characters.
        len: usize,
    },
    /// The value is wrapped in quotes (as some env files and shells leave it).
    #[error("is wrapped in quotes: set it to the key itself (64 hex characters or base64), without the quotes")]
    Quoted,
    /// The value has a hex key's 64 characters, all but a few of them hex
    /// digits: a typo (base64 of 32 bytes is 43 or 44 characters, never 64).
    #[error("is not hex: {}; a hex key is 64 digits 0-9 and a-f: correct {} where the key is kept, or copy it again from its source", not_hex_digits(positions), if positions.len() == 1 { "it" } else { "them" })]
    NotHex {
        /// Where the characters that are not hex digits are, counted from 1.
        positions: Vec<usize>,
    },
    /// The value is made only of hex digits, but not 64 of them: a hex key
    /// cut short or run on. (Base64 of 32 bytes is 44 characters, the last
    /// one `=`, so never all hex digits; its 43 unpadded characters can be,
    /// and are refused with the padding named rather than guessed at.)
    #[error("looks like hex but is {len} characters; a key is 64 hex characters{}", if *len == UNPADDED_BASE64_LEN { " (or, if it is base64 of 32 bytes without its padding, add the final '=')" } else { "" })]
    LooksLikeHex {
        /// Length of the refused value, in characters.
        len: usize,
    },
    /// The value decodes, but not to 32 bytes.
    #[error("decodes to {got} bytes; a key must be exactly 32 bytes (64 hex characters)")]
    WrongLength {
        /// Number of bytes the value decoded to.
        got: usize,
    },
}

/// Characters of base64 of a 32-byte key without its `=` padding.
const UNPADDED_BASE64_LEN: usize = (KEY_LEN * 4).div_ceil(3);

/// One key: an id and 32 bytes of secret material, wiped on drop.
#[derive(Clone)]
pub struct Key {
    /// The key's id within its keyring.
    id: KeyId,
    /// The secret bytes.
    material: Zeroizing<[u8; KEY_LEN]>,
}

impl Key {
    /// Wraps raw key bytes.
    pub fn new(id: KeyId, material: [u8; KEY_LEN]) -> Self {
        Key {
            id,
            material: Zeroizing::new(material),
        }
    }

    /// Parses 64 hex characters or base64 (standard or urlsafe, padded or not) of 32 bytes.
    /// A value made only of hex digits is hex: of any other length, it is refused.
    pub fn parse(id: KeyId, text: &str) -> Result<Self, KeyParseError> {
        let text = text.trim();
        if text.len() >= 2
            && (text.starts_with('"') && text.ends_with('"')
                || text.starts_with('\'') && text.ends_with('\''))
        {
            return Err(KeyParseError::Quoted);
        }
        let bytes: Zeroizing<Vec<u8>> =
            if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                Zeroizing::new(
                    hex::decode(text).map_err(|_| KeyParseError::Malformed { len: text.len() })?,
                )
            } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(KeyParseError::LooksLikeHex { len: text.len() });
            } else if let Some(positions) = hex_typos(text) {
                return Err(KeyParseError::NotHex { positions });
            } else {
                decode_base64_any(text).ok_or(KeyParseError::Malformed {
                    len: text.chars().count(),
                })?
            };
        let material: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyParseError::WrongLength { got: bytes.len() })?;
        Ok(Key::new(id, material))
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The secret bytes. Callers must not copy them anywhere that outlives the key.
    pub fn material(&self) -> &[u8; KEY_LEN] {
        &self.material
    }

    /// A short, one-way identifier of the material: the first 8 hex characters
    /// of SHA-256 over a domain tag and the key. Safe to log and store.
    pub fn fingerprint(&self) -> String {
        let mut h = Context::new(&SHA256);
        h.update(b"rekey key fingerprint v1\0");
        h.update(self.material.as_slice());
        hex::encode(&h.finish().as_ref()[..4])
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// The most characters that may not be hex digits in a value of a hex
/// key's length for it to read as hex with typos, not as something else.
/// (Of 64 random base64 characters, about 42 are not hex digits.)
const TYPOS_AT_MOST: usize = 8;

/// Where a value of a hex key's length, all but a few of whose characters
/// are hex digits, has characters that are not (counted from 1); `None`
/// for any other value.
fn hex_typos(text: &str) -> Option<Vec<usize>> {
    if text.chars().count() != 2 * KEY_LEN {
        return None;
    }
    let positions: Vec<usize> = text
        .chars()
        .enumerate()
        .filter(|(_, c)| !c.is_ascii_hexdigit())
        .map(|(i, _)| i + 1)
        .collect();
    (!positions.is_empty() && positions.len() <= TYPOS_AT_MOST).then_some(positions)
}

/// "character 17 is not a hex digit", "characters 3, 17 and 40 are not hex digits".
fn not_hex_digits(positions: &[usize]) -> String {
    match positions {
        [one] => format!("character {one} is not a hex digit"),
        [first @ .., last] => {
            let first: Vec<String> = first.iter().map(usize::to_string).collect();
            format!(
                "characters {} and {last} are not hex digits",
                first.join(", ")
            )
        }
        [] => "every character is a hex digit".into(),
    }
}

fn decode_base64_any(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .map(Zeroizing::new)
}

/// Why a keyring could not be assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    /// The keyring has no key at all.
    #[error("no keys were found")]
    Empty,
    /// The current id names no key.
    #[error("the current key id {0} has no key")]
    CurrentMissing(KeyId),
    /// The pending id names no key.
    #[error("the pending key id {0} has no key")]
    PendingMissing(KeyId),
    /// Two keys claim the same id.
    #[error("key id {0} appears twice")]
    DuplicateId(KeyId),
    /// Two ids hold the same material, which would make "old" and "new" the same key.
    #[error("keys {0} and {1} hold the same key material; every version must be a distinct key")]
    Duplicate(KeyId, KeyId),
}

/// A set of keys with one current id and at most one pending id.
#[derive(Clone)]
pub struct Keyring {
    /// Every key, by id.
    keys: BTreeMap<KeyId, Key>,
    /// The id applications encrypt with today.
    current: KeyId,
    /// The id staged to become current, if any.
    pending: Option<KeyId>,
}

impl Keyring {
    /// Builds a keyring, checking that the current and pending ids have keys.
    pub fn new(
        keys: Vec<Key>,
        current: KeyId,
        pending: Option<KeyId>,
    ) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut map = BTreeMap::new();
        for key in keys {
            if map.contains_key(&key.id()) {
                return Err(KeyringError::DuplicateId(key.id()));
            }
            if let Some(twin) = map.values().find(|k: &&Key| k.material() == key.material()) {
                return Err(KeyringError::Duplicate(twin.id(), key.id()));
            }
            map.insert(key.id(), key);
        }
        if !map.contains_key(&current) {
            return Err(KeyringError::CurrentMissing(current));
        }
        if let Some(p) = pending {
            if !map.contains_key(&p) {
                return Err(KeyringError::PendingMissing(p));
            }
        }
        Ok(Keyring {
            keys: map,
            current,
            pending,
        })
    }

    /// The key new ciphertexts are written under: pending if staged, else current.
    pub fn target(&self) -> &Key {
        let id = self.pending.unwrap_or(self.current);
        &self.keys[&id]
    }

    /// The current key's id.
    pub fn current_id(&self) -> KeyId {
        self.current
    }

    /// The pending key's id, if one is staged.
    pub fn pending_id(&self) -> Option<KeyId> {
        self.pending
    }

    /// The key with this id.
    pub fn get(&self, id: KeyId) -> Option<&Key> {
        self.keys.get(&id)
    }

    /// Every key, in id order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.values()
    }

    /// Ids and fingerprints, never material: what the engine stores to detect
    /// a key set that changed under an unfinished job.
    pub fn describe(&self) -> serde_json::Value {
        let keys: serde_json::Map<String, serde_json::Value> = self
            .keys
            .values()
            .map(|k| {
                (
                    k.id().to_string(),
                    serde_json::Value::String(k.fingerprint()),
                )
            })
            .collect();
        serde_json::json!({ "keys": keys, "current": self.current, "pending": self.pending, "target": self.target().id() })
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.values().collect::<Vec<_>>())
            .field("current", &self.current)
            .field("pending", &self.pending)
            .finish()
    }
}

impl fmt::Display for KeyEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyEncoding::Hex => "hex",
            KeyEncoding::Base64 => "base64",
            KeyEncoding::Fernet => "fernet",
        })
    }
}

/// Encodes key bytes as text in `format`.
pub fn encode_key(material: &[u8; KEY_LEN], format: KeyEncoding) -> Zeroizing<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    Zeroizing::new(match format {
        KeyEncoding::Hex => hex::encode(material),
        KeyEncoding::Base64 => STANDARD.encode(material),
        KeyEncoding::Fernet => URL_SAFE.encode(material),
    })
}

/// How a key is written as text (`rekey keygen`, `[keys] key_encoding`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KeyEncoding {
    /// 64 hex characters (`openssl rand -hex 32`).
    Hex,
    /// Standard base64 of 32 bytes.
    Base64,
    /// Urlsafe base64 of 32 bytes, as Python's `Fernet.generate_key()`.
    Fernet,
}

/// Keeps key material out of core dumps: marks the process non-dumpable on
/// Linux (which also bars ptrace attach by other unprivileged processes).
/// Returns whether that took effect.
pub fn forbid_core_dumps() -> bool {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_dumpable(false).is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// 32 fresh bytes from the operating system's CSPRNG.
pub fn generate_material() -> Zeroizing<[u8; KEY_LEN]> {
    use rand::TryRng as _;
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    if let Err(e) = rand::rngs::SysRng.try_fill_bytes(bytes.as_mut_slice()) {
        panic!("the operating system refused random bytes for a new key: {e}");
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn parses_hex_and_base64_to_the_same_key() {
        let a = Key::parse(1, HEX).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(a.material());
        let b = Key::parse(1, &b64).unwrap();
        assert_eq!(a.material(), b.material());
    }

    #[test]
    fn refuses_short_hex_without_echoing_it() {
        let err = Key::parse(1, &HEX[..62]).unwrap_err();
        assert!(!err.to_string().contains(&HEX[..10]));
    }

    #[test]
    fn a_quoted_key_is_refused_saying_so() {
        for quoted in [
            format!("\"{HEX}\""),
            format!("'{HEX}'"),
            format!(" \"{HEX}\"\n"),
        ] {
            let err = Key::parse(1, &quoted).unwrap_err();
            assert_eq!(err, KeyParseError::Quoted);
            assert!(!err.to_string().contains(&HEX[..10]));
        }
    }

    #[test]
    fn a_hex_key_with_typos_names_their_positions_and_nothing_of_the_key() {
        let typos = format!("{}g{}-{}", &HEX[..2], &HEX[3..40], &HEX[41..]);
        let err = Key::parse(1, &typos).unwrap_err();
        assert_eq!(
            err,
            KeyParseError::NotHex {
                positions: vec![3, 41]
            }
        );
        let shown = err.to_string();
        assert!(
            shown.starts_with("is not hex: characters 3 and 41 are not hex digits"),
            "{shown}"
        );
        for part in typos.as_bytes().windows(4) {
            assert!(
                !shown.contains(std::str::from_utf8(part).unwrap()),
                "{shown}"
            );
        }
    }

    #[test]
    fn hex_digits_short_of_or_past_64_are_refused_as_hex_of_the_wrong_length() {
        for len in [62, 63, 65, 66] {
            let text: String = HEX.chars().cycle().take(len).collect();
            let err = Key::parse(1, &text).unwrap_err();
            assert_eq!(err, KeyParseError::LooksLikeHex { len });
            let shown = format!("{err} {err:?}");
            assert!(shown.starts_with(&format!(
                "looks like hex but is {len} characters; a key is 64 hex characters"
            )));
            for part in text.as_bytes().windows(6) {
                let part = std::str::from_utf8(part).unwrap();
                assert!(!shown.contains(part), "{shown}");
            }
        }
    }

    #[test]
    fn base64_of_32_bytes_is_all_hex_digits_only_unpadded_and_then_is_refused_naming_its_padding() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        // 32 bytes are 44 base64 characters, the last one '=': never all hex
        // digits. Unpadded they are 43, which can all be hex digits (zeros
        // are "AAA...A"): such a value is refused rather than guessed at.
        let zeros = STANDARD_NO_PAD.encode([0u8; KEY_LEN]);
        assert!(zeros.len() == 43 && zeros.bytes().all(|b| b.is_ascii_hexdigit()));
        let err = Key::parse(1, &zeros).unwrap_err();
        assert_eq!(err, KeyParseError::LooksLikeHex { len: 43 });
        assert!(err.to_string().contains("add the final '='"), "{err}");
        let padded = STANDARD.encode([0u8; KEY_LEN]);
        assert_eq!(
            Key::parse(1, &padded).map(|k| *k.material()),
            Ok([0; KEY_LEN])
        );
    }

    #[test]
    fn a_64_character_value_mostly_not_hex_is_still_measured_as_base64() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([0xa5u8; 48]);
        assert_eq!(b64.len(), 64);
        assert_eq!(
            Key::parse(1, &b64).unwrap_err(),
            KeyParseError::WrongLength { got: 48 }
        );
    }

    #[test]
    fn refuses_base64_of_the_wrong_length() {
        assert_eq!(
            Key::parse(1, "AQID").unwrap_err(),
            KeyParseError::WrongLength { got: 3 }
        );
    }

    #[test]
    fn fingerprint_is_pinned() {
        // Stored in databases (rekey.key_usage, rekey.rotations): computed by
        // the sha2 crate before hashing moved to ring; must never change.
        assert_eq!(Key::parse(1, HEX).unwrap().fingerprint(), "bd16d3c7");
    }

    #[test]
    fn debug_shows_fingerprint_not_material() {
        let key = Key::parse(7, HEX).unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("fingerprint"));
        assert!(!shown.contains("0001020304"));
    }

    #[test]
    fn target_is_pending_when_staged() {
        let k1 = Key::new(1, [1; 32]);
        let k2 = Key::new(2, [2; 32]);
        let ring = Keyring::new(vec![k1, k2], 1, Some(2)).unwrap();
        assert_eq!(ring.target().id(), 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_is_made_non_dumpable() {
        assert!(forbid_core_dumps());
        assert_eq!(nix::sys::prctl::get_dumpable().ok(), Some(false));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_text_parses_to_a_key_or_a_typed_error(text in "\\PC{0,100}") {
            match Key::parse(1, &text) {
                Ok(key) => proptest::prop_assert_eq!(key.material().len(), KEY_LEN),
                Err(KeyParseError::Malformed { len }) => proptest::prop_assert_eq!(len, text.trim().chars().count()),
                Err(KeyParseError::WrongLength { got }) => proptest::prop_assert_ne!(got, KEY_LEN),
                Err(KeyParseError::NotHex { positions }) => {
                    proptest::prop_assert_eq!(text.trim().chars().count(), 2 * KEY_LEN);
                    proptest::prop_assert!(!positions.is_empty());
                }
                Err(KeyParseError::Quoted) => proptest::prop_assert!(text.trim().starts_with(['"', '\''])),
                Err(KeyParseError::LooksLikeHex { len }) => {
                    proptest::prop_assert_eq!(len, text.trim().len());
                    proptest::prop_assert_ne!(len, 2 * KEY_LEN);
                    proptest::prop_assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }
        }

        #[test]
        fn padded_base64_of_32_bytes_is_never_all_hex_digits(material in proptest::prelude::any::<[u8; KEY_LEN]>()) {
            use base64::engine::general_purpose::{STANDARD, URL_SAFE};
            for text in [STANDARD.encode(material), URL_SAFE.encode(material)] {
                proptest::prop_assert_eq!(text.len(), 44);
                proptest::prop_assert!(text.ends_with('='));
                proptest::prop_assert!(!text.bytes().all(|b| b.is_ascii_hexdigit()));
                proptest::prop_assert_eq!(Key::parse(1, &text).map(|k| *k.material()), Ok(material));
            }
        }

        #[test]
        fn a_refused_key_is_never_repeated_in_the_error(text in "[0-9a-fA-F]{8,80}|[A-Za-z0-9+/_-]{8,60}={0,2}") {
            if let Err(err) = Key::parse(1, &text) {
                let shown = format!("{err} {err:?}");
                proptest::prop_assert!(!shown.contains(text.trim()), "{}", shown);
            }
        }

        #[test]
        fn every_32_bytes_parse_back_from_hex_and_each_base64(material in proptest::prelude::any::<[u8; KEY_LEN]>()) {
            use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
            let texts = [
                hex::encode(material),
                hex::encode_upper(material),
                format!("  {}\n", hex::encode(material)),
                STANDARD.encode(material),
                STANDARD_NO_PAD.encode(material),
                URL_SAFE.encode(material),
                URL_SAFE_NO_PAD.encode(material),
            ];
            for text in texts {
                // unpadded base64 all of whose 43 characters are hex digits
                // (about one key in 10^20) is refused as ambiguous
                let ambiguous = text.len() == 43 && text.bytes().all(|b| b.is_ascii_hexdigit());
                let expected = if ambiguous { Err(KeyParseError::LooksLikeHex { len: 43 }) } else { Ok(material) };
                proptest::prop_assert_eq!(Key::parse(1, &text).map(|k| *k.material()), expected);
            }
        }
    }

    #[test]
    fn refuses_two_versions_with_the_same_material() {
        let err =
            Keyring::new(vec![Key::new(1, [1; 32]), Key::new(2, [1; 32])], 2, None).unwrap_err();
        assert_eq!(err, KeyringError::Duplicate(1, 2));
    }
}
