//! Session-level advisory locks: who may open, restart or share a job, and
//! one lifecycle command per job at a time.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// How long to wait for a session-level advisory lock: a process that was
/// just killed leaves its server session (and the lock) alive until the
/// server notices the closed connection, a moment later.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the advisory lock named `name` for `client`'s session, retrying for
/// [`LOCK_GRACE`]; false if another session still holds it then.
pub async fn advisory_lock(client: &Client, name: &str) -> Result<bool, Error> {
    lock_within_grace(client, name, false).await
}

/// [`advisory_lock`], shared (`pg_try_advisory_lock_shared`) or exclusive.
async fn lock_within_grace(client: &Client, name: &str, shared: bool) -> Result<bool, Error> {
    let sql = if shared {
        "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))"
    } else {
        "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
    };
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        let got: bool = client
            .query_one(sql, &[&name])
            .await
            .ctx(|| format!("taking the lock {name:?}"))?
            .get(0);
        if got || std::time::Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Joins the job on `client`'s session: any number of `rekey run` processes
/// share a job (they lease its ranges), while `--restart` needs it to
/// itself. The lock lasts as long as the session.
pub async fn lock_job(client: &Client, name: &str, restart: bool) -> Result<(), Error> {
    if lock_within_grace(client, &format!("rekey.job:{name}"), !restart).await? {
        return Ok(());
    }
    Err(Error::Runtime(if restart {
        format!("job {name:?} is being run by other rekey processes on this database; stop them first (`rekey stop --job ...`), then restart")
    } else {
        format!(
            "job {name:?} is being restarted by another rekey process; wait for it, then run again"
        )
    }))
}

/// Whether another session holds job `name`'s lock (a `rekey run` sharing
/// it, a restart): looked at, for [`LOCK_GRACE`], without keeping the lock.
pub async fn job_in_use(client: &Client, name: &str) -> Result<bool, Error> {
    let key = format!("rekey.job:{name}");
    if !lock_within_grace(client, &key, false).await? {
        return Ok(true);
    }
    client
        .query_one(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&key],
        )
        .await
        .ctx(|| format!("releasing the lock {key:?}"))?;
    Ok(false)
}

/// Waits for the session-level advisory lock `name` as long as it takes,
/// whatever `lock_timeout` the session has: the process holding it does work
/// this one must wait for (preparing the schema, opening a job, re-reading
/// conflicts).
pub async fn wait_for(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SET lock_timeout = 0; SET statement_timeout = 0")
        .await?;
    let locked = client
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&name])
        .await;
    client
        .batch_execute("RESET lock_timeout; RESET statement_timeout")
        .await?;
    locked.map(|_| ())
}

/// Gives back the session-level advisory lock `name`.
pub async fn release(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&name],
        )
        .await
        .map(|_| ())
}

/// Turns a `--restart`'s exclusive job lock into a shared one, so other
/// processes can join the new job.
pub async fn share_job_lock(client: &Client, name: &str) -> Result<(), Error> {
    let lock = format!("rekey.job:{name}");
    client
        .execute("SELECT pg_advisory_lock_shared(hashtextextended($1, 0)), pg_advisory_unlock(hashtextextended($1, 0))", &[&lock])
        .await
        .ctx(|| format!("sharing job {name:?}"))?;
    Ok(())
}

/// One lifecycle command per job at a time: two racing `rotate`s could
/// otherwise stage two different keys under one id. Held by `client`'s
/// session until it closes.
pub async fn lock_lifecycle(client: &Client, name: &str) -> Result<(), Error> {
    if advisory_lock(client, &format!("rekey.lifecycle:{name}")).await? {
        Ok(())
    } else {
        Err(Error::Runtime(format!("another rekey rotate or secrets command is working on job {name:?}; wait for it to finish")))
    }
}
