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
    (12, include_str!("../../sql/012_not_rotated_rejected.sql")),
    (13, include_str!("../../sql/013_job_targets.sql")),
];

/// Creates or upgrades schema `rekey`. Safe to run from several processes
/// at once. A schema a DBA created for the role is used as it is: only a
/// missing schema needs CREATE on the database, and only missing tables
/// need CREATE on the schema. One another role made and this one may not
/// use is refused with the grants that let it.
pub async fn ensure_schema(client: &mut Client) -> Result<(), Error> {
    let what = || "preparing rekey's engine schema".to_string();
    let who = who(client).await?;
    if usable(client, &who, Use::ReadWrite).await?
        && applied(client)
            .await?
            .is_some_and(|done| MIGRATIONS.iter().all(|(v, _)| done.contains(v)))
    {
        return Ok(());
    }
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

/// The database, the role and the engine schema's owner, as SQL names.
async fn who(client: &Client) -> Result<Who, Error> {
    let row = client
        .query_one(
            "SELECT quote_ident(current_database()), quote_ident(current_user),
                    (SELECT quote_ident(pg_get_userbyid(nspowner)) FROM pg_namespace WHERE nspname = 'rekey')",
            &[],
        )
        .await
        .ctx(|| "looking for rekey's engine schema".into())?;
    Ok(Who {
        database: row.get(0),
        role: row.get(1),
        owner: row.get(2),
    })
}

/// What a command does with the engine schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Reads it (status, report, verify, plan).
    Read,
    /// Writes jobs, checkpoints and audit records to it.
    ReadWrite,
}

/// Whether schema `rekey` exists, and the role may use its tables as
/// `used`; refuses one it may not, with the grants that fix it (the
/// catalogue is read directly: a lookup by name would fail without USAGE
/// on the schema, with a bare "permission denied").
async fn usable(client: &Client, who: &Who, used: Use) -> Result<bool, Error> {
    let row = client
        .query_opt(
            "SELECT has_schema_privilege(n.oid, 'USAGE'),
                    coalesce(bool_and(has_table_privilege(c.oid, 'SELECT')) FILTER (WHERE c.relkind IN ('r', 'p')), true),
                    coalesce(bool_and(has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
                                      AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE'))
                        FILTER (WHERE c.relkind IN ('r', 'p')), true),
                    coalesce(bool_and(has_sequence_privilege(c.oid, 'USAGE')) FILTER (WHERE c.relkind = 'S'), true)
               FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid
              WHERE n.nspname = 'rekey' GROUP BY n.oid",
            &[],
        )
        .await
        .ctx(|| "checking this role's access to rekey's engine schema".into())?;
    let Some(row) = row else {
        return Ok(false);
    };
    let (usage, read, write, sequences): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let role = &who.role;
    let schema = (!usage).then(|| format!("GRANT USAGE ON SCHEMA rekey TO {role};"));
    let to_read: Vec<String> = schema
        .iter()
        .cloned()
        .chain((!read).then(|| format!("GRANT SELECT ON ALL TABLES IN SCHEMA rekey TO {role};")))
        .collect();
    let to_write: Vec<String> = schema
        .into_iter()
        .chain((!write).then(|| {
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};")
        }))
        .chain(
            (!sequences)
                .then(|| format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA rekey TO {role};")),
        )
        .collect();
    let owner = who.owner.as_deref().unwrap_or("its owner");
    let refuse = |may: &str, fix: String| {
        Err(Error::Config(format!(
            "this role ({role}) may not {may} rekey's engine schema, which {owner} owns (rekey keeps its jobs, checkpoints and audit records there): \
             as {owner} or a superuser, run {fix}"
        )))
    };
    match used {
        Use::Read if !to_read.is_empty() => refuse(
            "read",
            format!(
                "{} (enough for status, report and verify), or for run, rotate and retire {}",
                to_read.join(" "),
                to_write.join(" ")
            ),
        ),
        Use::ReadWrite if !to_write.is_empty() => refuse("write to", to_write.join(" ")),
        Use::Read | Use::ReadWrite => Ok(true),
    }
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
    // created only where missing: CREATE ... IF NOT EXISTS needs CREATE on the schema all the same
    let versioned: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = 'rekey' AND c.relname = 'schema_version')",
            &[],
        )
        .await
        .ctx(what)?
        .get(0);
    if !versioned {
        tx.batch_execute("CREATE TABLE rekey.schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            .await
            .map_err(|e| refused(e, Missing::Tables, who))?;
    }
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
    // a schema with migrations applied is upgraded in place: its tables' owner's work
    let missing = match done.is_empty() {
        true => Missing::Tables,
        false => Missing::Upgrade,
    };
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !done.contains(v)) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| refused(e, missing, who))?;
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
    /// The owner of schema `rekey`, where it exists.
    owner: Option<String>,
}

/// What the role could not create.
#[derive(Debug, Clone, Copy)]
enum Missing {
    /// Schema `rekey`: needs CREATE on the database.
    Schema,
    /// Its tables: need USAGE and CREATE on the schema.
    Tables,
    /// A newer version's changes to tables that exist: need their owner.
    Upgrade,
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
        ("42501", Missing::Upgrade) => format!(
            "this version of rekey upgrades its engine schema, and only the owner of its tables may ({}): \
             run the same command once as that role or a superuser, which upgrades it first, or give that role's ownership to {role}",
            who.owner.as_deref().unwrap_or("the owner of schema rekey")
        ),
        _ => return Error::Db { context: "preparing rekey's engine schema".into(), source: e },
    };
    Error::Config(format!(
        "cannot prepare rekey's engine schema: {}; {fix}",
        db.message()
    ))
}

/// Whether schema `rekey` exists yet (read-only commands do not create it);
/// one the role may not read is refused with the grants that let it.
pub async fn schema_exists(client: &Client) -> Result<bool, Error> {
    let who = who(client).await?;
    Ok(usable(client, &who, Use::Read).await?
        && client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = 'rekey' AND c.relname = 'progress')",
                &[],
            )
            .await
            .ctx(|| "looking for rekey's engine schema".into())?
            .get::<_, bool>(0))
}
