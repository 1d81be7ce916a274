//! Counters: what a batch, a range or a whole run did.
//!
//! [`Counts`] is plain data, added up per batch by the sink and stored with
//! each checkpoint; [`LiveCounts`] is the same set as atomics, read by the
//! progress line while the pipeline runs.

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
}

impl LiveCounts {
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
