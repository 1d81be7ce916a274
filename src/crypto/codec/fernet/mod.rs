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
//! schedule, and the HMAC state after absorbing the padded signing key, which
//! each value clones instead of re-deriving. Both wipe themselves on drop.
//! Opening a value allocates only the returned plaintext buffer; sealing
//! allocates nothing beyond `out` for values up to [`STACK_TOKEN`] bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use aes::Aes128;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use hmac::{Hmac, Mac};
use sha2_hmac::Sha256;
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

/// HMAC-SHA256 on the digest 0.11 generation (its state zeroizes on drop).
type HmacSha256 = Hmac<Sha256>;

/// One Fernet key, both halves prepared.
struct FernetKey {
    /// The keyring id of the key.
    id: KeyId,
    /// HMAC-SHA256 keyed with the signing half; cloned per value.
    mac: HmacSha256,
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
            mac: <HmacSha256 as hmac::KeyInit>::new_from_slice(signing)
                .map_err(|_| refused("HMAC-SHA256"))?,
            cipher: Aes128::new_from_slice(encryption).map_err(|_| refused("AES-128"))?,
        })
    }

    /// The HMAC-SHA256 of `data` under this key's signing half.
    fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC of `data` under this key (constant time).
    fn verifies(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok()
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
        raw[len - TAG_LEN..].copy_from_slice(&tag);
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
mod tests;
