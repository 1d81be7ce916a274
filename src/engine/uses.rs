//! A run's record, in each key store it reads or writes under that keeps
//! one (a keyring file, a KMS keyring file, a Secrets Manager secret), of
//! the database and job whose values the store's keys encrypt
//! ([`crate::secrets::uses`]): widened before the first write, narrowed to
//! the target (and the store's current key) once every value is on it. A
//! retire from another database sharing the store reads it.

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::{now, KeyState};
use crate::error::DbContext;
use crate::job::Job;
use crate::secrets::uses::{self, User};
use crate::secrets::KeysSpec;
use crate::Error;

/// This database as the records name it: `rekey.identity`'s id, with the
/// cluster's system identifier and the database's name (a database copied
/// from another keeps its `rekey.identity`, not both of these), its name
/// and server for messages, and the job.
pub async fn user(client: &Client, job: &str) -> Result<User, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT database_id FROM rekey.identity), (SELECT system_identifier FROM pg_control_system())::text,
                    current_database(), coalesce(host(inet_server_addr()), 'a local socket'), inet_server_port()",
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
    let (system, name, host, port): (String, String, String, Option<i32>) =
        (row.get(1), row.get(2), row.get(3), row.get(4));
    Ok(User {
        database_id: format!("{id}.{system}.{name}"),
        database: match port {
            Some(port) => format!("{name} on {host}:{port}"),
            None => format!("{name} on {host}"),
        },
        job: job.to_string(),
    })
}

/// A store keeping a record ([`uses::recorded_by`]) the job's targets
/// read or write under.
struct UsedStore<'a> {
    /// The `[keys]` naming it (the first, where targets name it twice).
    keys: &'a KeysSpec,
    /// Its canonical name ([`KeysSpec::store_label`]).
    label: String,
    /// The keys the job's targets write under there.
    written: Vec<KeyId>,
    /// Every key the job's keyrings hold from it.
    held: Vec<KeyId>,
    /// Whether a target reads it without moving its ciphertexts (`rewrite =
    /// "hash"`): a full run says nothing of the keys they are under.
    unmoved: bool,
}

/// Each store keeping a record the job's targets read or write under, one
/// entry per store however the job spells its name.
fn stores(job: &Job) -> Vec<UsedStore<'_>> {
    let mut out: Vec<UsedStore<'_>> = Vec::new();
    for t in &job.targets {
        for (side, writes) in [(&t.read, false), (&t.write, true)] {
            let Some(keys) = side.source.as_ref().filter(|k| uses::recorded_by(k.source)) else {
                continue;
            };
            let label = keys.store_label();
            let at = match out.iter().position(|f| f.label == label) {
                Some(i) => i,
                None => {
                    out.push(UsedStore {
                        keys,
                        label,
                        written: Vec::new(),
                        held: Vec::new(),
                        unmoved: false,
                    });
                    out.len() - 1
                }
            };
            let f = &mut out[at];
            f.held.extend(side.keyring.keys().map(|k| k.id()));
            f.unmoved |= t.hash_only();
            if writes && !t.hash_only() {
                f.written.push(side.keyring.target().id());
            }
        }
    }
    out
}

/// Before a run's first write: every store the job uses that keeps a
/// record records that this database's values may be under any key it
/// holds that is not retired, and any the job's keyrings hold. A store
/// that cannot record it (a disk, a permission) fails the run, nothing
/// written: a retire from another database would not know of these values.
pub async fn starting(client: &Client, job: &Job) -> Result<(), Error> {
    let stores = stores(job);
    if stores.is_empty() {
        return Ok(());
    }
    let user = user(client, &job.name).await?;
    for f in stores {
        uses::record_in_store(f.keys, |records, table| {
            let mut keys = f.held.clone();
            keys.extend(
                table
                    .entries
                    .iter()
                    .filter(|e| e.state != KeyState::Retired)
                    .map(|e| e.id),
            );
            uses::widen(records, &user, &keys, uses::largest_id(table))
        })
        .await
        .map_err(|e| {
            let why = format!(
                "could not record in {} that job {:?} in database {} has values under its keys (a retire from \
                 another database sharing the store reads that record before it destroys a key): {}. Nothing was \
                 written; {}, then run again",
                f.label,
                job.name,
                user.database,
                e.chain(),
                uses::where_recorded(f.keys),
            );
            match e {
                Error::Runtime(_) => Error::Runtime(why),
                _ => Error::Config(why),
            }
        })?;
    }
    Ok(())
}

/// After a run that left every value of the job's tables on its target:
/// each store keeping a record records that this database's values are under the
/// keys the job wrote under there, and those applications may still write
/// under ([`uses::after_a_full_run`]). A job with a `where` filter did not
/// see every row, and a store a hash-only target reads did not have its
/// ciphertexts moved: neither is narrowed. A store that cannot record it
/// keeps the wider record (a retire from another database is refused for
/// longer), with a warning.
pub async fn finished(client: &Client, job: &Job) -> Result<(), Error> {
    let stores = stores(job);
    if stores.is_empty() || job.filtered_target().is_some() {
        return Ok(());
    }
    let user = user(client, &job.name).await?;
    for f in stores.iter().filter(|f| !f.unmoved) {
        let narrowed = uses::record_in_store(f.keys, |records, table| {
            let keys = uses::after_a_full_run(table, &f.written, now());
            uses::narrow(records, &user, &keys, uses::largest_id(table))
        })
        .await;
        if let Err(e) = narrowed {
            tracing::warn!(
                "could not record in {} that the values of job {:?} in this database are on its newer keys: {}; \
                 a retire of an older key from another database sharing the store is refused until a run here records it",
                f.label,
                job.name,
                e.chain()
            );
        }
    }
    Ok(())
}
