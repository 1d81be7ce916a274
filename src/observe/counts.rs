//! Counters: what a batch, a range or a whole run did.
//!
//! [`Counts`] is plain data, added up per batch by the sink and stored with
//! each checkpoint; [`LiveCounts`] is the same set as atomics, read by the
//! progress line while the pipeline runs, with the rows of the batches
//! being written ([`Writing`]).

use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// What was done to rows and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Rows read from the source.
    pub rows_scanned: u64,
    /// Rows whose update committed.
    pub rows_rewritten: u64,
    /// Values re-encrypted and committed.
    pub values_rewritten: u64,
    /// Values left as they were: NULL, or already on the target key.
    pub values_skipped: u64,
    /// Values that could not be decrypted (quarantined).
    pub values_failed: u64,
    /// Rows changed by someone else between read and write, left untouched.
    pub conflicts: u64,
    /// Values the database refused or undid the write of, twice (a trigger, a
    /// policy): still under their old key.
    pub values_not_rotated: u64,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.rows_scanned += o.rows_scanned;
        self.rows_rewritten += o.rows_rewritten;
        self.values_rewritten += o.values_rewritten;
        self.values_skipped += o.values_skipped;
        self.values_failed += o.values_failed;
        self.conflicts += o.conflicts;
        self.values_not_rotated += o.values_not_rotated;
    }
}

/// [`Counts`] shared between the sink tasks and the progress display.
#[derive(Debug, Default)]
pub struct LiveCounts {
    rows_scanned: AtomicU64,
    rows_rewritten: AtomicU64,
    values_rewritten: AtomicU64,
    values_skipped: AtomicU64,
    values_failed: AtomicU64,
    conflicts: AtomicU64,
    values_not_rotated: AtomicU64,
    /// Rows of the batches being written: from before their commit is sent
    /// until after they are added (or given up).
    writing: AtomicU64,
}

/// A batch of rows being written, counted in [`LiveCounts::own_so_far`]
/// until dropped; dropped after its counts are added, or when it is given up.
#[derive(Debug)]
pub struct Writing<'a> {
    live: &'a LiveCounts,
    rows: u64,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        // Release: the batch's counts, added before, are seen by whoever sees this
        self.live.writing.fetch_sub(self.rows, Ordering::Release);
    }
}

impl LiveCounts {
    /// Counts `rows` as being written until the returned guard is dropped:
    /// take it before the batch's commit is sent, drop it after [`Self::add`].
    pub fn writing(&self, rows: u64) -> Writing<'_> {
        self.writing.fetch_add(rows, Ordering::AcqRel);
        Writing { live: self, rows }
    }

    /// The rows scanned so far, with those of batches being written: at
    /// least every row of this process's that another connection can see
    /// committed (read after what that connection saw), where the rows
    /// scanned alone can lag a batch just committed.
    pub fn own_so_far(&self) -> u64 {
        // a batch gone from `writing` was added first (see `Writing::drop`)
        let writing = self.writing.load(Ordering::Acquire);
        writing + self.rows_scanned.load(Ordering::Relaxed)
    }

    /// Adds one committed batch.
    pub fn add(&self, c: &Counts) {
        self.rows_scanned
            .fetch_add(c.rows_scanned, Ordering::Relaxed);
        self.rows_rewritten
            .fetch_add(c.rows_rewritten, Ordering::Relaxed);
        self.values_rewritten
            .fetch_add(c.values_rewritten, Ordering::Relaxed);
        self.values_skipped
            .fetch_add(c.values_skipped, Ordering::Relaxed);
        self.values_failed
            .fetch_add(c.values_failed, Ordering::Relaxed);
        self.conflicts.fetch_add(c.conflicts, Ordering::Relaxed);
        self.values_not_rotated
            .fetch_add(c.values_not_rotated, Ordering::Relaxed);
    }

    /// A consistent-enough copy for display and the final summary.
    pub fn snapshot(&self) -> Counts {
        Counts {
            rows_scanned: self.rows_scanned.load(Ordering::Relaxed),
            rows_rewritten: self.rows_rewritten.load(Ordering::Relaxed),
            values_rewritten: self.values_rewritten.load(Ordering::Relaxed),
            values_skipped: self.values_skipped.load(Ordering::Relaxed),
            values_failed: self.values_failed.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            values_not_rotated: self.values_not_rotated.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(rows: u64) -> Counts {
        Counts {
            rows_scanned: rows,
            ..Counts::default()
        }
    }

    #[test]
    fn a_batch_being_written_counts_as_this_process_s_from_before_its_commit_to_after_it_is_added()
    {
        let live = LiveCounts::default();
        live.add(&scanned(100));
        let writing = live.writing(50);
        assert_eq!(live.own_so_far(), 150, "sent, maybe committed");
        live.add(&scanned(50));
        assert_eq!(live.own_so_far(), 200, "added and still writing");
        drop(writing);
        assert_eq!(live.own_so_far(), 150);
        assert_eq!(live.snapshot().rows_scanned, 150);
    }

    #[test]
    fn a_batch_given_up_no_longer_counts() {
        let live = LiveCounts::default();
        drop(live.writing(50));
        assert_eq!(live.own_so_far(), 0);
    }
}
