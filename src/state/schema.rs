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
    (14, include_str!("../../sql/014_conflicts_refused.sql")),
    (15, include_str!("../../sql/015_database_identity.sql")),
    (16, include_str!("../../sql/016_job_target_key_stores.sql")),
    (17, include_str!("../../sql/017_rotation_catch_up.sql")),
    (18, include_str!("../../sql/018_job_target_parts.sql")),
    (
        19,
        include_str!("../../sql/019_rotation_incident_notes.sql"),
    ),
    (20, include_str!("../../sql/020_key_table_archived_row.sql")),
    (21, include_str!("../../sql/021_audit_adopted.sql")),
    (22, include_str!("../../sql/022_audit_intents.sql")),
    (23, include_str!("../../sql/023_job_xids.sql")),
    (24, include_str!("../../sql/024_rotation_rewrite_back.sql")),
    (25, include_str!("../../sql/025_job_target_triggers.sql")),
];

/// Creates or upgrades schema `rekey`. Safe to run from several processes
/// at once. A schema a DBA created for the role is used as it is: only a
/// missing schema needs CREATE on the database, and only missing tables
/// need CREATE on the schema. One another role made and this one may not
/// use is refused with the grants that let it.
pub async fn ensure_schema(client: &mut Client) -> Result<(), Error> {
    let what = || "preparing rekey's engine schema".to_string();
    if usable(client, Use::ReadWrite).await?
        && applied(client)
            .await?
            .is_some_and(|done| MIGRATIONS.iter().all(|(v, _)| done.contains(v)))
    {
        return Ok(());
    }
    let who = who(client).await?;
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
                    (SELECT string_agg(DISTINCT quote_ident(pg_get_userbyid(c.relowner)), ' or ')
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = 'rekey' AND c.relkind IN ('r', 'p') AND c.relname = ANY($1)),
                    (SELECT quote_ident(pg_get_userbyid(nspowner)) FROM pg_namespace WHERE nspname = 'rekey')",
            &[&OWN_TABLES.iter().map(|(t, _)| *t).collect::<Vec<_>>()],
        )
        .await
        .ctx(|| "looking for rekey's engine schema".into())?;
    Ok(Who {
        database: row.get(0),
        role: row.get(1),
        owner: row.get(2),
        schema_owner: row
            .get::<_, Option<String>>(3)
            .unwrap_or_else(|| "its owner".into()),
    })
}

/// rekey's own tables in schema `rekey`, and what a writing command does
/// to each besides SELECT (an `ON CONFLICT DO UPDATE` is an INSERT and an
/// UPDATE). Tables others add to the schema are not rekey's concern.
const OWN_TABLES: &[(&str, &[&str])] = &[
    ("schema_version", &["INSERT"]),
    ("jobs", &["INSERT", "UPDATE"]),
    ("progress", &["INSERT", "UPDATE"]),
    ("quarantine", &["INSERT", "UPDATE"]),
    ("audit", &["INSERT"]),
    ("audit_intents", &["INSERT", "DELETE"]),
    ("conflicts", &["INSERT", "DELETE"]),
    ("rotations", &["INSERT", "UPDATE"]),
    ("key_usage", &["INSERT", "UPDATE"]),
    ("not_rotated", &["INSERT", "UPDATE"]),
    ("key_table_keys", &["INSERT", "UPDATE"]),
    ("job_targets", &["INSERT"]),
    ("job_target_parts", &["INSERT"]),
    // made with its one row by the migration; only read after
    ("identity", &[]),
];

/// What a command does with the engine schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Reads it (status, report, verify, plan).
    Read,
    /// Writes jobs, checkpoints and audit records to it.
    ReadWrite,
}

/// Whether schema `rekey` exists, and the role may use rekey's tables in
/// it as `used`; refuses one it may not, with the grants that fix it (the
/// catalogue is read directly: a lookup by name would fail without USAGE
/// on the schema, with a bare "permission denied").
async fn usable(client: &Client, used: Use) -> Result<bool, Error> {
    let what = || "checking this role's access to rekey's engine schema".to_string();
    let Some(schema) = client
        .query_opt(
            "SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = 'rekey'",
            &[],
        )
        .await
        .ctx(what)?
    else {
        return Ok(false);
    };
    let usage: bool = schema.get(0);
    let mut read = true;
    let mut write = true;
    for row in client
        .query(
            "SELECT c.relname::text, has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
                    has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'rekey' AND c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .ctx(what)?
    {
        let name: String = row.get(0);
        let Some((_, more)) = OWN_TABLES.iter().find(|(t, _)| *t == name) else {
            continue;
        };
        let held = |privilege: &str| match privilege {
            "INSERT" => row.get::<_, bool>(2),
            "UPDATE" => row.get::<_, bool>(3),
            "DELETE" => row.get::<_, bool>(4),
            _ => false,
        };
        read &= row.get::<_, bool>(1);
        write &= row.get::<_, bool>(1) && more.iter().all(|p| held(p));
    }
    // the serial keys' sequences (an identity column needs no grant of its own)
    let sequences: bool = client
        .query_one(
            "SELECT coalesce(bool_and(has_sequence_privilege(c.oid, 'USAGE')), true)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'rekey' AND c.relkind = 'S'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                   AND d.objid = c.oid AND d.deptype = 'i')",
            &[],
        )
        .await
        .ctx(what)?
        .get(0);
    let fine = usage
        && match used {
            Use::Read => read,
            Use::ReadWrite => write && sequences,
        };
    if fine {
        return Ok(true);
    }
    // who may grant what is looked up only for the refusal
    let who = who(client).await?;
    let role = &who.role;
    let tables_read =
        (!read).then(|| format!("GRANT SELECT ON ALL TABLES IN SCHEMA rekey TO {role};"));
    let tables_write = [
        (!write).then(|| {
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};")
        }),
        (!sequences).then(|| format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA rekey TO {role};")),
    ];
    // USAGE is the schema owner's to grant, the rest its tables' owner's
    let fix = |tables: Vec<String>| {
        let mut asks = Vec::new();
        if !usage {
            asks.push(format!(
                "as {} (the owner of the schema) or a superuser, GRANT USAGE ON SCHEMA rekey TO {role};",
                who.schema_owner
            ));
        }
        if !tables.is_empty() {
            asks.push(format!(
                "as {} (the owner of its tables) or a superuser, {}",
                who.owner.as_deref().unwrap_or(&who.schema_owner),
                tables.join(" ")
            ));
        }
        (!asks.is_empty()).then(|| asks.join(" and "))
    };
    let to_read = fix(tables_read.into_iter().collect());
    let to_write = fix(tables_write.into_iter().flatten().collect());
    let refuse = |may: &str, fix: String| {
        Err(Error::Config(format!(
            "this role ({role}) may not {may} rekey's engine schema (rekey keeps its jobs, checkpoints and audit records there): run {fix}"
        )))
    };
    match (used, to_read, to_write) {
        (Use::Read, Some(read), write) => refuse(
            "read",
            format!(
                "{read} (enough for status, report and verify){}",
                write
                    .map(|w| format!("; for run, rotate and retire: {w}"))
                    .unwrap_or_default()
            ),
        ),
        (Use::ReadWrite, _, Some(write)) => refuse("write to", write),
        _ => Ok(true),
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
    /// The owner of rekey's tables in schema `rekey`, once it has them:
    /// grants on them and changes to them are theirs to make.
    owner: Option<String>,
    /// The owner of schema `rekey` (its USAGE is theirs to grant).
    schema_owner: String,
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
            statement: crate::error::Statement::Other,
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
            who.owner.as_deref().unwrap_or("the owner of rekey's tables")
        ),
        _ => return Error::Db { context: "preparing rekey's engine schema".into(), source: e, statement: crate::error::Statement::Other, },
    };
    Error::Config(format!(
        "cannot prepare rekey's engine schema: {}; {fix}",
        db.message()
    ))
}

/// Whether schema `rekey` exists yet (read-only commands do not create it);
/// one the role may not read is refused with the grants that let it.
pub async fn schema_exists(client: &Client) -> Result<bool, Error> {
    Ok(usable(client, Use::Read).await?
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
