//! The search hash of a row, decided beside its ciphertexts in the
//! transform: the plaintext is opened, the stored hash must be some hash
//! key's HMAC of it, and the new one is the target hash key's. A hash no key
//! made (or one beside no ciphertext) is failed, so the sink quarantines it
//! and leaves it as it is. Pure CPU, like the rest of the transform.

use zeroize::Zeroizing;

use crate::crypto::codec::CodecError;
use crate::db::PageRow;
use crate::job::{Encoding, SearchHash, Target};

use super::transform::{decode, held, Cell, Span};

/// What to decide for a hash: the write a run makes, or the key it is under (verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A run: `Rewritten` to the target key's hash, or `Current`.
    Rewrite,
    /// Verify: `Opened` with the key that made the hash.
    Classify,
}

/// The cell of the search hash of `row`. A NULL hash stays NULL: rekey
/// rotates hashes, it does not add them where the application wrote none.
/// A new hash is appended to `out`.
pub fn cell(
    target: &Target,
    hash: &SearchHash,
    row: PageRow<'_>,
    aad: &[u8],
    purpose: Purpose,
    out: &mut Vec<u8>,
) -> Cell {
    let Some(stored) = held(target, row, hash.column) else {
        return Cell::Null;
    };
    let Some(sealed) = held(target, row, hash.of) else {
        return Cell::Failed(CodecError::HashMismatch);
    };
    let plain = match plaintext(target, hash.of, sealed, aad) {
        Ok(p) => p,
        Err(e) => return Cell::Failed(e),
    };
    let hasher = &hash.hasher;
    let Some(key) = hasher.identify(&plain, stored) else {
        return Cell::Failed(CodecError::HashMismatch);
    };
    let on_target = key == hasher.target();
    match purpose {
        Purpose::Classify => Cell::Opened {
            label: hash.key_label(key),
            key,
            on_target,
        },
        Purpose::Rewrite if on_target => Cell::Current,
        Purpose::Rewrite => {
            let start = out.len();
            match hasher.hash_into(hasher.target(), &plain, out) {
                true => Cell::Rewritten(Span::since(start, out)),
                false => Cell::Failed(CodecError::UnknownKey),
            }
        }
    }
}

/// A ciphertext of a hash-only target, which is read for its plaintext and
/// never rewritten: `Current` when some key opens it, else why not.
pub fn left_as_is(target: &Target, col: usize, stored: &[u8], aad: &[u8]) -> Cell {
    match plaintext(target, col, stored, aad) {
        Ok(_) => Cell::Current,
        Err(e) => Cell::Failed(e),
    }
}

/// The plaintext of the ciphertext in column `col`, in whichever format of
/// the target it is (the written one first, during a migration), wiped on drop.
fn plaintext(
    target: &Target,
    col: usize,
    stored: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CodecError> {
    let column = &target.columns[col];
    let open = |encoding: Encoding, side: &crate::job::Side| {
        decode(encoding, stored).and_then(|ct| side.codec.open(&ct, aad).map(|o| o.plaintext))
    };
    if target.migrating {
        if let Ok(p) = open(column.write, &target.write) {
            return Ok(p);
        }
    }
    open(column.read, &target.read)
}
