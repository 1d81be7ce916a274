//! A session that holds session-level locks (a job's share, one lifecycle
//! command per job) sits idle while other sessions do the work of a run or
//! a full verify; a server with `idle_session_timeout` closes it, and its
//! locks go with it while the work goes on. [`keeping_alive`] keeps it busy
//! enough not to be closed.

use std::future::Future;
use std::time::Duration;

use tokio_postgres::Client;

/// Runs `work`, and meanwhile sends `client`'s session a `SELECT 1` every
/// third of the server's `idle_session_timeout`, so the server never closes
/// it for idling (nor its locks with it). Where the server has no such
/// timeout (0, or a server before PostgreSQL 14), just `work`. A ping that
/// fails ends the pinging, not the work: what follows finds the session
/// closed and says so, or reopens it.
pub async fn keeping_alive<T>(client: &Client, work: impl Future<Output = T>) -> T {
    let Some(every) = ping_interval(client).await else {
        return work.await;
    };
    let pings = async {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = client.simple_query("SELECT 1").await {
                tracing::debug!("keeping the session open: {e}");
                return;
            }
        }
    };
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => done,
        () = pings => work.await,
    }
}

/// A third of the session's `idle_session_timeout`, if it has one.
async fn ping_interval(client: &Client) -> Option<Duration> {
    let row = client
        .query_opt(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'idle_session_timeout'",
            &[],
        )
        .await;
    let ms: i64 = match row {
        Ok(Some(r)) => r.try_get(0).ok()?,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!("reading idle_session_timeout: {e}");
            return None;
        }
    };
    let ms = u64::try_from(ms).ok().filter(|&ms| ms > 0)?;
    Some(Duration::from_millis((ms / 3).max(1)))
}
