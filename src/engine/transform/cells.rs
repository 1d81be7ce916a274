//! What the transform decided for each value of a batch, and the new
//! ciphertexts it made, kept in one buffer per part of 64 rows.
//!
//! A new ciphertext was its own heap allocation: 10,000 of them in a
//! 5,000-row batch of two columns, made on the rayon pool and freed on the
//! runtime's threads, where the allocator's arenas kept what they freed. A
//! part is the pool's unit of work, so each task appends to a buffer of its
//! own and nothing is shared while it runs.

use std::ops::Deref;

use crate::crypto::codec::CodecError;
use crate::crypto::keyring::KeyId;

/// The rows whose new values share one buffer (the pool's grain of work).
pub const PART_ROWS: usize = 64;

/// Where a new value lies in the buffer of its row's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The span of what was appended to `buf` since it held `start` bytes.
    pub fn since(start: usize, buf: &[u8]) -> Span {
        Span {
            start,
            end: buf.len(),
        }
    }

    /// The value in `buf`, the buffer it was appended to. Panics on a span
    /// past the buffer's end (like indexing a slice): a span is only made
    /// around what was appended, and a batch that panics is never written,
    /// where an empty value would overwrite a ciphertext.
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start..self.end]
    }
}

/// What the transform decided for one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// NULL, or empty (no ciphertext): nothing to do.
    Null,
    /// Already under the target key (in the target format): left as is.
    Current,
    /// A new value to write (ciphertext as stored: bytes, base64 or token
    /// text; or a search hash), in its part's buffer ([`Cells::new_value`]).
    Rewritten(Span),
    /// Opened (verify only; nothing is written).
    Opened {
        /// The key's label for people (`v2`, `fernet key 1`).
        label: String,
        /// The key that opened it.
        key: KeyId,
        /// Whether that is the target key, in the target format.
        on_target: bool,
    },
    /// Could not be opened: quarantined, never overwritten.
    Failed(CodecError),
}

/// The cells of a batch, row-major (one per encrypted column), and the
/// buffers of its new values. Reads as a slice of cells.
#[derive(Default)]
pub struct Cells {
    cells: Vec<Cell>,
    parts: Vec<Vec<u8>>,
    ncols: usize,
}

/// The cells and the size of each part's buffer: never the values.
impl std::fmt::Debug for Cells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cells")
            .field("cells", &self.cells)
            .field(
                "part_bytes",
                &self.parts.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Deref for Cells {
    type Target = [Cell];

    fn deref(&self) -> &[Cell] {
        &self.cells
    }
}

impl Cells {
    /// Every cell `Null`, for `rows` rows of `ncols` columns, each part's buffer empty.
    pub fn reset(&mut self, rows: usize, ncols: usize) {
        self.ncols = ncols.max(1);
        self.cells.clear();
        self.cells.resize(rows * self.ncols, Cell::Null);
        self.parts.clear();
        self.parts.resize_with(rows.div_ceil(PART_ROWS), Vec::new);
    }

    /// The cells of each part with the part's buffer, for the pool.
    pub fn par_parts_mut(
        &mut self,
    ) -> impl rayon::iter::IndexedParallelIterator<Item = (&mut [Cell], &mut Vec<u8>)> {
        use rayon::prelude::*;
        self.cells
            .par_chunks_mut(self.ncols * PART_ROWS)
            .zip(self.parts.par_iter_mut())
    }

    /// The new value of row `r`, column `c`, when there is one to write.
    pub fn new_value(&self, r: usize, c: usize) -> Option<&[u8]> {
        match self.cells.get(r * self.ncols + c)? {
            Cell::Rewritten(w) => Some(w.of(&self.parts[r / PART_ROWS])),
            _ => None,
        }
    }

    /// The cells of rows `at..` (with their new values) as a batch of their
    /// own; these keep rows `..at`, and give back the room they no longer use.
    pub fn split_off(&mut self, at: usize) -> Cells {
        let ncols = self.ncols.max(1);
        let at = at.min(self.cells.len() / ncols);
        let mut rest = Cells {
            cells: self.cells.split_off(at * ncols),
            parts: Vec::new(),
            ncols,
        };
        let rows = rest.cells.len() / ncols;
        rest.parts.resize_with(rows.div_ceil(PART_ROWS), Vec::new);
        // where the part the split cuts through stops holding the first part's
        // values: values lie in row order, so at the first one moved out of it
        let mut cut = None;
        // the rest's rows start a part of their own: their values move to it
        for r in 0..rows {
            for c in 0..ncols {
                let Cell::Rewritten(w) = &mut rest.cells[r * ncols + c] else {
                    continue;
                };
                let part = (at + r) / PART_ROWS;
                if part == at / PART_ROWS && cut.is_none() {
                    cut = Some(w.start);
                }
                let to = &mut rest.parts[r / PART_ROWS];
                let start = to.len();
                to.extend_from_slice(w.of(&self.parts[part]));
                *w = Span::since(start, to);
            }
        }
        self.parts.truncate(at.div_ceil(PART_ROWS));
        if let (Some(cut), Some(part)) = (cut, self.parts.get_mut(at / PART_ROWS)) {
            part.truncate(cut);
        }
        self.cells.shrink_to_fit();
        for p in &mut self.parts {
            p.shrink_to_fit();
        }
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Row r, column c: `r c` rewritten where (r + c) % 3 == 0, else Current.
    fn made(rows: usize, ncols: usize) -> Cells {
        let mut cells = Cells::default();
        cells.reset(rows, ncols);
        cells
            .par_parts_mut()
            .enumerate()
            .for_each(|(p, (out, buf))| {
                for (i, cell) in out.iter_mut().enumerate() {
                    let (r, c) = (p * PART_ROWS + i / ncols, i % ncols);
                    *cell = if (r + c).is_multiple_of(3) {
                        let start = buf.len();
                        buf.extend_from_slice(format!("{r} {c}").as_bytes());
                        Cell::Rewritten(Span::since(start, buf))
                    } else {
                        Cell::Current
                    };
                }
            });
        cells
    }

    fn expected(r: usize, c: usize) -> Option<Vec<u8>> {
        (r + c)
            .is_multiple_of(3)
            .then(|| format!("{r} {c}").into_bytes())
    }

    #[test]
    fn each_new_value_is_given_back_for_its_row_and_column() {
        let cells = made(200, 2);
        assert_eq!(cells.len(), 400);
        for r in 0..200 {
            for c in 0..2 {
                assert_eq!(cells.new_value(r, c).map(<[u8]>::to_vec), expected(r, c));
            }
        }
        assert_eq!(cells.new_value(200, 0), None);
    }

    #[test]
    fn a_split_keeps_each_rows_new_values_on_both_sides() {
        for at in [0, 1, 63, 64, 65, 130, 199, 200, 250] {
            let mut first = made(200, 2);
            let rest = first.split_off(at);
            let at = at.min(200);
            assert_eq!(
                (first.len(), rest.len()),
                (at * 2, (200 - at) * 2),
                "at {at}"
            );
            for r in 0..200 {
                for c in 0..2 {
                    let got = if r < at {
                        first.new_value(r, c)
                    } else {
                        rest.new_value(r - at, c)
                    };
                    assert_eq!(got.map(<[u8]>::to_vec), expected(r, c), "at {at}, row {r}");
                }
            }
            let kept: usize = (0..at)
                .flat_map(|r| (0..2).filter_map(move |c| expected(r, c)))
                .map(|v| v.len())
                .sum();
            let held: usize = first.parts.iter().map(Vec::len).sum();
            assert_eq!(
                held, kept,
                "at {at}: the first part holds only its own values"
            );
        }
    }

    #[test]
    fn debug_shows_where_new_values_lie_never_their_bytes() {
        let cells = made(3, 1);
        let shown = format!("{cells:?}");
        assert!(shown.contains("Rewritten"), "{shown}");
        assert!(!shown.contains("[48, 32, 48]"), "{shown}");
    }
}
