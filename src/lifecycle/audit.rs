//! The audit trail: one event per lifecycle step, as a JSON line (appended
//! and synced) and a row of `rekey.audit`, with the fields of the healthprep
//! policy's template. Never a key value: secrets are named by store and id.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// One audit event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// What happened: key_staged, reencryption_completed, verification_passed, ...
    pub event_type: String,
    /// When (UTC, RFC 3339).
    pub timestamp: String,
    /// The store and key id concerned (never the value).
    pub secret_id: String,
    /// Who ran it.
    pub operator: String,
    /// scheduled, emergency or compromise.
    pub reason: String,
    /// passed, failed, or not applicable.
    pub verification_status: String,
    /// Values re-encrypted or checked, where that applies.
    pub affected_records: Option<u64>,
    /// Free text.
    pub notes: String,
    /// The `rekey.jobs` row concerned, if any.
    pub job_id: Option<i64>,
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
    /// Free text.
    pub notes: &'a str,
    /// The job concerned.
    pub job_id: Option<i64>,
}

/// Where and as whom events are written.
#[derive(Debug, Clone)]
pub struct Audit {
    /// The JSON lines file.
    pub path: PathBuf,
    /// `--operator`, else the OS user.
    pub operator: String,
    /// Why the rotation happens.
    pub reason: String,
}

/// The OS user running rekey.
pub fn os_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

impl Audit {
    /// Records an event in the file and in `rekey.audit`.
    pub async fn record(&self, client: &Client, what: What<'_>) -> Result<Event, Error> {
        let affected_records = what.affected_records;
        let job_id = what.job_id;
        let event = Event {
            event_type: what.event_type.into(),
            timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            secret_id: what.secret_id.into(),
            operator: self.operator.clone(),
            reason: self.reason.clone(),
            verification_status: what.verification_status.into(),
            affected_records,
            notes: what.notes.into(),
            job_id,
        };
        let line = serde_json::to_string(&event).map_err(|e| Error::Runtime(e.to_string()))?;
        let io = |e: std::io::Error| {
            Error::Runtime(format!(
                "writing the audit log {}: {e}",
                self.path.display()
            ))
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        writeln!(f, "{line}").map_err(io)?;
        f.sync_data().map_err(io)?;
        client
            .execute(
                "INSERT INTO rekey.audit (event_type, timestamp, secret_id, operator, reason, verification_status, affected_records, notes, job_id)
                 VALUES ($1, now(), $2, $3, $4, $5, $6, $7, $8)",
                &[&event.event_type, &event.secret_id, &event.operator, &event.reason, &event.verification_status, &affected_records.map(|n| n as i64), &event.notes, &job_id],
            )
            .await
            .ctx(|| "writing rekey.audit".into())?;
        Ok(event)
    }
}
