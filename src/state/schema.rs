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
    (5, include_str!("../../sql/005_leases_control_key_usage.sql")),
    (6, include_str!("../../sql/006_not_rotated.sql")),
];

/// Creates or upgrades schema `rekey`. Safe to run from several processes at once.
pub async fn ensure_schema(client: &mut Client) -> Result<(), Error> {
    let what = || "creating rekey's engine schema (needs CREATE on the database, or create schema rekey for this role)".to_string();
    let tx = client.transaction().await.ctx(what)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('rekey.schema'));
         CREATE SCHEMA IF NOT EXISTS rekey;
         CREATE TABLE IF NOT EXISTS rekey.schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .ctx(what)?;
    let current: i32 = tx.query_one("SELECT coalesce(max(version), 0) FROM rekey.schema_version", &[]).await.ctx(what)?.get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.ctx(|| format!("applying engine schema migration {version}"))?;
        tx.execute("INSERT INTO rekey.schema_version (version) VALUES ($1)", &[version]).await.ctx(what)?;
    }
    tx.commit().await.ctx(what)
}

/// Whether schema `rekey` exists yet (read-only commands do not create it).
pub async fn schema_exists(client: &Client) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass('rekey.progress') IS NOT NULL", &[])
        .await
        .ctx(|| "looking for rekey's engine schema".into())?
        .get(0))
}
