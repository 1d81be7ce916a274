//! The audit trail: one event per lifecycle step and per `rekey run`, as a
//! JSON line (appended and synced) and a row of `rekey.audit`, with the
//! fields of the healthprep policy's template plus the keys concerned (ids,
//! never material), the incident and the rotation, each event hash-chained
//! to the one before it ([`super::chain`]) so `rekey report --check` finds
//! an edited, deleted or reordered event.
//!
//! One chain per job name, shared by every process that writes events for
//! the job: an event is appended under an advisory lock on the chain held
//! from reading its place and link until its row commits, so the file and
//! the table hold one order and two writers can never fork the chain (a
//! unique index on the place backs the lock). Before its line is written,
//! the event's intent (chain, place, hash) commits in
//! `rekey.audit_intents`; the row and the intent's removal commit together
//! after the line. A process stopped between the line and that commit
//! leaves the line and its intent: the next event recorded on the chain
//! records the line's event in the table first, and only a line an intent
//! names ([`Audit::record`] says why every instant of a crash ends
//! consistent, and why a line appended by anyone else is never recorded).
//! Never a key value: secrets are named by store and id.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::error::DbContext;
#[cfg(feature = "aws")]
use crate::secrets::KeySource;
use crate::secrets::KeysSpec;
use crate::Error;

use super::chain::{intended, Intent};
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
    /// `key_ref` (`<store>#<id>`) recorded since that key was last staged,
    /// as [`Audit::has_event`] for a job: an environment key's id may be
    /// given to a new key after an abort, and an event of the earlier key
    /// with that id is not this one's. Not by the rotation in progress: a
    /// retire closes its rotation, and the same retire run again (the
    /// variable not removed yet) has none.
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

    /// Checks, before anything changes, that this process's JSON file can
    /// be opened for append (it is created if missing), so that a command
    /// that must audit what it does refuses at once rather than after its
    /// first change, with that change's event lost.
    pub fn check_writable(&self) -> Result<(), Error> {
        open_for_append(&self.path).map(drop).map_err(|e| {
            Error::Config(format!(
                "the audit log {} cannot be opened for append: {e}; make it writable, or name another file with \
                 --audit-log (nothing was changed)",
                self.path.display()
            ))
        })
    }

    /// Records an event at the end of the chain: in `rekey.audit` and the
    /// file, under the chain's lock. `client` must not be in a
    /// transaction, nor used by other tasks until this returns.
    ///
    /// Under a session-level advisory lock on the chain (given back on
    /// every path, and by the server when the session ends): read the
    /// chain's last event, record what a stopped process left
    /// ([`Audit::settle`]), insert the new event's intent (chain, place,
    /// hash) and commit it; append the event's line and sync the file; then
    /// insert the event's row and delete its intent in one transaction.
    /// Where a crash (`kill -9`, a lost connection, the power) stops it,
    /// the trail ends consistent:
    /// - before the intent commits: nothing changed.
    /// - after the intent, before the line is written: the next event
    ///   recorded finds no line for the intent and deletes it; the event
    ///   never happened.
    /// - inside the write: the file ends in part of a line, which never
    ///   committed; the intent is deleted as above, the next line is
    ///   written on a line of its own and the check counts the fragment,
    ///   not reading it as an edit.
    /// - after the sync, before the commit: the file holds a line past the
    ///   table's last event, linked to it, and its intent names it. The
    ///   next event recorded on the chain (or [`Audit::settle`]) inserts it
    ///   as it was written, under the lock and before its own, so no event
    ///   is lost and none takes its place in the chain: its hash was
    ///   computed from the chain's head, which nothing else could move
    ///   while the lock was held. Until then `rekey report --check` names
    ///   it as a line rekey stopped before committing, or an event deleted
    ///   from the table: the two leave the same trail.
    /// - after the commit: both hold the event.
    ///
    /// A write or sync that fails cuts the file back to its length before
    /// the write and deletes the intent: a command that reports the
    /// failure leaves no event behind. Only a line an intent names is ever
    /// recorded from the file: one appended by anyone else, however well
    /// chained (the hash is plain SHA-256 of fields anyone can read), is
    /// not, and the check names it. An intent is settled by a process on
    /// the host its file is on (any of its files there, not only its own);
    /// one of another host is left for a command there, and an event
    /// recorded meanwhile takes its place (its line, if written, is then
    /// named by the check). A session lost while its process lives on
    /// gives back the lock: another may settle the intent before the line
    /// is written, and the line then comes after its place was taken, for
    /// the check to name.
    pub async fn record(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
        client.batch_execute("BEGIN").await.ctx(writing)?;
        if let Err(e) = self.lock(client, Hold::Session).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        let recorded = self.record_locked(client, what).await;
        // the error that matters is the first one; a dead session gave the lock back
        let unlocked = client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended('rekey.audit:' || $1, 0))",
                &[&self.chain],
            )
            .await
            .ctx(writing);
        let event = recorded?;
        unlocked?;
        Ok(event)
    }

    /// [`Audit::record`] once the lock is taken, inside the transaction
    /// that took it: intent, line, row.
    async fn record_locked(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
        let event = match self.intend(client, what).await {
            Ok(event) => event,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        client.batch_execute("COMMIT").await.ctx(writing)?;
        if let Err(e) = self.append_line(&event) {
            // the file is as it was: the event never happened
            let _ = forget(client, &event).await;
            return Err(e);
        }
        client.batch_execute("BEGIN").await.ctx(writing)?;
        let committed = async {
            insert(client, &event, false).await?;
            forget(client, &event).await?;
            client.batch_execute("COMMIT").await.ctx(writing)
        }
        .await;
        if let Err(e) = committed {
            // the line and its intent stay: the next event recorded records it
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        Ok(event)
    }

    /// Records in `rekey.audit`, under the chain's lock, the events a
    /// process stopped between its line and its commit left out of the
    /// table ([`Audit::record`]), so that a question asked of the table
    /// sees them. `client` as for [`Audit::record`].
    pub async fn settle(&self, client: &Client) -> Result<(), Error> {
        client.batch_execute("BEGIN").await.ctx(writing)?;
        let settled = async {
            self.lock(client, Hold::Transaction).await?;
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

    /// Takes the chain's lock, inside the transaction under way, for the
    /// session or the transaction (the two exclude each other): one writer
    /// at a time, each reading the head the one before it left.
    async fn lock(&self, client: &Client, hold: Hold) -> Result<(), Error> {
        // a waiting writer waits for the one ahead, whatever the session's lock_timeout
        client
            .batch_execute("SET LOCAL lock_timeout = '60s'")
            .await
            .ctx(writing)?;
        let take = match hold {
            Hold::Session => "pg_advisory_lock",
            Hold::Transaction => "pg_advisory_xact_lock",
        };
        client
            .execute(
                &format!("SELECT {take}(hashtextextended('rekey.audit:' || $1, 0))"),
                &[&self.chain],
            )
            .await
            .ctx(writing)?;
        Ok(())
    }

    /// Settles the chain's intents, under its lock, in the caller's
    /// transaction: inserts into `rekey.audit`, as written, the event of
    /// each whose line is in its file and links to the chain's last event
    /// `head` ([`intended`]), and deletes the intent; one with no such line
    /// is an event that never happened, deleted too. The intents of
    /// another host's files are left for a command there. The new head,
    /// when it moved.
    async fn adopt(
        &self,
        client: &Client,
        head: Option<(i64, String)>,
        database: Option<&str>,
    ) -> Result<Option<(i64, String)>, Error> {
        let rows = client
            .query(
                "SELECT seq, hash, written_to FROM rekey.audit_intents WHERE chain = $1 ORDER BY seq, hash",
                &[&self.chain],
            )
            .await
            .ctx(writing)?;
        let mut head = head;
        let mut moved = None;
        for row in &rows {
            let intent = Intent {
                chain: self.chain.clone(),
                seq: row.get(0),
                hash: row.get(1),
                written_to: row.get(2),
            };
            let Some((path, text)) = self.lines_of(&intent)? else {
                continue;
            };
            let head_ref = head.as_ref().map(|(s, h)| (*s, h.as_str()));
            if let Some(event) = intended(&text, &intent, database, head_ref) {
                // marked: every check says from now on that the file alone vouches for it
                insert(client, &event, true).await?;
                tracing::warn!(
                    "recorded audit event {} ({}) in rekey.audit from its line in {}: an earlier rekey stopped between \
                     writing the line and committing it; `rekey report --check` names it from now on",
                    event.body.seq,
                    event.body.event_type,
                    path.display()
                );
                head = Some((event.body.seq, event.hash.clone()));
                moved.clone_from(&head);
            }
            client
                .execute(
                    "DELETE FROM rekey.audit_intents WHERE chain = $1 AND seq = $2 AND hash = $3",
                    &[&intent.chain, &intent.seq, &intent.hash],
                )
                .await
                .ctx(writing)?;
        }
        Ok(moved)
    }

    /// The file `intent`'s line went to and its text, when this process
    /// can read it: on this host (any path there), and a regular file (a
    /// pipe or a device holds nothing to read back: empty). `None`: left
    /// for a process that can, another host's, or one this process may not
    /// read that is not its own file (its own it must read: an error).
    fn lines_of(&self, intent: &Intent) -> Result<Option<(PathBuf, String)>, Error> {
        let Some((on, path)) = intent.written_to.split_once(':') else {
            return Ok(None);
        };
        if on != host() {
            return Ok(None);
        }
        let path = PathBuf::from(path);
        match read_regular(&path) {
            Ok(text) => Ok(Some((path, text))),
            Err(e) if intent.written_to == self.written_to() => Err(Error::Runtime(format!(
                "reading the audit log {}: {e}; make it readable, or name another file with --audit-log",
                self.path.display()
            ))),
            Err(e) => {
                tracing::warn!(
                    "an audit event of chain {} may wait in {} (rekey stopped before committing it), which cannot \
                     be read here ({e}): left for a rekey command of this job that can",
                    self.chain,
                    path.display()
                );
                Ok(None)
            }
        }
    }

    /// The body of [`Audit::record`] before its line: inside its first
    /// transaction, under the lock, the event built at the end of the
    /// chain and its intent inserted.
    async fn intend(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
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
        client
            .execute(
                "INSERT INTO rekey.audit_intents (chain, seq, hash, written_to) VALUES ($1, $2, $3, $4)",
                &[&event.body.chain, &event.body.seq, &event.hash, &event.body.written_to],
            )
            .await
            .ctx(writing)?;
        Ok(event)
    }

    /// Appends the event's JSON line to the file and syncs it
    /// ([`append_synced`]).
    fn append_line(&self, event: &Event) -> Result<(), Error> {
        let line = event.line()?;
        open_for_append(&self.path)
            .and_then(|f| append_synced(&f, &line, File::sync_data))
            .map_err(|e| {
                Error::Runtime(format!(
                    "writing the audit log {}: {e}; make it writable, or name another file with --audit-log",
                    self.path.display()
                ))
            })
    }
}

/// How long the chain's lock is held.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Until given back: across the intent's commit, the line and the row's.
    Session,
    /// Until the transaction ends.
    Transaction,
}

/// Deletes `event`'s intent, in the transaction under way or its own.
async fn forget(client: &Client, event: &Event) -> Result<(), Error> {
    client
        .execute(
            "DELETE FROM rekey.audit_intents WHERE chain = $1 AND seq = $2 AND hash = $3",
            &[&event.body.chain, &event.body.seq, &event.hash],
        )
        .await
        .ctx(writing)?;
    Ok(())
}

/// Opens the JSON lines file for append, created if missing; read too, so
/// that a pipe opens without waiting for a reader.
fn open_for_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

/// The text of the file at `path`, read whole: empty when it is missing,
/// or not a regular file (a pipe would wait for a writer; a device holds
/// nothing to read back).
fn read_regular(path: &Path) -> std::io::Result<String> {
    let opened = std::fs::metadata(path)
        .and_then(|m| {
            if m.is_file() {
                File::open(path).map(Some)
            } else {
                Ok(None)
            }
        })
        .map(|f| f.filter(|f| f.metadata().is_ok_and(|m| m.is_file())));
    let mut f = match opened {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(String::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Appends `line` to `f` in one write, on a line of its own (a file whose
/// last write was cut short by a crash gets a line break first), and makes
/// it durable with `sync`. In a regular file, under an exclusive lock on
/// the file (other rekey processes append other chains' lines to it): a
/// write or a sync that fails cuts the file back to its length before the
/// write, so no part of a line whose command failed stays to be read. A
/// pipe or a device takes the line as it comes, with nothing to sync or
/// cut back.
fn append_synced(
    f: &File,
    line: &str,
    sync: impl FnOnce(&File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut w = f;
    if !f.metadata()?.is_file() {
        return w.write_all(format!("{line}\n").as_bytes());
    }
    match f.lock() {
        Ok(()) => {}
        // a file system without locks: appends are still whole
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(e),
    }
    let appended = (|| {
        let before = f.metadata()?.len();
        let mut whole = String::with_capacity(line.len() + 2);
        if before > 0 {
            let mut last = [0u8; 1];
            w.seek(SeekFrom::Start(before - 1))?;
            w.read_exact(&mut last)?;
            if last[0] != b'\n' {
                whole.push('\n');
            }
        }
        whole.push_str(line);
        whole.push('\n');
        let written = w.write_all(whole.as_bytes()).and_then(|()| sync(f));
        if written.is_err() {
            // the error that matters is the write's; a cut that fails leaves
            // a line no intent names, never recorded
            let _ = f.set_len(before).and_then(|()| f.sync_data());
        }
        written
    })();
    let _ = f.unlock();
    appended
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_whose_sync_failed_is_cut_back_and_a_line_cut_short_is_left_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "{\"event_type\":\"x\"}\n{\"event_ty").unwrap();
        let f = open_for_append(&path).unwrap();
        let failed = append_synced(&f, "{\"event_type\":\"y\"}", |_| {
            Err(std::io::Error::other("sync refused by the test"))
        });
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"event_type\":\"x\"}\n{\"event_ty",
            "the line whose sync failed stayed"
        );
        append_synced(&f, "{\"event_type\":\"z\"}", File::sync_data).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"event_type\":\"x\"}\n{\"event_ty\n{\"event_type\":\"z\"}\n"
        );
    }
}
