//! The harness's streaming replica (`TempCluster::start_replica`), for tests
//! of behaviour that depends on a standby (replica-lag throttling).

use std::time::{Duration, Instant};

use rekey::db::cluster::{ClusterOptions, TempCluster};
use tokio_postgres::Client;

use crate::harness::connect;

/// A private primary with one table, its standby, and a connection to each.
async fn primary_and_replica() -> (TempCluster, TempCluster, Client, Client) {
    let primary = TempCluster::start(ClusterOptions { durable: false }).expect("a private primary");
    let p = connect(&primary.url("postgres")).await;
    p.batch_execute("CREATE TABLE marks (id int PRIMARY KEY)")
        .await
        .unwrap();
    let replica = tokio::task::block_in_place(|| primary.start_replica())
        .unwrap_or_else(|e| panic!("replica did not start: {e}\n{}", primary.log()));
    let r = connect(&replica.url("postgres")).await;
    (primary, replica, p, r)
}

/// Whether row `id` of `marks` is visible on `client` within `limit`.
async fn shows_up(client: &Client, id: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let seen: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM marks WHERE id = $1)", &[&id])
            .await
            .unwrap()
            .get(0);
        if seen || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_written_on_the_primary_appears_on_the_replica_which_the_primary_lists_with_its_replay_lag(
) {
    let (_primary, replica, p, r) = primary_and_replica().await;
    let in_recovery: bool = r
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the replica is not a standby");
    p.execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();
    assert!(
        shows_up(&r, 1, Duration::from_secs(30)).await,
        "row 1 never reached the replica\n{}",
        replica.log()
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = p
            .query_opt("SELECT state, replay_lag IS NOT NULL FROM pg_stat_replication WHERE application_name = 'replica'", &[])
            .await
            .unwrap();
        let (state, has_lag): (String, bool) =
            row.map(|r| (r.get(0), r.get(1))).unwrap_or_default();
        if state == "streaming" && has_lag {
            break;
        }
        assert!(Instant::now() < deadline, "pg_stat_replication never showed the replica streaming with a replay_lag (state {state:?})");
        p.execute(
            "INSERT INTO marks SELECT coalesce(max(id), 0) + 1 FROM marks",
            &[],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_replay_on_the_replica_holds_writes_back_until_it_resumes() {
    let (_primary, replica, p, r) = primary_and_replica().await;
    p.execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();
    assert!(
        shows_up(&r, 1, Duration::from_secs(30)).await,
        "row 1 never reached the replica"
    );

    tokio::task::block_in_place(|| replica.pause_replay()).unwrap();
    p.execute("INSERT INTO marks VALUES (2)", &[])
        .await
        .unwrap();
    // the WAL arrives (so the primary sees it sent) but is not applied
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind: i64 = p
            .query_one(
                "SELECT coalesce(max(pg_wal_lsn_diff(sent_lsn, replay_lsn)), 0)::bigint FROM pg_stat_replication WHERE application_name = 'replica'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if behind > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the primary never saw the paused replica fall behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !shows_up(&r, 2, Duration::from_millis(300)).await,
        "row 2 was applied while replay was paused"
    );

    tokio::task::block_in_place(|| replica.resume_replay()).unwrap();
    assert!(
        shows_up(&r, 2, Duration::from_secs(30)).await,
        "row 2 never arrived after replay resumed"
    );
}

/// Values committed by every job of `db` so far (0 only while rekey's engine
/// state does not exist yet; a query error fails the test).
async fn committed(db: &crate::harness::TestDb) -> i64 {
    crate::harness::committed_values(db).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_holds_while_the_replica_lags_behind_max_replica_lag_and_goes_on_when_it_catches_up()
{
    use crate::harness::*;
    let primary = TempCluster::start(ClusterOptions { durable: false }).expect("a private primary");
    let db = TestDb::on(&primary).await;
    db.seed_patients(20_000).await;
    let replica = tokio::task::block_in_place(|| primary.start_replica())
        .unwrap_or_else(|e| panic!("replica did not start: {e}\n{}", primary.log()));
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    tokio::task::block_in_place(|| replica.pause_replay()).unwrap();
    let args = [
        "run",
        "--job",
        j.as_str(),
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "4000",
        "--max-replica-lag",
        "1s",
        "--check-every",
        "100ms",
    ];
    let child = rekey_cmd(&args, &seed_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the replica replays nothing: once the lag passes 1 s the run holds
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let held_at = committed(&db).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        committed(&db).await,
        held_at,
        "nothing is written while the replica lags"
    );
    assert!(
        held_at < 33_334,
        "the run held before the end ({held_at} values)"
    );

    tokio::task::block_in_place(|| replica.resume_replay()).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("replica replica replays"),
        "the hold names the replica and its lag\n{}",
        printed(&out)
    );
    assert_eq!(json(&out)["job_totals"]["values_rewritten"], 33_334);
    drop(replica);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_replica_lag_without_a_replica_holds_and_says_why() {
    use crate::harness::*;
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let args = [
        "run",
        "--job",
        j.as_str(),
        "--json",
        "--max-replica-lag",
        "10s",
        "--check-every",
        "100ms",
        "--run-time",
        "1500ms",
    ];
    let out = rekey(&args, &seed_env());
    assert_eq!(
        out.status.code(),
        Some(5),
        "held until the window ended\n{}",
        printed(&out)
    );
    assert!(
        printed(&out).contains("no replica is connected"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "fails closed: the job started and wrote nothing"
    );
}
