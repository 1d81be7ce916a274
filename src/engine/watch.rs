//! The monitor task of a run: renews its leases and reads the signals
//! (live control, replica lag, the SQL gate) on a connection of its own,
//! and holds, releases or stops the sources accordingly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::control::monitor::{Monitor, Verdict};
use crate::db::idle::{ping_interval, pinging};
use crate::db::Database;
use crate::observe::events;
use crate::state;

use super::others::OthersDone;
use super::pipeline::{backend_pid, monitor_connection};
use super::work::{Shared, Work};

/// Reads the job's control and every signal once; `rows`: rows read so far.
pub(super) async fn read_signals(
    monitor: &mut Monitor,
    conn: &mut Client,
    job_id: Option<i64>,
    rows: u64,
) -> Verdict {
    let control = match job_id {
        Some(id) => match state::job_control(conn, id).await {
            Ok(c) => Some(c),
            Err(e) => {
                return Verdict::Hold(
                    "unreadable",
                    format!("the job's control is unreadable, holding: {}", e.chain()),
                )
            }
        },
        None => None,
    };
    monitor.check(conn, control, rows).await
}

/// Acts on a verdict: stop, hold or release the sources.
pub(super) fn apply(shared: &Shared, verdict: Verdict) {
    let (kind, reason) = match verdict {
        Verdict::Go => (None, None),
        Verdict::Hold(kind, reason) => (Some(kind), Some(reason)),
        Verdict::Stop(who) => {
            if !shared.stop.requested() {
                tracing::info!(
                    by = who.as_str(),
                    "stop asked by {}; stopping after the batches in flight commit",
                    who.as_str()
                );
            }
            shared.stop.trigger_by(who);
            (None, None)
        }
    };
    if shared.hold.set(reason.clone()) {
        shared.progress.set_hold(reason.as_deref());
        let previous = shared.note_hold(kind);
        events::ThrottleChanged {
            reason: kind,
            previous,
            detail: reason.as_deref(),
        }
        .emit();
    }
}

/// The monitor task: renews leases and reads the signals every `every`, on
/// a connection of its own (reopened when lost; meanwhile the run holds).
pub(super) async fn watch(
    shared: Arc<Shared>,
    db: Database,
    mut conn: Client,
    mut monitor: Monitor,
    others: OthersDone,
    every: Duration,
    job_id: Option<i64>,
) {
    let every = every.max(Duration::from_millis(50));
    // a --check-every longer than the server lets a session idle would have
    // the connection (whose backend owns the leases) closed between checks
    let ping_every = ping_interval(&conn).await;
    let mut last_beat = Instant::now();
    // under --max-wal-rate the run reads one page per check until a check
    // has measured the WAL a row costs: the first checks come as soon as a
    // batch has committed, not a whole interval later, until two have
    // measured it (the first batch is a small probe whose WAL includes the
    // job's own setup)
    let mut early_checks = if shared.wal_pace.is_some() {
        EARLY_CHECKS
    } else {
        0
    };
    loop {
        if early_checks > 0 {
            pinging(&conn, ping_every, next_commit_or(&shared, every)).await;
        } else if every > ping_every {
            pinging(&conn, ping_every, tokio::time::sleep(every)).await;
        } else {
            tokio::time::sleep(every).await;
        }
        if conn.is_closed() {
            apply(
                &shared,
                Verdict::Hold(
                    "unreadable",
                    "the monitor's connection was lost; reconnecting".into(),
                ),
            );
            let Some(c) = reopen_monitor(&shared, &db).await else {
                continue;
            };
            conn = c;
            last_beat = Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or(last_beat);
        }
        if let Work::Leased {
            job_id, owner, ttl, ..
        } = &shared.work
        {
            if last_beat.elapsed() >= *ttl / 3 {
                match state::heartbeat(&conn, *job_id, owner, *ttl, &shared.working()).await {
                    Ok(_) => last_beat = Instant::now(),
                    Err(e) => tracing::warn!(
                        "renewing leases failed (they lapse after --lease-ttl): {}",
                        e.chain()
                    ),
                }
            }
        }
        // a round that hangs (a half-open socket) holds the run and reconnects
        let limit = (every * 10).clamp(Duration::from_secs(5), Duration::from_secs(30));
        let rows = shared.live.snapshot().rows_scanned;
        let verdict =
            match tokio::time::timeout(limit, read_signals(&mut monitor, &mut conn, job_id, rows))
                .await
            {
                Ok(v) => {
                    let measured = monitor.wal_pace();
                    if measured.is_some() {
                        early_checks = early_checks.saturating_sub(1);
                    }
                    shared.pace_wal(measured);
                    v
                }
                Err(_) => {
                    if let Some(c) = reopen_monitor(&shared, &db).await {
                        conn = c;
                    }
                    Verdict::Hold(
                        "unreadable",
                        format!(
                            "reading the throttle signals took over {}s; holding",
                            limit.as_secs()
                        ),
                    )
                }
            };
        apply(&shared, verdict);
        if let Some(job_id) = job_id {
            let own = || shared.live.own_so_far();
            if let Ok(Some(rows)) =
                tokio::time::timeout(limit, others.read(&conn, job_id, own)).await
            {
                shared.progress.others_done(rows);
            }
        }
        for (stage, n) in [
            ("to_transform", &shared.queued.to_transform),
            ("to_sink", &shared.queued.to_sink),
        ] {
            events::QueueDepth {
                stage,
                depth: usize::try_from(n.load(Ordering::Relaxed)).unwrap_or(0),
            }
            .emit();
        }
        events::PagesHeld {
            pages: usize::try_from(shared.queued.pages.load(Ordering::Relaxed)).unwrap_or(0),
        }
        .emit();
    }
}

/// Waits `every`, or less: until a batch has committed since this began.
async fn next_commit_or(shared: &Shared, every: Duration) {
    let rows = shared.live.snapshot().rows_scanned;
    let until = Instant::now() + every;
    while Instant::now() < until && shared.live.snapshot().rows_scanned == rows {
        tokio::time::sleep(COMMIT_POLL.min(until.saturating_duration_since(Instant::now()))).await;
    }
}

/// Checks of a run under `--max-wal-rate` that measure the WAL a row
/// costs as soon as a batch commits.
const EARLY_CHECKS: u32 = 2;

/// How often [`next_commit_or`] looks for a commit.
const COMMIT_POLL: Duration = Duration::from_millis(20);

/// A new monitor connection; its backend pid becomes the one leases name.
pub(super) async fn reopen_monitor(shared: &Shared, db: &Database) -> Option<Client> {
    let conn = monitor_connection(db).await.ok()?;
    if let (Work::Leased { monitor_pid, .. }, Ok(pid)) = (&shared.work, backend_pid(&conn).await) {
        monitor_pid.store(pid, Ordering::Relaxed);
    }
    Some(conn)
}
