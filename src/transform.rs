//! Transform: decrypt under the old key, encrypt under the target key, and
//! check the result, for every value of a batch, on the rayon pool.
//!
//! Pure CPU: no I/O and no await. Verify-before-write: each new ciphertext is
//! opened again and compared with the plaintext before it may leave this
//! stage, so a value is only ever replaced by one that decrypts to the same
//! plaintext (DESIGN.md, invariant 2).

use std::borrow::Cow;

use base64::Engine as _;
use rayon::prelude::*;
use tokio_postgres::Row;

use crate::codec::CodecError;
use crate::db::RawRef;
use crate::job::{Aad, Encoding, Side, Target};

/// What the transform decided for one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// NULL: nothing to do.
    Null,
    /// Already under the target key (in the target format): left as is.
    Current,
    /// The new ciphertext, as it is stored (bytes, base64 or token text), to write.
    Rewritten(Vec<u8>),
    /// Opened (verify only; nothing is written): the key's label, and whether it is the target key.
    Opened(String, bool),
    /// Could not be opened: quarantined, never overwritten.
    Failed(CodecError),
}

/// The encrypted value in column `col` of a page row, as stored.
pub fn value<'a>(target: &Target, row: &'a Row, col: usize) -> Option<&'a [u8]> {
    row.try_get::<_, Option<RawRef>>(target.key.len() + col).ok().flatten().map(|r| r.0)
}

/// The associated data for the values of a page row.
pub fn aad<'a>(target: &'a Target, row: &'a Row) -> &'a [u8] {
    match &target.aad {
        Aad::None => &[],
        Aad::Constant(bytes) => bytes,
        Aad::Column(_) => row
            .try_get::<_, Option<RawRef>>(target.key.len() + target.columns.len())
            .ok()
            .flatten()
            .map_or(&[], |r| r.0),
    }
}

/// Decides every cell of a batch; `cells` is row-major, one per encrypted column.
pub fn rewrite(target: &Target, rows: &[Row], cells: &mut Vec<Cell>) {
    fill(target, rows, cells, |col, stored, aad| rewrite_value(target, col, stored, aad));
}

/// Opens every value of a batch to see which key (and format) it is under (verify).
pub fn classify(target: &Target, rows: &[Row], cells: &mut Vec<Cell>) {
    fill(target, rows, cells, |col, stored, aad| classify_value(target, col, stored, aad));
}

fn fill(target: &Target, rows: &[Row], cells: &mut Vec<Cell>, decide: impl Fn(usize, &[u8], &[u8]) -> Cell + Sync) {
    let ncols = target.columns.len();
    cells.clear();
    cells.resize(rows.len() * ncols, Cell::Null);
    cells.par_chunks_mut(ncols).zip(rows.par_iter()).with_min_len(64).for_each(|(out, row)| {
        let aad = aad(target, row);
        for (col, cell) in out.iter_mut().enumerate() {
            *cell = match value(target, row, col) {
                None => Cell::Null,
                Some(stored) => decide(col, stored, aad),
            };
        }
    });
}

fn decode(encoding: Encoding, stored: &[u8]) -> Result<Cow<'_, [u8]>, CodecError> {
    match encoding {
        Encoding::Raw => Ok(Cow::Borrowed(stored)),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(stored).map(Cow::Owned).map_err(|_| CodecError::BadEncoding),
    }
}

fn encode(encoding: Encoding, sealed: Vec<u8>) -> Vec<u8> {
    match encoding {
        Encoding::Raw => sealed,
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&sealed).into_bytes(),
    }
}

/// Whether `ct` is a value of `side`'s format that opens under its target key.
fn on_target(side: &Side, ct: &[u8], aad: &[u8]) -> Result<bool, CodecError> {
    let codec = &*side.codec;
    match codec.key_hint(ct) {
        Some(k) if k != codec.target() => Ok(false),
        _ => codec.open(ct, aad).map(|o| o.key == codec.target()),
    }
}

/// Re-encrypts one stored value under the target key, or says why not.
pub fn rewrite_value(target: &Target, col: usize, stored: &[u8], aad: &[u8]) -> Cell {
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
        return match read.codec.open(&ct, aad) {
            Ok(_) => Cell::Current,
            Err(e) => Cell::Failed(e),
        };
    }
    let opened = match read.codec.open(&ct, aad) {
        Ok(o) => o,
        Err(e) => return Cell::Failed(e),
    };
    if !target.migrating && opened.key == read.codec.target() {
        return Cell::Current;
    }
    let mut sealed = Vec::new();
    write.codec.seal(&opened.plaintext, aad, opened.timestamp, &mut sealed);
    match write.codec.open(&sealed, aad) {
        Ok(check) if check.key == write.codec.target() && check.plaintext == opened.plaintext => {}
        _ => return Cell::Failed(CodecError::VerifyMismatch),
    }
    Cell::Rewritten(encode(column.write, sealed))
}

/// Which key a stored value is under: the target format first, then (when
/// migrating) the old one.
pub fn classify_value(target: &Target, col: usize, stored: &[u8], aad: &[u8]) -> Cell {
    let column = &target.columns[col];
    let written = decode(column.write, stored).and_then(|ct| target.write.codec.open(&ct, aad));
    match written {
        Ok(o) => {
            let prefix = if target.migrating { format!("{} ", target.write.format.name()) } else { String::new() };
            Cell::Opened(format!("{prefix}{}", target.write.codec.key_label(o.key)), o.key == target.write.codec.target())
        }
        Err(e) if !target.migrating => Cell::Failed(e),
        Err(e) => match decode(column.read, stored).and_then(|ct| target.read.codec.open(&ct, aad)) {
            Ok(o) => Cell::Opened(format!("{} {}", target.read.format.name(), target.read.codec.key_label(o.key)), false),
            Err(_) => Cell::Failed(e),
        },
    }
}
