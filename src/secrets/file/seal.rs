//! Sealing keys in a keyring file: the key-encryption key derived from the
//! passphrase with Argon2id (bounded parameters), and each key sealed with
//! AES-256-GCM, its id bound as associated data.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::keyring::{Key, KeyId, KEY_LEN};

use super::{FileKeyringError, FORMAT};

/// Argon2id parameters, stored with the salt.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Kdf {
    /// Base64 salt.
    pub(super) salt: String,
    /// Memory in KiB.
    pub(super) m_cost: u32,
    /// Passes.
    pub(super) t_cost: u32,
    /// Lanes.
    pub(super) p_cost: u32,
}

/// The most memory (KiB), passes and lanes a keyring file may ask Argon2id
/// for: far above what rekey writes (19 MiB, 2, 1), far below what would
/// exhaust memory or time. A damaged or hostile file asking for more (up to
/// 4 TiB) is refused instead of aborting the process or running for hours.
pub(super) const MAX_M_COST: u32 = 1 << 20;

/// See [`MAX_M_COST`].
pub(super) const MAX_T_COST: u32 = 16;

/// See [`MAX_M_COST`].
pub(super) const MAX_P_COST: u32 = 16;

pub(super) fn derive(
    path: &Path,
    passphrase: &[u8],
    kdf: &Kdf,
) -> Result<LessSafeKey, FileKeyringError> {
    let malformed = |problem: String| FileKeyringError::Malformed {
        path: path.to_path_buf(),
        problem,
        backup: None,
    };
    if kdf.m_cost > MAX_M_COST || kdf.t_cost > MAX_T_COST || kdf.p_cost > MAX_P_COST {
        return Err(malformed(format!(
            "kdf parameters m_cost={} t_cost={} p_cost={} exceed what rekey accepts (m_cost <= {MAX_M_COST} KiB, t_cost <= {MAX_T_COST}, p_cost <= {MAX_P_COST})",
            kdf.m_cost, kdf.t_cost, kdf.p_cost
        )));
    }
    let salt = B64
        .decode(&kdf.salt)
        .map_err(|_| malformed("kdf.salt is not base64".into()))?;
    let params = argon2::Params::new(kdf.m_cost, kdf.t_cost, kdf.p_cost, Some(KEY_LEN))
        .map_err(|e| malformed(format!("kdf parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, &salt, kek.as_mut_slice())
        .map_err(|e| malformed(format!("kdf: {e}")))?;
    let unbound = UnboundKey::new(&AES_256_GCM, kek.as_slice())
        .map_err(|_| malformed("key-encryption key refused".into()))?;
    Ok(LessSafeKey::new(unbound))
}

pub(super) fn aad(id: KeyId) -> Vec<u8> {
    format!("{FORMAT} key {id}").into_bytes()
}

pub(super) fn seal_key(
    kek: &LessSafeKey,
    key: &Key,
    path: &Path,
) -> Result<String, FileKeyringError> {
    let mut nonce = [0u8; NONCE_LEN];
    crate::crypto::nonce::fill(&mut nonce);
    let mut buf = Zeroizing::new(key.material().to_vec());
    let tag = kek
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(key.id())),
            buf.as_mut_slice(),
        )
        .map_err(|_| FileKeyringError::Malformed {
            path: path.to_path_buf(),
            problem: format!("key {} could not be sealed", key.id()),
            backup: None,
        })?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out.extend_from_slice(tag.as_ref());
    Ok(B64.encode(out))
}

/// Why a sealed key did not open.
pub(super) enum Unopened {
    /// The stored material is not a sealed key at all (not base64, too short).
    Damaged(&'static str),
    /// It is, but the key-encryption key does not open it: a wrong passphrase
    /// (or a blob tampered with, which GCM cannot tell apart).
    Refused,
}

pub(super) fn open_key(kek: &LessSafeKey, id: KeyId, sealed: &str) -> Result<Key, Unopened> {
    let raw = Zeroizing::new(
        B64.decode(sealed)
            .map_err(|_| Unopened::Damaged("material is not base64"))?,
    );
    if raw.len() != NONCE_LEN + KEY_LEN + AES_256_GCM.tag_len() {
        return Err(Unopened::Damaged(
            "material is not a sealed 32-byte key (wrong length)",
        ));
    }
    let (nonce, body) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| Unopened::Damaged("material has no nonce"))?;
    let mut buf = Zeroizing::new(body.to_vec());
    let plain = kek
        .open_in_place(nonce, Aad::from(aad(id)), buf.as_mut_slice())
        .map_err(|_| Unopened::Refused)?;
    let material: [u8; KEY_LEN] = plain
        .try_into()
        .map_err(|_| Unopened::Damaged("material is not a sealed 32-byte key (wrong length)"))?;
    Ok(Key::new(id, material))
}
