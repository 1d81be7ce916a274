//! The audit trail: one event per lifecycle step and per `rekey run`, as a
//! JSON line (appended and synced) and a row of `rekey.audit`, with the
//! fields of the healthprep policy's template plus the keys concerned (ids,
//! never material), the incident and the rotation, each event hash-chained
//! to the one before it ([`super::chain`]) so `rekey report --check` finds
//! an edited, deleted or reordered event.
//!
//! One chain per job name, shared by every process that writes events for
//! the job: an event is appended under a transaction-level advisory lock on
//! the chain, its place and link read inside that transaction, its JSON line
//! written before the commit, so the file and the table hold one order and
//! two writers can never fork the chain (a unique index on the place backs
//! the lock). A process stopped between the line and the commit leaves the
//! line alone in the file: the next event recorded through that file
//! records it in the table first ([`Audit::record`] says why every instant
//! of a crash ends consistent). Never a key value: secrets are named by
//! store and id.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::error::DbContext;
#[cfg(feature = "aws")]
use crate::secrets::KeySource;
use crate::secrets::KeysSpec;
use crate::Error;

use super::chain::uncommitted;
pub use super::chain::{Body, Event, GENESIS};

/// The context of every error writing the trail.
fn writing() -> String {
    "writing the audit trail (rekey.audit)".to_string()
}

/// What happened, for [`Audit::record`].
#[derive(Debug, Clone, Copy)]
pub struct What<'a> {
    /// The event type.
    pub event_type: &'a str,
    /// Store and key id.
    pub secret_id: &'a str,
    /// passed, failed, pending, not_applicable.
    pub verification_status: &'a str,
    /// Values concerned.
    pub affected_records: Option<u64>,
    /// What rekey says about the event (recorded as `detail`; the event's
    /// `notes` are the operator's, from `--notes`).
    pub notes: &'a str,
    /// The job concerned.
    pub job_id: Option<i64>,
}

/// The keys an event concerns (ids, never material).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditKeys {
    /// The key values move away from, when there is one.
    pub old: Option<KeyId>,
    /// The key values move to.
    pub new: Option<KeyId>,
}

/// Where and as whom events are written.
#[derive(Debug, Clone)]
pub struct Audit {
    /// The JSON lines file.
    pub path: PathBuf,
    /// Who: `--operator`, else REKEY_OPERATOR, else the OS user, else the
    /// database role (empty here: [`Audit::record`] asks the session).
    pub operator: String,
    /// Why the rotation happens (`scheduled_annual`, `compromise`, ...);
    /// `None`: the reason of the job's rotation in progress, else `scheduled`.
    pub reason: Option<String>,
    /// The chain the events join: the job's name.
    pub chain: String,
    /// `--incident`; `None`: the rotation's in progress, if any.
    pub incident_id: Option<String>,
    /// `--notes`: recorded as each event's `notes`; `None`: the rotation's
    /// in progress, if any.
    pub operator_notes: Option<String>,
    /// The keys concerned; when `None`, those of the job's rotation in
    /// progress, if any.
    pub keys: Option<AuditKeys>,
}

/// Who runs rekey when neither `--operator`, REKEY_OPERATOR nor the OS user
/// says: the AWS caller identity for an AWS store, else the database role
/// of the first session this process opened; noted by [`note_fallback_operator`].
static FALLBACK_OPERATOR: OnceLock<String> = OnceLock::new();

/// How long the AWS caller identity may take before the database role is used instead.
#[cfg(feature = "aws")]
const STS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The ARN of the AWS caller identity the job's store is reached as, if STS
/// answers within [`STS_WAIT`].
#[cfg(feature = "aws")]
async fn aws_caller(keys: &KeysSpec) -> Option<String> {
    let ask = async {
        let config = crate::secrets::aws::sdk_config(keys).await;
        let sts = aws_sdk_sts::Client::new(&config);
        sts.get_caller_identity()
            .send()
            .await
            .ok()?
            .arn()
            .map(str::to_string)
    };
    tokio::time::timeout(STS_WAIT, ask).await.ok().flatten()
}

/// Notes the operator of last resort, once, when nothing in the environment
/// names one: for an AWS store the caller identity's ARN (asked of STS, at
/// most a few seconds), else the session's role (`current_user`).
pub async fn note_fallback_operator(client: &Client, keys: Option<&KeysSpec>) -> Result<(), Error> {
    if FALLBACK_OPERATOR.get().is_some() || operator(None).is_some() {
        return Ok(());
    }
    #[cfg(feature = "aws")]
    if let Some(k) = keys.filter(|k| {
        matches!(
            k.source,
            KeySource::AwsSecretsManager | KeySource::AwsKms | KeySource::Table
        )
    }) {
        if let Some(arn) = aws_caller(k).await {
            let _ = FALLBACK_OPERATOR.set(arn);
            return Ok(());
        }
    }
    #[cfg(not(feature = "aws"))]
    let _ = keys;
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .ctx(|| "reading the session's role".into())?
        .get(0);
    let _ = FALLBACK_OPERATOR.set(role);
    Ok(())
}

/// Who runs rekey, without I/O: `given` (`--operator`), else REKEY_OPERATOR,
/// else the OS user (USER, LOGNAME), else the AWS caller identity or the
/// database role noted by [`note_fallback_operator`]; `None` when none is known yet ([`Audit::record`]
/// then records the session's role). Never "unknown".
pub fn operator(given: Option<&str>) -> Option<String> {
    given
        .map(str::to_string)
        .or_else(|| {
            ["REKEY_OPERATOR", "USER", "LOGNAME"].iter().find_map(|v| {
                std::env::var(v)
                    .ok()
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
            })
        })
        .or_else(|| FALLBACK_OPERATOR.get().cloned())
}

/// This host's name, for `written_to`.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Audit {
    /// The same audit settings for events about the move from `old` to `new`.
    pub fn for_keys(&self, old: Option<KeyId>, new: KeyId) -> Audit {
        Audit {
            keys: Some(AuditKeys {
                old,
                new: Some(new),
            }),
            ..self.clone()
        }
    }

    /// Where this process's JSON lines go, as recorded in `written_to`.
    pub fn written_to(&self) -> String {
        let path = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
        format!("{}:{}", host(), path.display())
    }

    /// Whether this chain already holds an event of `event_type` for job
    /// `job_id` (one recorded by an invocation that failed after it, or that
    /// stopped before its commit: [`Audit::settle`]). `client` as for
    /// [`Audit::record`].
    pub async fn has_event(
        &self,
        client: &Client,
        event_type: &str,
        job_id: i64,
    ) -> Result<bool, Error> {
        self.has(client, event_type, "job_id", &job_id).await
    }

    /// Whether this chain already holds an event of `event_type` for
    /// rotation `rotation_id`, as [`Audit::has_event`] for a job.
    pub async fn has_rotation_event(
        &self,
        client: &Client,
        event_type: &str,
        rotation_id: i64,
    ) -> Result<bool, Error> {
        self.has(client, event_type, "rotation_id", &rotation_id)
            .await
    }

    /// Whether this chain already holds an event of `event_type` for key
    /// `key_ref` (`<store>#<id>`) in the rotation an event recorded now
    /// would belong to (the job's rotation in progress, or none), and
    /// recorded since that key was last staged, as [`Audit::has_event`] for
    /// a job: an environment key's id may be given again after an abort,
    /// and an event of the earlier key is not this one's.
    pub async fn has_key_event(
        &self,
        client: &Client,
        event_type: &str,
        key_ref: &str,
    ) -> Result<bool, Error> {
        self.settle(client).await?;
        let row = client
            .query_one(
                "SELECT EXISTS (
                   SELECT 1 FROM rekey.audit a
                    WHERE a.chain = $1 AND a.event_type = $2 AND a.secret_id = $3 AND a.seq IS NOT NULL
                      AND a.rotation_id IS NOT DISTINCT FROM
                          (SELECT rotation_id FROM rekey.rotations WHERE job_name = $1 AND finished_at IS NULL
                            ORDER BY rotation_id DESC LIMIT 1)
                      AND NOT EXISTS (SELECT 1 FROM rekey.audit s
                                       WHERE s.chain = $1 AND s.event_type = 'key_staged' AND s.secret_id = $3
                                         AND s.seq > a.seq))",
                &[&self.chain, &event_type, &key_ref],
            )
            .await
            .ctx(|| "reading the audit trail (rekey.audit)".to_string())?;
        Ok(row.get(0))
    }

    /// Whether an event of `event_type` whose `column` (one of the names
    /// above, never input) is `value` is in the chain, once the lines a
    /// stopped process left are settled.
    async fn has(
        &self,
        client: &Client,
        event_type: &str,
        column: &'static str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<bool, Error> {
        self.settle(client).await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM rekey.audit WHERE chain = $1 AND event_type = $2 AND {column} = $3)"
                ),
                &[&self.chain, &event_type, value],
            )
            .await
            .ctx(|| "reading the audit trail (rekey.audit)".to_string())?;
        Ok(row.get(0))
    }

    /// Records an event at the end of the chain: in `rekey.audit` and the
    /// file, in one transaction under the chain's lock. `client` must not be
    /// in a transaction, nor used by other tasks until this returns.
    ///
    /// In that transaction: take the lock, read the chain's last event,
    /// record the lines of this file the table lacks ([`Audit::settle`]),
    /// insert the new event's row, append its line and sync the file, then
    /// commit. Where a crash (`kill -9`, a lost connection, the power) stops
    /// it, the trail ends consistent:
    /// - before the line is written: the transaction rolls back; the table
    ///   and the file are as they were.
    /// - inside the write: the file ends in part of a line, which never
    ///   committed; the next line is written on a line of its own and the
    ///   check counts the fragment, not reading it as an edit.
    /// - after the sync, before the commit: the file holds lines past the
    ///   table's last event, linked to it. The next event recorded through
    ///   this file (or [`Audit::settle`]) inserts them as they were
    ///   written, under the lock and before its own, so no event is lost
    ///   and none takes their place in the chain: their hashes were computed
    ///   from the chain's head, which nothing else could move while the
    ///   lock was held. Until then `rekey report --check` names the first
    ///   as a line rekey stopped before committing, or an event deleted
    ///   from the table: the two leave the same trail.
    /// - after the commit: both hold the event.
    pub async fn record(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
        client.batch_execute("BEGIN").await.ctx(writing)?;
        match self.append(client, what).await {
            Ok(event) => {
                client.batch_execute("COMMIT").await.ctx(writing)?;
                Ok(event)
            }
            Err(e) => {
                // the error that matters is the first one
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Records in `rekey.audit`, under the chain's lock, the events of this
    /// process's file that a process stopped between its line and its
    /// commit left out of the table ([`Audit::record`]), so that a question
    /// asked of the table sees them. `client` as for [`Audit::record`].
    pub async fn settle(&self, client: &Client) -> Result<(), Error> {
        client.batch_execute("BEGIN").await.ctx(writing)?;
        let settled = async {
            self.lock(client).await?;
            let row = client
                .query_one(
                    "SELECT a.seq, a.hash, (SELECT database_id FROM rekey.identity)
                       FROM (SELECT 1) one
                       LEFT JOIN LATERAL (SELECT seq, hash FROM rekey.audit WHERE chain = $1 AND seq IS NOT NULL
                                           ORDER BY seq DESC LIMIT 1) a ON true",
                    &[&self.chain],
                )
                .await
                .ctx(writing)?;
            let head: Option<(i64, String)> = row.get::<_, Option<i64>>(0).zip(row.get(1));
            let database: Option<String> = row.get(2);
            self.adopt(client, head, database.as_deref()).await
        }
        .await;
        match settled {
            Ok(_) => client.batch_execute("COMMIT").await.ctx(writing),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Takes the chain's lock for the transaction under way: one writer at a
    /// time, each reading the head the one before it left.
    async fn lock(&self, client: &Client) -> Result<(), Error> {
        // a waiting writer waits for the one ahead, whatever the session's lock_timeout
        client
            .batch_execute("SET LOCAL lock_timeout = '60s'")
            .await
            .ctx(writing)?;
        client
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('rekey.audit:' || $1, 0))",
                &[&self.chain],
            )
            .await
            .ctx(writing)?;
        Ok(())
    }

    /// Inserts into `rekey.audit`, as written, the lines of this process's
    /// file past the chain's last event `head` that link to it
    /// ([`uncommitted`]): events whose process stopped after syncing their
    /// line and before its commit. Under the chain's lock, in the caller's
    /// transaction; the new head, when it moved.
    async fn adopt(
        &self,
        client: &Client,
        head: Option<(i64, String)>,
        database: Option<&str>,
    ) -> Result<Option<(i64, String)>, Error> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Runtime(format!(
                    "reading the audit log {}: {e}; make it readable, or name another file with --audit-log",
                    self.path.display()
                )))
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let head_ref = head.as_ref().map(|(s, h)| (*s, h.as_str()));
        let left = uncommitted(&text, &self.chain, database, head_ref, &self.written_to());
        for event in &left {
            // marked: every check says from now on that the file alone vouches for it
            insert(client, event, true).await?;
            tracing::warn!(
                "recorded audit event {} ({}) in rekey.audit from its line in {}: an earlier rekey stopped between writing \
                 the line and committing it; `rekey report --check` names it from now on",
                event.body.seq,
                event.body.event_type,
                self.path.display()
            );
        }
        Ok(left.last().map(|e| (e.body.seq, e.hash.clone())))
    }

    /// The body of [`Audit::record`], inside its transaction.
    async fn append(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
        self.lock(client).await?;
        let row = client
            .query_one(
                "SELECT a.seq, a.hash, current_user::text,
                        to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        r.rotation_id, r.old_key, r.new_key,
                        (SELECT database_id FROM rekey.identity),
                        r.reason, r.incident_id, r.notes
                   FROM (SELECT 1) one
                   LEFT JOIN LATERAL (SELECT seq, hash FROM rekey.audit WHERE chain = $1 AND seq IS NOT NULL
                                       ORDER BY seq DESC LIMIT 1) a ON true
                   LEFT JOIN LATERAL (SELECT rotation_id, old_key, new_key, reason, incident_id, notes FROM rekey.rotations
                                       WHERE job_name = $1 AND finished_at IS NULL
                                       ORDER BY rotation_id DESC LIMIT 1) r ON true",
                &[&self.chain],
            )
            .await
            .ctx(writing)?;
        let role: String = row.get(2);
        let timestamp: String = row.get(3);
        let rotation_id: Option<i64> = row.get(4);
        let database: Option<String> = row.get(7);
        // what a process stopped before its commit left in the file goes first
        let mut head: Option<(i64, String)> = row.get::<_, Option<i64>>(0).zip(row.get(1));
        if let Some(moved) = self
            .adopt(client, head.clone(), database.as_deref())
            .await?
        {
            head = Some(moved);
        }
        let (last_seq, last_hash) = head.unzip();
        let key = |v: Option<i64>| v.and_then(|v| KeyId::try_from(v).ok());
        let keys = self.keys.unwrap_or(AuditKeys {
            old: key(row.get(5)),
            new: key(row.get(6)),
        });
        let operator = if self.operator.trim().is_empty() {
            role
        } else {
            self.operator.clone()
        };
        let body = Body {
            event_type: what.event_type.into(),
            timestamp,
            secret_id: what.secret_id.into(),
            operator,
            // what this invocation does not say, the rotation it continues does
            reason: self
                .reason
                .clone()
                .or_else(|| row.get(8))
                .unwrap_or_else(|| "scheduled".into()),
            incident_id: self.incident_id.clone().or_else(|| row.get(9)),
            verification_status: what.verification_status.into(),
            affected_records: what.affected_records,
            old_key: keys.old,
            new_key: keys.new,
            notes: self.operator_notes.clone().or_else(|| row.get(10)),
            detail: what.notes.into(),
            job_id: what.job_id,
            rotation_id,
            chain: self.chain.clone(),
            seq: last_seq.unwrap_or(0) + 1,
            written_to: self.written_to(),
            prev_hash: last_hash.unwrap_or_else(|| GENESIS.into()),
            database,
        };
        let event = body.sealed();
        insert(client, &event, false).await?;
        self.append_line(&event)?;
        Ok(event)
    }

    /// Appends the event's JSON line to the file, in one write, and syncs
    /// it. A file that does not end a line (the last write was cut short by
    /// a crash) gets a line break first, so the new line stays whole.
    fn append_line(&self, event: &Event) -> Result<(), Error> {
        let line = event.line()?;
        let io = |e: std::io::Error| {
            Error::Runtime(format!(
                "writing the audit log {}: {e}; make it writable, or name another file with --audit-log",
                self.path.display()
            ))
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        let mut whole = String::with_capacity(line.len() + 2);
        if f.metadata().map_err(io)?.len() > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1)).map_err(io)?;
            f.read_exact(&mut last).map_err(io)?;
            if last[0] != b'\n' {
                whole.push('\n');
            }
        }
        whole.push_str(&line);
        whole.push('\n');
        f.write_all(whole.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)
    }
}

/// Inserts `event` into `rekey.audit` as it is sealed; `adopted`: taken
/// from its line in the file after a crash (`adopted_at`, outside the hash).
async fn insert(client: &Client, event: &Event, adopted: bool) -> Result<(), Error> {
    let affected = event
        .body
        .affected_records
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let b = &event.body;
    client
        .execute(
            "INSERT INTO rekey.audit (event_type, timestamp, secret_id, operator, reason, incident_id, verification_status,
                                      affected_records, old_key, new_key, notes, detail, job_id, rotation_id,
                                      chain, seq, written_to, prev_hash, hash, database_id, adopted_at)
             VALUES ($1, $2::text::timestamptz, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                     CASE WHEN $21 THEN now() END)",
            &[
                &b.event_type, &b.timestamp, &b.secret_id, &b.operator, &b.reason, &b.incident_id,
                &b.verification_status, &affected, &b.old_key.map(i64::from), &b.new_key.map(i64::from),
                &b.notes, &b.detail, &b.job_id, &b.rotation_id, &b.chain, &b.seq, &b.written_to,
                &b.prev_hash, &event.hash, &b.database, &adopted,
            ],
        )
        .await
        .ctx(writing)?;
    Ok(())
}

/// Whether a reason names a compromise (`compromise`, or one ending in
/// `_compromise` / `-compromise`, as the quarterly procedure's
/// `suspected_key_compromise`): no grace period, material destroyed at retire.
pub fn is_compromise_reason(reason: &str) -> bool {
    reason == "compromise" || reason.ends_with("_compromise") || reason.ends_with("-compromise")
}
