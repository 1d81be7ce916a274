//! `rekey report --check`: reads one job's audit chain from `rekey.audit`
//! and from its JSON lines file, and runs the chain's checks
//! ([`crate::lifecycle::chain`]) over both, naming the first bad event.

use std::path::Path;

use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::crypto::keyring::KeyId;
use crate::error::DbContext;
use crate::lifecycle::chain::{check_chain, check_file, Body, Broken, Event, FileChecked, Intent};
use crate::Error;

/// The columns of an event (of `rekey.audit a`), its timestamp as it was
/// hashed; `database_id` read so that a schema from before it (a newer
/// rekey reporting before any writing command upgraded it) reads as NULL.
pub(crate) const EVENT_COLUMNS: &str = "audit_id, event_type,
    to_char(timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), secret_id, operator, reason,
    incident_id, verification_status, affected_records, old_key, new_key, notes, detail, job_id, rotation_id,
    chain, seq, written_to, prev_hash, hash, to_jsonb(a) ->> 'database_id'";

/// What the check found.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    /// The chain: the job's name.
    pub chain: String,
    /// Chained events in `rekey.audit`.
    pub table_events: usize,
    /// The first bad event of `rekey.audit`, if any.
    pub table_broken: Option<String>,
    /// The JSON lines file checked.
    pub file: String,
    /// Chained events of this job in the file (`None`: no file).
    pub file_events: Option<usize>,
    /// Lines from before the chain existed, not checked.
    pub file_unchained: usize,
    /// Lines of this job recorded in other databases (one file serving
    /// staging and production), not checked against this one.
    pub file_other_databases: usize,
    /// Lines cut short by a crash inside their write: never committed.
    pub file_cut_short: usize,
    /// The first bad event of the file, if any.
    pub file_broken: Option<String>,
    /// Events recorded in `rekey.audit` from their line in the file after
    /// a crash (seq, event type): the file alone vouches for them.
    pub adopted: Vec<(i64, String)>,
}

impl Checked {
    /// Whether every event checks.
    pub fn ok(&self) -> bool {
        self.table_broken.is_none() && self.file_broken.is_none()
    }
}

/// One row of `rekey.audit` as an event, or why it cannot be one (a value
/// rekey never writes: the row was edited).
fn event_of(row: &Row) -> Result<Event, String> {
    let text = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    let key = |i: usize| {
        row.get::<_, Option<i64>>(i)
            .map(|v| KeyId::try_from(v).map_err(|_| format!("key id {v} is not a key id")))
            .transpose()
    };
    let affected = row
        .get::<_, Option<i64>>(8)
        .map(|v| u64::try_from(v).map_err(|_| format!("affected_records {v} is negative")))
        .transpose()?;
    let body = Body {
        event_type: text(1),
        timestamp: text(2),
        secret_id: text(3),
        operator: text(4),
        reason: text(5),
        incident_id: row.get(6),
        verification_status: text(7),
        affected_records: affected,
        old_key: key(9)?,
        new_key: key(10)?,
        notes: row.get(11),
        detail: text(12),
        job_id: row.get(13),
        rotation_id: row.get(14),
        chain: text(15),
        seq: row.get::<_, Option<i64>>(16).unwrap_or_default(),
        written_to: text(17),
        prev_hash: text(18),
        database: row.get(20),
    };
    Ok(Event {
        body,
        hash: text(19),
    })
}

/// Every chained event of `chain` in `rekey.audit`, in chain order, each
/// with its place; or the first row that cannot be an event.
pub async fn table_events(
    client: &Client,
    chain: &str,
) -> Result<Result<Vec<(Event, String)>, Broken>, Error> {
    let rows = client
        .query(
            &format!("SELECT {EVENT_COLUMNS} FROM rekey.audit a WHERE chain = $1 AND seq IS NOT NULL ORDER BY seq, audit_id"),
            &[&chain],
        )
        .await
        .ctx(|| "reading the audit trail (rekey.audit)".into())?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let place = format!("rekey.audit (audit_id {})", row.get::<_, i64>(0));
        match event_of(row) {
            Ok(e) => out.push((e, place)),
            Err(why) => {
                return Ok(Err(Broken {
                    place,
                    seq: row.get(16),
                    event_type: row.get(1),
                    why: format!("{why}, which rekey never writes: the event was edited"),
                }))
            }
        }
    }
    Ok(Ok(out))
}

/// Checks job `chain`'s events in `rekey.audit` and in the JSON lines file
/// (`written_to`: how events written to that file name it). A missing file
/// is broken evidence only when the table records events written to it.
pub async fn check(
    client: &Client,
    chain: &str,
    file: &Path,
    written_to: &str,
) -> Result<Checked, Error> {
    let mut checked = Checked {
        chain: chain.to_string(),
        table_events: 0,
        table_broken: None,
        file: file.display().to_string(),
        file_events: None,
        file_unchained: 0,
        file_other_databases: 0,
        file_cut_short: 0,
        file_broken: None,
        adopted: Vec::new(),
    };
    let events = match table_events(client, chain).await? {
        Ok(events) => events,
        Err(broken) => {
            checked.table_broken = Some(broken.to_string());
            return Ok(checked);
        }
    };
    match check_chain(&events) {
        Ok(n) => checked.table_events = n,
        Err(broken) => checked.table_broken = Some(broken.to_string()),
    }
    // through jsonb: a schema from before adopted_at reads none
    checked.adopted = client
        .query(
            "SELECT seq, event_type FROM rekey.audit a
              WHERE chain = $1 AND seq IS NOT NULL AND (to_jsonb(a) ->> 'adopted_at') IS NOT NULL ORDER BY seq",
            &[&chain],
        )
        .await
        .ctx(|| "reading the audit trail (rekey.audit)".into())?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let database = database_id(client).await?;
    // the table's events are this database's: one naming another means
    // rekey.identity changed (which would hide the file's lines) or events
    // were copied in
    if let Some((e, place)) = events
        .iter()
        .find(|(e, _)| e.body.database.is_some() && e.body.database != database)
    {
        checked.table_broken.get_or_insert_with(|| {
            Broken {
                place: place.clone(),
                seq: Some(e.body.seq),
                event_type: Some(e.body.event_type.clone()),
                why: format!(
                    "it names database {}, and this database is {}: rekey.identity was changed or removed, \
                     or the event was copied in from another database",
                    e.body.database.as_deref().unwrap_or_default(),
                    database.as_deref().unwrap_or("without an identity")
                ),
            }
            .to_string()
        });
    }
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ours = events
                .iter()
                .filter(|(e, _)| e.body.written_to == written_to)
                .count();
            if ours > 0 {
                checked.file_broken = Some(format!(
                    "{}: the file is missing, and rekey.audit records {ours} events as written to it",
                    file.display()
                ));
            }
            return Ok(checked);
        }
        Err(e) => {
            return Err(Error::Runtime(format!(
                "reading the audit log {}: {e}",
                file.display()
            )))
        }
    };
    let table: Vec<Event> = events.into_iter().map(|(e, _)| e).collect();
    let intents = intents(client, chain).await?;
    match check_file(
        &file.display().to_string(),
        &text,
        chain,
        &table,
        database.as_deref(),
        written_to,
        &intents,
    ) {
        Ok(FileChecked {
            events,
            unchained,
            other_databases,
            cut_short,
            ..
        }) => {
            checked.file_events = Some(events);
            checked.file_unchained = unchained;
            checked.file_other_databases = other_databases;
            checked.file_cut_short = cut_short;
        }
        Err(broken) => checked.file_broken = Some(broken.to_string()),
    }
    Ok(checked)
}

/// The intents of chain `chain` not yet settled (none in a schema from
/// before them): the events a stopped rekey may have left in the file alone.
async fn intents(client: &Client, chain: &str) -> Result<Vec<Intent>, Error> {
    let what = || "reading the audit intents (rekey.audit_intents)".to_string();
    let exists: bool = client
        .query_one("SELECT to_regclass('rekey.audit_intents') IS NOT NULL", &[])
        .await
        .ctx(what)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT chain, seq, hash, written_to FROM rekey.audit_intents WHERE chain = $1 ORDER BY seq",
            &[&chain],
        )
        .await
        .ctx(what)?
        .iter()
        .map(|r| Intent {
            chain: r.get(0),
            seq: r.get(1),
            hash: r.get(2),
            written_to: r.get(3),
        })
        .collect())
}

/// This database's audit identity (`rekey.identity`; none in a schema
/// from before it, whose events have none either).
async fn database_id(client: &Client) -> Result<Option<String>, Error> {
    let what = || "reading this database's audit identity (rekey.identity)".to_string();
    let exists: bool = client
        .query_one("SELECT to_regclass('rekey.identity') IS NOT NULL", &[])
        .await
        .ctx(what)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT database_id FROM rekey.identity", &[])
        .await
        .ctx(what)?
        .map(|r| r.get(0)))
}
