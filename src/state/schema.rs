//! Schema `rekey` in the target database: its migrations, applied once and
//! in order by whichever process comes first.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// The engine schema's migrations, in order. Never edit a released one.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../sql/001_engine_state.sql")),
    (2, include_str!("../../sql/002_conflicts.sql")),
    (3, include_str!("../../sql/003_rotations.sql")),
    (4, include_str!("../../sql/004_rotation_fingerprint.sql")),
    (
        5,
        include_str!("../../sql/005_leases_control_key_usage.sql"),
    ),
    (6, include_str!("../../sql/006_not_rotated.sql")),
    (7, include_str!("../../sql/007_rotation_abort.sql")),
    (8, include_str!("../../sql/008_audit_chain.sql")),
    (9, include_str!("../../sql/009_key_usage_shards.sql")),
    (10, include_str!("../../sql/010_split_wanted.sql")),
    (11, include_str!("../../sql/011_key_table.sql")),
];

/// Creates or upgrades schema `rekey`. Safe to run from several processes
/// at once. A schema a DBA created for the role is used as it is: only a
/// missing schema needs CREATE on the database, and only missing tables
/// need CREATE on the schema.
pub async fn ensure_schema(client: &mut Client) -> Result<(), Error> {
    let what = || "preparing rekey's engine schema".to_string();
    if applied(client)
        .await?
        .is_some_and(|done| MIGRATIONS.iter().all(|(v, _)| done.contains(v)))
    {
        return Ok(());
    }
    let who = client
        .query_one(
            "SELECT quote_ident(current_database()), quote_ident(current_user)",
            &[],
        )
        .await
        .ctx(what)?;
    let who = Who {
        database: who.get(0),
        role: who.get(1),
    };
    // one process at a time, and the checks in a transaction begun after the
    // lock, so they see what the process before created (an advisory lock
    // taken inside a transaction would leave its catalog view stale)
    super::locks::wait_for(client, "rekey.schema")
        .await
        .ctx(what)?;
    let prepared = migrate(client, &who).await;
    let unlocked = super::locks::release(client, "rekey.schema")
        .await
        .ctx(what);
    prepared.and(unlocked)
}

/// Creates what is missing of schema `rekey`, in one transaction.
async fn migrate(client: &mut Client, who: &Who) -> Result<(), Error> {
    let what = || "preparing rekey's engine schema".to_string();
    let tx = client.transaction().await.ctx(what)?;
    let exists: bool = tx
        .query_one("SELECT to_regnamespace('rekey') IS NOT NULL", &[])
        .await
        .ctx(what)?
        .get(0);
    if !exists {
        tx.batch_execute("CREATE SCHEMA rekey")
            .await
            .map_err(|e| refused(e, Missing::Schema, who))?;
    }
    tx.batch_execute("CREATE TABLE IF NOT EXISTS rekey.schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        .await
        .map_err(|e| refused(e, Missing::Tables, who))?;
    // every migration not applied yet, in order (not only those above the
    // highest applied: branches number theirs apart and land in any order)
    let done: Vec<i32> = tx
        .query_one(
            "SELECT coalesce(array_agg(version), '{}') FROM rekey.schema_version",
            &[],
        )
        .await
        .ctx(what)?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !done.contains(v)) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| refused(e, Missing::Tables, who))?;
        tx.execute(
            "INSERT INTO rekey.schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .ctx(|| format!("recording engine schema migration {version}"))?;
    }
    tx.commit().await.ctx(what)
}

/// The migrations applied, `None` before the schema exists.
async fn applied(client: &Client) -> Result<Option<Vec<i32>>, Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('rekey.schema_version') IS NOT NULL, coalesce(has_schema_privilege(s.ns, 'USAGE'), false)
               FROM (SELECT to_regnamespace('rekey')::oid AS ns) s",
            &[],
        )
        .await
        .ctx(|| "looking for rekey's engine schema".into())?;
    let (table, usage): (bool, bool) = (row.get(0), row.get(1));
    if !(table && usage) {
        return Ok(None);
    }
    Ok(Some(
        client
            .query_one(
                "SELECT coalesce(array_agg(version), '{}') FROM rekey.schema_version",
                &[],
            )
            .await
            .ctx(|| "reading the engine schema's version".into())?
            .get(0),
    ))
}

/// The database and role as SQL names (quoted by the server only where
/// needed), for the GRANT a refusal names.
struct Who {
    database: String,
    role: String,
}

/// What the role could not create.
#[derive(Debug, Clone, Copy)]
enum Missing {
    /// Schema `rekey`: needs CREATE on the database.
    Schema,
    /// Its tables: need USAGE and CREATE on the schema.
    Tables,
}

/// Why the engine schema could not be prepared, with the fix for this case:
/// a missing grant (naming it), or a database that cannot be written here.
fn refused(e: tokio_postgres::Error, missing: Missing, who: &Who) -> Error {
    let (database, role) = (&who.database, &who.role);
    let Some(db) = e.as_db_error() else {
        return Error::Db {
            context: "preparing rekey's engine schema".into(),
            source: e,
        };
    };
    let fix = match (db.code().code(), missing) {
        ("25006", _) => "the database is read-only here (default_transaction_read_only, or a hot standby): run rekey against the writable primary".to_string(),
        ("42501", Missing::Schema) => format!(
            "this role may not create schemas in the database: as its owner or a superuser, run either \
             GRANT CREATE ON DATABASE {database} TO {role}; or CREATE SCHEMA rekey AUTHORIZATION {role}; (rekey keeps its state there)"
        ),
        ("42501", Missing::Tables) => format!("this role may not create tables in schema rekey: as its owner or a superuser, run GRANT USAGE, CREATE ON SCHEMA rekey TO {role};"),
        _ => return Error::Db { context: "preparing rekey's engine schema".into(), source: e },
    };
    Error::Config(format!(
        "cannot prepare rekey's engine schema: {}; {fix}",
        db.message()
    ))
}

/// Whether schema `rekey` exists yet (read-only commands do not create it).
pub async fn schema_exists(client: &Client) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass('rekey.progress') IS NOT NULL", &[])
        .await
        .ctx(|| "looking for rekey's engine schema".into())?
        .get(0))
}
