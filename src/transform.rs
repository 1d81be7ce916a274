//! Transform: decrypt under the old key, encrypt under the target key, and
//! check the result, for every value of a batch, on the rayon pool.
//!
//! Pure CPU: no I/O and no await. Verify-before-write: each new ciphertext is
//! opened again and compared with the plaintext before it may leave this
//! stage, so a value is only ever replaced by one that decrypts to the same
//! plaintext (DESIGN.md, invariant 2).

use base64::Engine as _;
use rayon::prelude::*;
use tokio_postgres::Row;

use crate::catalog::Storage;
use crate::codec::CodecError;
use crate::db::RawRef;
use crate::job::Target;
use crate::keyring::KeyId;

/// What the transform decided for one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// NULL: nothing to do.
    Null,
    /// Already under the target key: left as is.
    Current,
    /// The new ciphertext (as stored: bytes, or base64 text) to write.
    Rewritten(Vec<u8>),
    /// Opened under this key (verify only; nothing is written).
    Opened(KeyId),
    /// Could not be opened: quarantined, never overwritten.
    Failed(CodecError),
}

/// The encrypted value in column `col` of a page row, as stored.
pub fn value<'a>(target: &Target, row: &'a Row, col: usize) -> Option<&'a [u8]> {
    row.try_get::<_, Option<RawRef>>(target.key.len() + col).ok().flatten().map(|r| r.0)
}

/// Decides every cell of a batch; `cells` is row-major, one per encrypted column.
pub fn rewrite(target: &Target, rows: &[Row], cells: &mut Vec<Cell>) {
    fill(target, rows, cells, |col, stored| rewrite_value(target, col, stored));
}

/// Opens every value of a batch to see which key it is under (verify).
pub fn classify(target: &Target, rows: &[Row], cells: &mut Vec<Cell>) {
    fill(target, rows, cells, |col, stored| match unwrap_storage(target.columns[col].storage, stored) {
        Err(e) => Cell::Failed(e),
        Ok(ct) => match target.codec.open(&ct, &[]) {
            Ok(opened) => Cell::Opened(opened.key),
            Err(e) => Cell::Failed(e),
        },
    });
}

fn fill(target: &Target, rows: &[Row], cells: &mut Vec<Cell>, decide: impl Fn(usize, &[u8]) -> Cell + Sync) {
    let ncols = target.columns.len();
    cells.clear();
    cells.resize(rows.len() * ncols, Cell::Null);
    cells.par_chunks_mut(ncols).zip(rows.par_iter()).with_min_len(64).for_each(|(out, row)| {
        for (col, cell) in out.iter_mut().enumerate() {
            *cell = match value(target, row, col) {
                None => Cell::Null,
                Some(stored) => decide(col, stored),
            };
        }
    });
}

fn unwrap_storage(storage: Storage, stored: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CodecError> {
    match storage {
        Storage::Bytea => Ok(std::borrow::Cow::Borrowed(stored)),
        Storage::Base64Text => base64::engine::general_purpose::STANDARD
            .decode(stored)
            .map(std::borrow::Cow::Owned)
            .map_err(|_| CodecError::BadEncoding),
    }
}

/// Re-encrypts one stored value under the target key, or says why not.
pub fn rewrite_value(target: &Target, col: usize, stored: &[u8]) -> Cell {
    let codec = &*target.codec;
    let storage = target.columns[col].storage;
    let ct = match unwrap_storage(storage, stored) {
        Ok(ct) => ct,
        Err(e) => return Cell::Failed(e),
    };
    if codec.key_hint(&ct) == Some(codec.target()) {
        // Claims the target key: check it really opens before calling it current.
        return match codec.open(&ct, &[]) {
            Ok(_) => Cell::Current,
            Err(e) => Cell::Failed(e),
        };
    }
    let opened = match codec.open(&ct, &[]) {
        Ok(o) => o,
        Err(e) => return Cell::Failed(e),
    };
    if opened.key == codec.target() {
        return Cell::Current;
    }
    let mut sealed = Vec::new();
    codec.seal(&opened.plaintext, &[], opened.timestamp, &mut sealed);
    match codec.open(&sealed, &[]) {
        Ok(check) if check.key == codec.target() && check.plaintext == opened.plaintext => {}
        _ => return Cell::Failed(CodecError::VerifyMismatch),
    }
    match storage {
        Storage::Bytea => Cell::Rewritten(sealed),
        Storage::Base64Text => Cell::Rewritten(base64::engine::general_purpose::STANDARD.encode(&sealed).into_bytes()),
    }
}
