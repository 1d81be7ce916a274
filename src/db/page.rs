//! A page of result rows held compactly: every value's bytes back to back in
//! one buffer, and one small span per value.
//!
//! A lane holds up to two pages, so what a page costs per row is paid by
//! every lane twice over. The driver's own rows cost about 160 bytes
//! each beside their values (a struct, a list of column ranges of its own,
//! and the message framing they point into); a span costs 8 bytes.

use std::ops::Range;

use thiserror::Error;
use tokio_postgres::Row;

use super::raw::{self, KeyBytes};

/// Where one value lies in a page's buffer; a NULL has no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    /// The value's length, or [`NULL`].
    len: u32,
}

/// The length a NULL's span carries.
const NULL: u32 = u32::MAX;

/// A page that could not be held.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PageError {
    /// Its values passed 4 GiB, which the spans do not reach.
    #[error("a page's values passed 4 GiB; read fewer bytes at a time (--max-batch-bytes)")]
    TooLarge,
    /// A row had a different number of columns than the page's first.
    #[error("a row of {found} columns in a page of {width}")]
    Width {
        /// The page's columns.
        width: usize,
        /// The row's columns.
        found: usize,
    },
}

/// Rows of raw binary values, each with the same number of columns. Its
/// `Debug` shows its shape, never the values (keys and ciphertexts).
#[derive(Default)]
pub struct Page {
    /// Columns per row.
    width: usize,
    /// Every value's bytes, row after row.
    bytes: Vec<u8>,
    /// One span per value, row-major.
    spans: Vec<Span>,
}

impl Page {
    /// An empty page with places for `rows` rows of `width` columns.
    pub fn with_capacity(rows: usize, width: usize) -> Self {
        Page::with_room(rows, width, 0)
    }

    /// An empty page with places for `rows` rows of `width` columns and
    /// room for `bytes` bytes of their values.
    pub fn with_room(rows: usize, width: usize, bytes: usize) -> Self {
        Page {
            width,
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(rows * width),
        }
    }

    /// Bytes of every value it holds.
    pub fn value_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The driver's rows, copied into a page.
    pub fn from_rows(rows: &[Row]) -> Result<Self, PageError> {
        let width = rows.first().map_or(0, Row::len);
        let mut page = Page::with_capacity(rows.len(), width);
        for row in rows {
            page.push(row)?;
        }
        Ok(page)
    }

    /// Copies one of the driver's rows in.
    pub fn push(&mut self, row: &Row) -> Result<(), PageError> {
        if self.spans.is_empty() && self.width == 0 {
            self.width = row.len();
        }
        if row.len() != self.width {
            return Err(PageError::Width {
                width: self.width,
                found: row.len(),
            });
        }
        self.push_values((0..row.len()).map(|c| raw::value(row, c)))
    }

    /// Appends a row from its values (`None` for NULL).
    fn push_values<'a>(
        &mut self,
        values: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<(), PageError> {
        for value in values {
            let span = match value {
                None => Span {
                    start: 0,
                    len: NULL,
                },
                Some(v) => {
                    let start = u32::try_from(self.bytes.len()).map_err(|_| PageError::TooLarge)?;
                    let len = u32::try_from(v.len())
                        .ok()
                        .filter(|&l| l != NULL && start.checked_add(l).is_some())
                        .ok_or(PageError::TooLarge)?;
                    self.bytes.extend_from_slice(v);
                    Span { start, len }
                }
            };
            self.spans.push(span);
        }
        Ok(())
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.spans.len().checked_div(self.width).unwrap_or(0)
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Row `r` (panics past the end, like indexing a slice).
    pub fn row(&self, r: usize) -> PageRow<'_> {
        assert!(r < self.len(), "row {r} of a page of {}", self.len());
        PageRow { page: self, r }
    }

    /// Its rows in order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = PageRow<'_>> + Clone {
        (0..self.len()).map(move |r| PageRow { page: self, r })
    }

    /// Its last row.
    pub fn last(&self) -> Option<PageRow<'_>> {
        self.len().checked_sub(1).map(|r| self.row(r))
    }

    /// Bytes of its values in columns `columns` of every row.
    pub fn bytes_in(&self, columns: Range<usize>) -> usize {
        let columns = columns.start..columns.end.min(self.width);
        self.rows()
            .map(|row| {
                columns
                    .clone()
                    .filter_map(|c| row.get(c))
                    .map(<[u8]>::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Splits off the rows from `at` on into a page of their own.
    pub fn split_off(&mut self, at: usize) -> Page {
        let at = at.min(self.len());
        let spans = self.spans.split_off(at * self.width);
        // values lie in row order: the rest's bytes start at its first value's
        // (a page's bytes fit in u32, as every span's end does)
        let from = spans
            .iter()
            .find(|s| s.len != NULL)
            .map_or(self.bytes.len() as u32, |s| s.start);
        let bytes = self.bytes.split_off(from as usize);
        let spans = spans
            .into_iter()
            .map(|s| match s.len {
                NULL => s,
                _ => Span {
                    start: s.start - from,
                    len: s.len,
                },
            })
            .collect();
        self.shrink_to_fit();
        Page {
            width: self.width,
            bytes,
            spans,
        }
    }

    /// Gives back room it reserved and does not use.
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.spans.shrink_to_fit();
    }

    /// Gives back the room for its values where over a quarter of it is unused.
    pub fn shrink_if_roomy(&mut self) {
        if self.bytes.capacity() - self.bytes.len() > self.bytes.len() / 4 {
            self.bytes.shrink_to_fit();
        }
        if self.spans.capacity() - self.spans.len() > self.spans.len() / 4 {
            self.spans.shrink_to_fit();
        }
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("rows", &self.len())
            .field("width", &self.width)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The bytes a span points at.
fn value(bytes: &[u8], span: Span) -> Option<&[u8]> {
    (span.len != NULL).then(|| &bytes[span.start as usize..(span.start + span.len) as usize])
}

/// One row of a [`Page`] (its `Debug` shows where it is, never its values).
#[derive(Debug, Clone, Copy)]
pub struct PageRow<'a> {
    page: &'a Page,
    r: usize,
}

impl<'a> PageRow<'a> {
    /// The value in column `c`: `None` for NULL or past the row's columns.
    pub fn get(&self, c: usize) -> Option<&'a [u8]> {
        if c >= self.page.width {
            return None;
        }
        value(
            &self.page.bytes,
            self.page.spans[self.r * self.page.width + c],
        )
    }

    /// Its first `n` columns as raw bytes (key columns come first in every
    /// row rekey reads); a NULL reads as empty, which no key column holds.
    pub fn leading(&self, n: usize) -> impl Iterator<Item = &'a [u8]> + 'a {
        let row = *self;
        (0..n).map(move |c| row.get(c).unwrap_or_default())
    }

    /// Its key, where its first `n` columns are the key, owned.
    pub fn key(&self, n: usize) -> KeyBytes {
        self.leading(n).map(<[u8]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(rows: &[&[Option<&[u8]>]]) -> Page {
        let mut p = Page::with_capacity(rows.len(), rows.first().map_or(0, |r| r.len()));
        for r in rows {
            p.push_values(r.iter().copied()).expect("fits");
        }
        p
    }

    #[test]
    fn a_page_gives_back_each_value_and_null_as_read() {
        let p = page(&[
            &[Some(b"k1"), Some(b""), None],
            &[Some(b"k2"), None, Some(b"xyz")],
        ]);
        assert_eq!(p.len(), 2);
        let r0 = p.row(0);
        assert_eq!(
            (r0.get(0), r0.get(1), r0.get(2)),
            (Some(&b"k1"[..]), Some(&b""[..]), None)
        );
        let r1 = p.row(1);
        assert_eq!(
            (r1.get(0), r1.get(1), r1.get(2)),
            (Some(&b"k2"[..]), None, Some(&b"xyz"[..]))
        );
        assert_eq!(r1.get(3), None, "past the row's columns");
        assert_eq!(p.last().map(|r| r.key(1)), Some(vec![b"k2".to_vec()]));
        assert_eq!(p.bytes_in(1..3), 3);
        assert_eq!(
            format!("{p:?}"),
            "Page { rows: 2, width: 3, bytes: 7 }",
            "its Debug shows no value"
        );
    }

    #[test]
    fn a_split_page_keeps_each_rows_values_on_both_sides() {
        let mut p = page(&[
            &[Some(b"a"), Some(b"11")],
            &[Some(b"b"), None],
            &[Some(b"c"), Some(b"333")],
            &[Some(b"d"), Some(b"4444")],
        ]);
        let rest = p.split_off(2);
        type Pair<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);
        fn keys(p: &Page) -> Vec<Pair<'_>> {
            p.rows().map(|r| (r.get(0), r.get(1))).collect()
        }
        assert_eq!(
            keys(&p),
            vec![(Some(&b"a"[..]), Some(&b"11"[..])), (Some(&b"b"[..]), None)]
        );
        assert_eq!(
            keys(&rest),
            vec![
                (Some(&b"c"[..]), Some(&b"333"[..])),
                (Some(&b"d"[..]), Some(&b"4444"[..]))
            ]
        );
        assert_eq!(p.bytes.len(), 4, "the first part keeps only its own bytes");

        let mut q = page(&[&[Some(b"a"), Some(b"11")], &[None, Some(b"22")]]);
        let rest = q.split_off(1);
        assert_eq!(
            keys(&rest),
            vec![(None, Some(&b"22"[..]))],
            "a rest that starts with NULL"
        );
        assert_eq!(keys(&q), vec![(Some(&b"a"[..]), Some(&b"11"[..]))]);
    }

    #[test]
    fn an_empty_page_has_no_rows() {
        let p = Page::default();
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
        assert!(p.last().is_none());
    }
}
