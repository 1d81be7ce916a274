//! Even lanes to the end: when a lane of this process waits for work while
//! another still reads, the reading lane splits what is left of its range
//! at the half-way key and hands the upper half back as a new range, so
//! every lane works until the last rows (in a fresh run and in a resumed one).

use std::sync::atomic::Ordering;

use crate::db::KeyBytes;
use crate::engine::source::Source;
use crate::state;
use crate::Error;

use super::work::{Shared, Work};

/// Fewest rows left in a range, in pages, for a split to be worth its query.
const MIN_PAGES_LEFT: i64 = 2;

/// Rows looked at to find the half-way key, in pages (bounded below and above).
const SCAN_PAGES: i64 = 32;

impl Shared {
    /// When a lane waits for work, splits the rest of the range at `index`
    /// (read up to `after`, ending at `upper`) that this lane holds under
    /// `generation`; returns the range's new upper bound, or `None` when no
    /// lane waits, too little is left, or the range changed hands meanwhile.
    pub(super) async fn split_for_idle_lane(
        &self,
        source: &mut Source,
        index: usize,
        after: Option<&KeyBytes>,
        upper: Option<&KeyBytes>,
        generation: Option<i64>,
        page: usize,
    ) -> Result<Option<KeyBytes>, Error> {
        let (Work::Leased { job_id, owner, .. }, Some(generation)) = (&self.work, generation)
        else {
            return Ok(None);
        };
        // one split for each waiting lane (it counts itself in again while it waits)
        if self
            .hungry
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1))
            .is_err()
        {
            return Ok(None);
        }
        let range = self.range(index);
        let target = &self.job.targets[range.target];
        let page = i64::try_from(page).unwrap_or(i64::MAX).max(1);
        let cap = page.saturating_mul(SCAN_PAGES).clamp(50_000, 1_000_000);
        let Some((at, left)) = source.split_point(target, after, upper, cap).await? else {
            return Ok(None);
        };
        if left < page.saturating_mul(MIN_PAGES_LEFT) {
            return Ok(None);
        }
        let Some(rest) = state::split_range(
            source.client_mut(),
            *job_id,
            owner,
            generation,
            &range,
            upper,
            &at,
        )
        .await?
        else {
            return Ok(None);
        };
        tracing::debug!(
            table = %target.table,
            range_no = range.range_no,
            new_range_no = rest.range_no,
            "split a range for an idle lane"
        );
        self.split(index, at.clone(), rest);
        Ok(Some(at))
    }
}
