//! A session that holds session-level locks (a job's share, one lifecycle
//! command per job, a turn at the conflict re-reads) sits idle while other
//! sessions do the work of a run or a full verify; a server with
//! `idle_session_timeout` closes it, and its locks go with it while the
//! work goes on (a proxy or a NAT that drops idle connections does the
//! same). [`keeping_alive`] keeps it busy enough not to be closed.

use std::future::Future;
use std::time::Duration;

use tokio_postgres::Client;

/// The longest a session is left idle where the server sets no
/// `idle_session_timeout` (proxies, load balancers and NATs close idle
/// connections too).
const IDLE_AT_MOST: Duration = Duration::from_secs(60);

/// Runs `work` while keeping `client`'s session from idling
/// ([`ping_interval`], [`pinging`]).
pub async fn keeping_alive<T>(client: &Client, work: impl Future<Output = T>) -> T {
    let every = ping_interval(client).await;
    pinging(client, every, work).await
}

/// Runs `work`, and meanwhile sends `client`'s session a `SELECT 1` every
/// `every`. A ping that fails ends the pinging, not the work: what follows
/// finds the session closed and says so, or reopens it. `work` must not
/// use `client` itself (a ping would wait behind its statements).
pub async fn pinging<T>(client: &Client, every: Duration, work: impl Future<Output = T>) -> T {
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

/// How often to ping `client`'s session so it is never idle long enough to
/// be closed: a third of the server's `idle_session_timeout` (PostgreSQL 14
/// on), at most [`IDLE_AT_MOST`].
pub async fn ping_interval(client: &Client) -> Duration {
    let row = client
        .query_opt(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'idle_session_timeout'",
            &[],
        )
        .await;
    let ms: Option<i64> = match row {
        Ok(Some(r)) => r.try_get(0).ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!("reading idle_session_timeout: {e}");
            None
        }
    };
    ms.and_then(|ms| u64::try_from(ms).ok())
        .filter(|&ms| ms > 0)
        .map_or(IDLE_AT_MOST, |ms| {
            Duration::from_millis((ms / 3).max(1)).min(IDLE_AT_MOST)
        })
}
