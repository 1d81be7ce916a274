//! Transform: decrypt under the old key, encrypt under the target key, and
//! check the result, for every value of a batch, on the rayon pool.
//!
//! Pure CPU: no I/O and no await. Verify-before-write: each new ciphertext is
//! opened again and compared with the plaintext before it may leave this
//! stage, so a value is only ever replaced by one that decrypts to the same
//! plaintext (README, Guarantees 2).

use std::borrow::Cow;
use std::cell::RefCell;

use base64::Engine as _;
use rayon::prelude::*;
use zeroize::Zeroize;

use crate::crypto::codec::{Codec, CodecError};
use crate::crypto::keyring::KeyId;
use crate::db::{Page, PageRow};
use crate::job::{Aad, Encoding, Side, Target};

use super::rehash::{self, Purpose};

mod cells;
pub use cells::{Cell, Cells, Span, PART_ROWS};

/// The encrypted value in column `col` of a page row, as stored.
pub fn value<'a>(target: &Target, row: PageRow<'a>, col: usize) -> Option<&'a [u8]> {
    row.get(target.key.len() + col)
}

/// The ciphertext in column `col` of a page row, where it holds one: NULL
/// and an empty value hold none (under no key, they are left as they are,
/// as `sql::prefix_expr` leaves them out of every staleness predicate).
pub fn held<'a>(target: &Target, row: PageRow<'a>, col: usize) -> Option<&'a [u8]> {
    value(target, row, col).filter(|v| !v.is_empty())
}

/// The associated data for the values of a page row.
pub fn aad<'a>(target: &'a Target, row: PageRow<'a>) -> &'a [u8] {
    match &target.aad {
        Aad::None => &[],
        Aad::Constant(bytes) => bytes,
        Aad::Column(_) => row
            .get(target.key.len() + target.columns.len())
            .unwrap_or_default(),
    }
}

/// The rows (indexes) of a batch with at least one value to write.
pub fn rewritten_rows(cells: &[Cell], ncols: usize) -> impl Iterator<Item = usize> + '_ {
    cells
        .chunks(ncols.max(1))
        .enumerate()
        .filter(|(_, row)| row.iter().any(|c| matches!(c, Cell::Rewritten(_))))
        .map(|(r, _)| r)
}

/// Decides every cell of a batch; `cells` is row-major, one per encrypted column.
pub fn rewrite(target: &Target, rows: &Page, cells: &mut Cells) {
    fill(
        target,
        rows,
        cells,
        Purpose::Rewrite,
        |col, stored, aad, out| rewrite_value(target, col, stored, aad, out),
    );
}

/// Opens every value of a batch to see which key (and format) it is under (verify).
pub fn classify(target: &Target, rows: &Page, cells: &mut Cells) {
    fill(
        target,
        rows,
        cells,
        Purpose::Classify,
        |col, stored, aad, _| classify_value(target, col, stored, aad),
    );
}

/// Decides the ciphertexts of each row with `decide`, then its search hash,
/// a part of [`PART_ROWS`] rows to a task of the pool; new values are
/// appended to the part's buffer.
fn fill(
    target: &Target,
    rows: &Page,
    cells: &mut Cells,
    purpose: Purpose,
    decide: impl Fn(usize, &[u8], &[u8], &mut Vec<u8>) -> Cell + Sync,
) {
    let ncols = target.columns.len().max(1);
    cells.reset(rows.len(), ncols);
    cells
        .par_parts_mut()
        .enumerate()
        .for_each(|(part, (out, buf))| {
            let first_row = part * PART_ROWS;
            let part_rows = out.len() / ncols;
            // new values are about the size of the old ones (verify writes none)
            if purpose == Purpose::Rewrite {
                let stored: usize = (first_row..first_row + part_rows)
                    .flat_map(|r| (0..ncols).filter_map(move |c| value(target, rows.row(r), c)))
                    .map(<[u8]>::len)
                    .sum();
                buf.reserve(stored + stored / 8);
            }
            let sealed = target.sealed_columns();
            for (i, out) in out.chunks_mut(ncols).enumerate() {
                let row = rows.row(first_row + i);
                let aad = aad(target, row);
                for (col, cell) in out.iter_mut().enumerate().take(sealed) {
                    *cell = match held(target, row, col) {
                        None => Cell::Null,
                        Some(stored) => decide(col, stored, aad, buf),
                    };
                }
                if let Some(hash) = &target.hash {
                    out[hash.column] = rehash::cell(target, hash, row, aad, purpose, buf);
                }
            }
            // values already current leave their room unused
            if buf.len() < buf.capacity() / 2 {
                buf.shrink_to_fit();
            }
        });
}

pub(super) fn decode(encoding: Encoding, stored: &[u8]) -> Result<Cow<'_, [u8]>, CodecError> {
    match encoding {
        Encoding::Raw => Ok(Cow::Borrowed(stored)),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(stored)
            .map(Cow::Owned)
            .map_err(|_| CodecError::BadEncoding),
    }
}

/// Appends `sealed` to `out` as it is stored in a column of `encoding`.
fn encode_into(encoding: Encoding, sealed: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    match encoding {
        Encoding::Raw => out.extend_from_slice(sealed),
        Encoding::Base64 => {
            let start = out.len();
            // padded: four characters for every three bytes begun
            out.resize(start + sealed.len().div_ceil(3) * 4, 0);
            let written =
                base64::engine::general_purpose::STANDARD.encode_slice(sealed, &mut out[start..]);
            let Ok(written) = written else {
                out.truncate(start);
                return Err(CodecError::BadEncoding);
            };
            out.truncate(start + written);
        }
    }
    Ok(())
}

/// The key a stored value names in the old format, when the format carries
/// key ids and the keys given do not hold it.
pub fn missing_key(target: &Target, col: usize, stored: &[u8]) -> Option<KeyId> {
    if target.is_hash_column(col) {
        return None;
    }
    let ct = decode(target.columns[col].read, stored).ok()?;
    let id = target.read.codec.key_hint(&ct)?;
    let held = target.read.keyring.get(id).is_some()
        || (target.migrating
            && target
                .write
                .codec
                .key_hint(&ct)
                .is_some_and(|w| target.write.keyring.get(w).is_some()));
    (!held).then_some(id)
}

/// Whether `ct` is a value of `side`'s format that opens under its target key.
fn on_target(side: &Side, ct: &[u8], aad: &[u8]) -> Result<bool, CodecError> {
    let codec = &*side.codec;
    match codec.key_hint(ct) {
        Some(k) if k != codec.target() => Ok(false),
        _ => SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let plain = &mut scratch.plain;
            let result = codec
                .open_into(ct, aad, plain)
                .map(|(k, _)| k == codec.target());
            plain.as_mut_slice().zeroize();
            plain.clear();
            result
        }),
    }
}

/// What [`reseal`] made of a ciphertext.
#[derive(Debug, PartialEq, Eq)]
pub enum Resealed {
    /// Already under the target key; nothing to write.
    Current,
    /// A new ciphertext, verified to open to the same plaintext under the
    /// target key, was handed to the caller's `emit`.
    New,
}

/// Per-thread plaintext, check and new-ciphertext buffers; the first two
/// are wiped after every value.
struct Scratch {
    plain: Vec<u8>,
    check: Vec<u8>,
    sealed: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { plain: Vec::new(), check: Vec::new(), sealed: Vec::new() })
    };
}

/// The re-encryption core: opens `ct` with `read`, seals the plaintext with
/// `write`, opens the result again and compares (verify-before-write), then
/// hands the new ciphertext to `emit`, which copies it where it is kept.
/// `keep_current`: a value `read` opens under its target key is left as it
/// is (a rotation; false for a migration, where every old-format value moves).
/// Plaintext lives only in per-thread buffers that are wiped before return.
pub fn reseal(
    read: &dyn Codec,
    write: &dyn Codec,
    ct: &[u8],
    aad: &[u8],
    keep_current: bool,
    emit: impl FnOnce(&[u8]) -> Result<(), CodecError>,
) -> Result<Resealed, CodecError> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let Scratch {
            plain,
            check,
            sealed,
        } = &mut *scratch;
        let result = (|| {
            let (key, timestamp) = read.open_into(ct, aad, plain)?;
            if keep_current && key == read.target() {
                return Ok(Resealed::Current);
            }
            write.seal(plain, aad, timestamp, sealed);
            match write.open_into(sealed, aad, check) {
                Ok((k, _)) if k == write.target() && check == plain => {
                    emit(sealed).map(|()| Resealed::New)
                }
                _ => Err(CodecError::VerifyMismatch),
            }
        })();
        for buf in [plain, check] {
            buf.as_mut_slice().zeroize();
            buf.clear();
        }
        sealed.clear();
        result
    })
}

/// Re-encrypts one stored value under the target key, appending the new
/// value to `out`, or says why not (and appends nothing).
/// A hash-only target's ciphertexts are only opened, never rewritten.
pub fn rewrite_value(
    target: &Target,
    col: usize,
    stored: &[u8],
    aad: &[u8],
    out: &mut Vec<u8>,
) -> Cell {
    if target.hash_only() {
        return rehash::left_as_is(target, col, stored, aad);
    }
    let column = &target.columns[col];
    let (read, write) = (&target.read, &target.write);
    if target.migrating {
        // Already migrated (a resumed or repeated run)?
        if let Ok(ct) = decode(column.write, stored) {
            if on_target(write, &ct, aad).unwrap_or(false) {
                return Cell::Current;
            }
        }
    }
    let ct = match decode(column.read, stored) {
        Ok(ct) => ct,
        Err(e) => return Cell::Failed(e),
    };
    if !target.migrating && read.codec.key_hint(&ct) == Some(read.codec.target()) {
        // Claims the target key: check it really opens before calling it current.
        return match on_target(read, &ct, aad) {
            Ok(true) => Cell::Current,
            Ok(false) => Cell::Failed(CodecError::AuthFailed),
            Err(e) => Cell::Failed(e),
        };
    }
    let start = out.len();
    let emit = |sealed: &[u8]| encode_into(column.write, sealed, out);
    match reseal(
        &*read.codec,
        &*write.codec,
        &ct,
        aad,
        !target.migrating,
        emit,
    ) {
        Ok(Resealed::Current) => Cell::Current,
        Ok(Resealed::New) => Cell::Rewritten(Span::since(start, out)),
        Err(e) => Cell::Failed(e),
    }
}

/// Which key a stored value is under: the target format first, then (when
/// migrating) the old one.
/// A hash-only target's ciphertexts are out of its scope: `Current` when they open.
pub fn classify_value(target: &Target, col: usize, stored: &[u8], aad: &[u8]) -> Cell {
    if target.hash_only() {
        return rehash::left_as_is(target, col, stored, aad);
    }
    let column = &target.columns[col];
    let written = decode(column.write, stored).and_then(|ct| target.write.codec.open(&ct, aad));
    match written {
        Ok(o) => {
            let prefix = if target.migrating {
                format!("{} ", target.write.format.name())
            } else {
                String::new()
            };
            Cell::Opened {
                label: format!("{prefix}{}", target.write.codec.key_label(o.key)),
                key: o.key,
                on_target: o.key == target.write.codec.target(),
            }
        }
        Err(e) if !target.migrating => Cell::Failed(e),
        Err(e) => match decode(column.read, stored).and_then(|ct| target.read.codec.open(&ct, aad))
        {
            Ok(o) => Cell::Opened {
                label: format!(
                    "{} {}",
                    target.read.format.name(),
                    target.read.codec.key_label(o.key)
                ),
                key: o.key,
                on_target: false,
            },
            Err(_) => Cell::Failed(e),
        },
    }
}

#[cfg(test)]
mod tests;
