//! Few connection slots: a run shrinks its lanes to what the server allows,
//! and leaves no process holding leases.

use rekey::db::cluster::{ClusterOptions, TempCluster};

use super::*;

/// A private cluster started with `max_connections = n` (and the server's
/// default `superuser_reserved_connections`, 3), a database on it seeded
/// with `rows` patients, and a role owning the table that may create
/// rekey's schema (a role, not the superuser, so the reserved slots are
/// not its to take); returns the cluster, the database and the role's URL.
async fn few_connections(n: i32, rows: i64) -> (TempCluster, TestDb, String) {
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("ALTER SYSTEM SET max_connections = {n}"))
        .await
        .unwrap();
    drop(admin);
    tokio::task::block_in_place(|| cluster.ctl(&["restart", "-w", "-t", "60", "-m", "fast"]))
        .unwrap_or_else(|e| panic!("restart failed: {e}\n{}", cluster.log()));
    let db = TestDb::on(&cluster).await;
    let applied: String = db
        .client
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied,
        n.to_string(),
        "premise: the server runs with max_connections = {n}"
    );
    db.seed_patients(rows).await;
    let role = owner_role(&db, "app", true).await;
    let url = url_as(&db, &role);
    (cluster, db, url)
}

/// Rows enough for eight ranges of rekey's plan (it splits a table into
/// ranges of at least 20,000 rows, and runs no more lanes than ranges), so
/// that eight lanes have work.
const LANE_ROWS: i64 = 170_000;

/// Processes `rekey status --json` lists as holding leases on the job.
fn workers_listed(job: &str) -> Vec<serde_json::Value> {
    let out = rekey_within(
        &["status", "--job", job, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    json(&out)["workers"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("status lists no workers field: {}", printed(&out)))
}

// Today on this 2-core machine: passes (2 lanes, 6 connections fit); on a
// host with more cores the default lanes (CPU count, 2 connections each)
// pass the server's limit and the run exits 1 ("sorry, too many clients
// already").
#[tokio::test(flavor = "multi_thread")]
async fn with_max_connections_10_a_run_with_default_settings_completes() {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_as(&url, "run", &j, &[], Duration::from_secs(180));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(LANE_ROWS).await;
    assert_eq!(
        workers_listed(&j),
        Vec::<serde_json::Value>::new(),
        "a finished run leaves nobody holding leases"
    );
}

// Today: exit 1 at once, "cannot connect to PostgreSQL: db error: FATAL:
// remaining connection slots are reserved for non-replication superuser
// connections" (8 lanes want 18 connections).
#[tokio::test(flavor = "multi_thread")]
async fn with_max_connections_10_a_run_with_8_workers_shrinks_to_what_the_server_allows_and_completes(
) {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_as(
        &url,
        "run",
        &j,
        &["--workers", "8"],
        Duration::from_secs(180),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(LANE_ROWS).await;
}

// Today: the run exits 1 (it could not open its lanes' connections) and
// `status` still lists it as holding leases (until --lease-ttl, 30 s,
// passes): the lanes already started had leased ranges, and the run
// returned without giving them back.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_exits_by_itself_leaves_no_process_holding_leases() {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // whatever this run does with the few connections it gets (designed:
    // finish; today: exit 1), once it has exited nobody holds leases
    let out = rekey_as(
        &url,
        "run",
        &j,
        &["--workers", "8"],
        Duration::from_secs(180),
    );
    let exited = out.status.code();
    assert!(
        exited.is_some(),
        "rekey was killed by a signal: {}",
        printed(&out)
    );
    let listed = workers_listed(&j);
    assert_eq!(
        listed,
        Vec::<serde_json::Value>::new(),
        "`rekey status` lists processes holding leases after the run exited {exited:?}:\n{}",
        printed(&out)
    );
}
