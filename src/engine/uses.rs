//! A run's record, in each keyring file it reads or writes under, of the
//! database and job whose values the file's keys encrypt
//! ([`crate::secrets::uses`]): widened before the first write, narrowed to
//! the target (and the file's current key) once every value is on it. A
//! retire from another database sharing the file reads it.

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyState;
use crate::error::DbContext;
use crate::job::Job;
use crate::secrets::uses::{self, User};
use crate::secrets::{KeySource, KeysSpec};
use crate::Error;

/// This database as the records name it: `rekey.identity`'s id, its name
/// and server, and the job.
pub async fn user(client: &Client, job: &str) -> Result<User, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT database_id FROM rekey.identity), current_database(),
                    coalesce(host(inet_server_addr()), 'a local socket'), inet_server_port()",
            &[],
        )
        .await
        .ctx(|| "reading this database's identity (rekey.identity)".to_string())?;
    let id: Option<String> = row.get(0);
    let id = id.ok_or_else(|| {
        Error::Config(
            "rekey.identity holds no row: it is made with rekey's schema and never changed; restore it from a \
             backup of this database"
                .into(),
        )
    })?;
    let (name, host, port): (String, String, Option<i32>) = (row.get(1), row.get(2), row.get(3));
    Ok(User {
        database_id: id,
        database: match port {
            Some(port) => format!("{name} on {host}:{port}"),
            None => format!("{name} on {host}"),
        },
        job: job.to_string(),
    })
}

/// Each keyring file the job's targets read or write under, with the keys
/// its targets write under there.
fn files(job: &Job) -> Vec<(&KeysSpec, Vec<KeyId>)> {
    let mut out: Vec<(&KeysSpec, Vec<KeyId>)> = Vec::new();
    for t in &job.targets {
        for (side, writes) in [(&t.read, false), (&t.write, true)] {
            let Some(keys) = side.source.as_ref().filter(|k| k.source == KeySource::File) else {
                continue;
            };
            let at = match out.iter().position(|(k, _)| *k == keys) {
                Some(i) => i,
                None => {
                    out.push((keys, Vec::new()));
                    out.len() - 1
                }
            };
            if writes {
                out[at].1.push(side.keyring.target().id());
            }
        }
    }
    out
}

/// Before a run's first write: every keyring file the job uses records that
/// this database's values may be under any key it holds that is not
/// retired, and any the job's keyrings hold. A file that cannot record it
/// fails the run, nothing written: a retire from another database would
/// not know of these values.
pub async fn starting(client: &Client, job: &Job) -> Result<(), Error> {
    let files = files(job);
    if files.is_empty() {
        return Ok(());
    }
    let user = user(client, &job.name).await?;
    for (keys, _) in files {
        let in_keyrings: Vec<KeyId> = job
            .targets
            .iter()
            .flat_map(|t| [&t.read, &t.write])
            .filter(|s| s.source.as_ref() == Some(keys))
            .flat_map(|s| s.keyring.keys().map(|k| k.id()))
            .collect();
        uses::record_in_file(keys, |records, table| {
            let mut held = in_keyrings.clone();
            held.extend(
                table
                    .entries
                    .iter()
                    .filter(|e| e.state != KeyState::Retired)
                    .map(|e| e.id),
            );
            uses::widen(records, &user, &held)
        })
        .map_err(|e| {
            Error::Config(format!(
                "could not record in {} that job {:?} in database {} has values under its keys (a retire from \
                 another database sharing the file reads that record before it destroys a key): {}. Nothing was \
                 written; let rekey write the file, then run again",
                keys.store_label(),
                job.name,
                user.database,
                e.chain()
            ))
        })?;
    }
    Ok(())
}

/// After a run that left every value of the job's tables on its target:
/// each keyring file records that this database's values are under the
/// keys the job wrote under there, and the file's current key (which
/// applications write under until a promotion). A job with a `where`
/// filter did not see every row, and records nothing. A file that cannot
/// record it keeps the wider record (a retire from another database is
/// refused for longer), with a warning.
pub async fn finished(client: &Client, job: &Job) -> Result<(), Error> {
    let files = files(job);
    if files.is_empty() || job.filtered_target().is_some() {
        return Ok(());
    }
    let user = user(client, &job.name).await?;
    for (keys, written) in files {
        let narrowed = uses::record_in_file(keys, |records, table| {
            let mut now = written.clone();
            now.extend(
                table
                    .entries
                    .iter()
                    .filter(|e| e.state == KeyState::Current)
                    .map(|e| e.id),
            );
            uses::narrow(records, &user, &now)
        });
        if let Err(e) = narrowed {
            tracing::warn!(
                "could not record in {} that the values of job {:?} in this database are on its newer keys: {}; \
                 a retire of an older key from another database sharing the file is refused until a run here records it",
                keys.store_label(),
                job.name,
                e.chain()
            );
        }
    }
    Ok(())
}
