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

/// Values of `patient_persons` on `client` whose key version byte is
/// `version` (the seed's versioned format labels each value with it).
async fn values_under(client: &Client, version: u8) -> i64 {
    client
        .query_one(
            "SELECT (count(*) FILTER (WHERE get_byte(phone_encrypted, 0) = $1)
                   + count(*) FILTER (WHERE get_byte(emergency_contact_phone_encrypted, 0) = $1))::int8
               FROM patient_persons",
            &[&i32::from(version)],
        )
        .await
        .unwrap()
        .get(0)
}

/// A rotation whose standby has not replayed it: the primary's values all
/// under key 2, the standby's (its replay paused) all under key 1.
struct UnreplayedRotation {
    primary: TempCluster,
    replica: TempCluster,
    /// A connection to the standby's copy of the database.
    standby: Client,
    /// The database's URL on the primary.
    url: String,
    _dir: tempfile::TempDir,
    job: String,
    keyring: std::path::PathBuf,
    /// Values the seed wrote under key 1.
    seeded: i64,
}

/// Seeds a private primary with a standby, waits for the standby to hold
/// the seed, pauses its replay, then stages, promotes and runs key 2.
async fn unreplayed_rotation() -> UnreplayedRotation {
    use crate::harness::*;
    let primary = TempCluster::start(ClusterOptions { durable: false }).expect("a private primary");
    let db = TestDb::on(&primary).await;
    db.seed_patients(300).await;
    let replica = tokio::task::block_in_place(|| primary.start_replica())
        .unwrap_or_else(|e| panic!("replica did not start: {e}\n{}", primary.log()));
    let name: String = db
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let standby = connect(&replica.url(&name)).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let seeded = values_under(&db.client, 1).await;
    assert!(seeded > 0, "premise: the seed writes under key 1");

    // the standby holds the table as seeded, then replays nothing more
    let deadline = Instant::now() + Duration::from_secs(30);
    while values_under(&standby, 1).await != seeded {
        assert!(
            Instant::now() < deadline,
            "the standby never caught up with the seed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::block_in_place(|| replica.pause_replay()).unwrap();
    stage_promote_and_run(&job);
    assert_eq!(
        values_under(&db.client, 1).await,
        0,
        "premise: the run rotated every value"
    );
    assert_eq!(
        values_under(&standby, 1).await,
        seeded,
        "premise: the paused standby still serves every value under key 1"
    );
    UnreplayedRotation {
        primary,
        replica,
        standby,
        url: db.url.clone(),
        _dir: dir,
        job,
        keyring,
        seeded,
    }
}

// Today: exit 0, "retired key 1", while the standby, its replay paused,
// still served every value under key 1: applications reading it (and the
// standby, were it promoted) could no longer open them.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_is_refused_while_a_standby_has_not_replayed_the_rotation() {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;

    let retire = [
        "secrets",
        "retire",
        "--job",
        u.job.as_str(),
        "--wait-for-replicas",
        "1s",
    ];
    let out = rekey(&retire, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    for words in [
        "standby replica",
        "has not yet replayed",
        "--wait-for-replicas",
    ] {
        assert!(
            printed(&out).contains(words),
            "missing {words:?}:\n{}",
            printed(&out)
        );
    }
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Previous,
        "key 1 left the keyring while the standby still served values under it"
    );
    assert_eq!(
        values_under(&u.standby, 1).await,
        u.seeded,
        "premise: still paused"
    );
}

/// Starts `rekey <retire>` and returns once the primary shows it running a
/// statement like `doing` (a `LIKE` pattern: what step it is at), failing
/// the test if it ends first.
async fn retire_until(u: &UnreplayedRotation, retire: &[&str], doing: &str) -> std::process::Child {
    use crate::harness::*;
    let mut child = spawn_rekey_captured(retire, &keyring_pass_env());
    let p = connect(&u.primary.url("postgres")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let there: bool = p
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid())",
                &[&doing],
            )
            .await
            .unwrap()
            .get(0);
        if there {
            return child;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the retire ended before it ran {doing:?}: {}",
            printed(&child.wait_with_output().unwrap())
        );
        assert!(Instant::now() < deadline, "the retire never ran {doing:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `rekey <retire>` and returns once it waits for the standbys to
/// replay (after its verify).
async fn retire_looking_at_the_standbys(
    u: &UnreplayedRotation,
    retire: &[&str],
) -> std::process::Child {
    retire_until(u, retire, "%waiting for the standbys to replay%").await
}

// Today: the retire did not wait; it retired key 1 while the standby was
// still paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_waits_for_a_standby_to_replay_the_rotation_then_retires_the_key() {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;

    let retire = [
        "secrets",
        "retire",
        "--job",
        u.job.as_str(),
        "--wait-for-replicas",
        "60s",
    ];
    let child = retire_looking_at_the_standbys(&u, &retire).await;
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Previous,
        "key 1 left the keyring while the standby still served values under it"
    );
    tokio::task::block_in_place(|| u.replica.resume_replay()).unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Retired
    );
    assert_eq!(
        values_under(&u.standby, 1).await,
        0,
        "the standby had replayed the rotation"
    );
}

// Today (before the retire remembered who it waits for): a standby that
// disconnected during the wait was no longer listed, and the retire went on
// and retired key 1 while that standby's copy held every value under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_that_disconnects_while_the_retire_waits_for_it_keeps_the_retire_refused() {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;

    let retire = [
        "secrets",
        "retire",
        "--job",
        u.job.as_str(),
        "--wait-for-replicas",
        "15s",
    ];
    let child = retire_looking_at_the_standbys(&u, &retire).await;
    tokio::task::block_in_place(|| u.replica.ctl(&["stop", "-w", "-m", "immediate"])).unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("replica at 127.0.0.1 (disconnected while behind: ")
            && printed(&out).contains("Reconnect it and let it replay"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Previous,
        "key 1 left the keyring while the standby's copy held values under it"
    );
}

/// Opens a transaction on the primary holding `patient_persons` as a
/// writer does, then starts `rekey secrets retire` (a 60 s wait for
/// writers, 2 s for the standbys) and returns both once the retire waits
/// for that transaction to end (before its verify).
async fn retire_behind_a_writer(u: &UnreplayedRotation) -> (Client, std::process::Child) {
    let writer = connect(&u.url).await;
    writer
        .batch_execute("BEGIN; LOCK TABLE patient_persons IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let retire = [
        "secrets",
        "retire",
        "--job",
        u.job.as_str(),
        "--wait-for-writers",
        "60s",
        "--wait-for-replicas",
        "2s",
    ];
    let child = retire_until(u, &retire, "%FROM pg_locks l LEFT JOIN pg_stat_activity a%").await;
    (writer, child)
}

/// Stops the standby at once and returns once the primary no longer lists
/// its WAL sender.
async fn standby_gone(u: &UnreplayedRotation) {
    tokio::task::block_in_place(|| u.replica.ctl(&["stop", "-w", "-m", "immediate"])).unwrap();
    let p = connect(&u.primary.url("postgres")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let senders: i64 = p
            .query_one("SELECT count(*) FROM pg_stat_replication", &[])
            .await
            .unwrap()
            .get(0);
        if senders == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the primary still lists the stopped standby"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Today: exit 0, "retired key 1": the standby (no replication slot) had
// replayed none of the rotation and disconnected while the retire waited for
// a writer (the same holds during an hours-long verify); the retire's last
// look found no standby at all, and key 1 was retired while that standby's
// copy held every value under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_that_disconnects_behind_before_the_verify_ends_keeps_the_retire_refused() {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;
    let (writer, child) = retire_behind_a_writer(&u).await;
    standby_gone(&u).await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    for words in [
        "standby replica at 127.0.0.1 (disconnected while behind: ",
        "bytes of WAL behind when last seen, at ",
        "was not seen to replay the rotation's writes before it disconnected",
        "Reconnect it and let it replay",
    ] {
        assert!(
            printed(&out).contains(words),
            "missing {words:?}:\n{}",
            printed(&out)
        );
    }
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Previous,
        "key 1 left the keyring while the standby's copy held values under it"
    );
}

// The other side: a standby seen to replay the rotation during the retire
// holds none of its values under key 1; its leaving after does not hold
// the retire back.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_that_replayed_the_rotation_and_disconnects_before_the_verify_ends_does_not_hold_the_retire(
) {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;
    // seen behind when the retire began, then it replays
    let (writer, child) = retire_behind_a_writer(&u).await;
    tokio::task::block_in_place(|| u.replica.resume_replay()).unwrap();
    // the primary hears of the standby's replay, then the retire looks again
    let p = connect(&u.primary.url("postgres")).await;
    let position: String = p
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let heard_at: String = loop {
        let row = p
            .query_one(
                "SELECT coalesce(bool_and(replay_lsn >= $1::text::pg_lsn), false), clock_timestamp()::text
                   FROM pg_stat_replication",
                &[&position],
            )
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            break row.get(1);
        }
        assert!(
            Instant::now() < deadline,
            "the primary never heard the standby replay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let looked: bool = p
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                 WHERE query LIKE '%watching the standbys%' AND state = 'idle'
                                   AND query_start > $1::text::timestamptz AND pid <> pg_backend_pid())",
                &[&heard_at],
            )
            .await
            .unwrap()
            .get(0);
        if looked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retire never looked at the standbys again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        values_under(&u.standby, 1).await,
        0,
        "premise: the standby replayed the rotation"
    );
    standby_gone(&u).await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Retired
    );
}

/// A client process that is killed when the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts PostgreSQL's client `program` with `args` (its output kept in
/// `dir`).
fn client_program(program: &str, args: &[&str], dir: &std::path::Path) -> Killed {
    let bin = rekey::db::cluster::find_bindir().expect("PostgreSQL's binaries");
    let log = std::fs::File::create(dir.join(format!("{program}.log"))).unwrap();
    Killed(
        std::process::Command::new(bin.join(program))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program} did not start: {e}")),
    )
}

// A WAL archiver streaming from the primary (pg_receivewal, as Barman
// runs it) and a logical decoding client (a change-data-capture consumer)
// hold no copy anyone reads: a retire that waited for their replay, which
// never comes, would be refused after every rotation.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_does_not_wait_for_a_wal_archiver_or_a_logical_decoding_client() {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let primary = TempCluster::start(ClusterOptions { durable: false }).expect("a private primary");
    let p = connect(&primary.url("postgres")).await;
    p.batch_execute("ALTER SYSTEM SET wal_level = logical")
        .await
        .unwrap();
    drop(p);
    tokio::task::block_in_place(|| primary.ctl(&["restart", "-w", "-m", "fast", "-t", "60"]))
        .unwrap();
    let db = TestDb::on(&primary).await;
    db.seed_patients(300).await;
    db.client
        .batch_execute("CREATE PUBLICATION everything FOR ALL TABLES")
        .await
        .unwrap();
    let name: String = db
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir(&wal).unwrap();
    let port = primary.port().to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let _archiver = client_program(
        "pg_receivewal",
        &[
            &common[..],
            &["-D", wal.to_str().unwrap(), "--status-interval=1"],
        ]
        .concat(),
        dir.path(),
    );
    let _decoder = client_program(
        "pg_recvlogical",
        &[
            &common[..],
            &[
                "-d",
                &name,
                "--slot",
                "cdc",
                "--create-slot",
                "--start",
                "-P",
                "pgoutput",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=everything",
                "-f",
                "/dev/null",
                "-s",
                "1",
            ],
        ]
        .concat(),
        dir.path(),
    );
    // both stream, and both have reported where they are
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let streaming: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND write_lsn IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if streaming == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg_receivewal and pg_recvlogical never both streamed ({streaming}):\n{}\n{}",
            std::fs::read_to_string(dir.path().join("pg_receivewal.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("pg_recvlogical.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (job, keyring) = keyring_file_job(&db, &dir);
    stage_promote_and_run(&job);

    let retire = [
        "secrets",
        "retire",
        "--job",
        job.as_str(),
        "--wait-for-replicas",
        "5s",
    ];
    let out = rekey(&retire, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(!printed(&out).contains("standby"), "{}", printed(&out));
    assert_eq!(keyring_table(&keyring).entries[0].state, KeyState::Retired);
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A process stopped with SIGSTOP, continued when the test ends (a stopped
/// WAL sender would hold the primary's shutdown).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// The primary's WAL senders to the standby: `(pid, replayed past the
/// position now)`, oldest first.
async fn senders_to_the_standby(p: &Client) -> Vec<(i32, bool)> {
    p.query(
        "SELECT pid, coalesce(replay_lsn >= pg_current_wal_lsn(), false) FROM pg_stat_replication
          WHERE application_name = 'replica' ORDER BY backend_start",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

// Today: exit 4 after the whole wait, "standby replica at 127.0.0.1
// (disconnected while behind ...) was not seen to replay the rotation's
// writes": the standby had reconnected (its old connection silent, still
// listed until wal_sender_timeout) and replayed every write on the new one
// before the retire began; the retire saw both connections in its first
// look, and when the server dropped the old one it counted as a standby
// gone behind, since the new one was not "first seen later".
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_that_reconnected_just_before_the_retire_and_replayed_does_not_hold_it_when_its_old_connection_is_dropped(
) {
    use crate::harness::*;
    use rekey::crypto::keytable::KeyState;
    let u = unreplayed_rotation().await;
    // the standby gives up on a silent primary at once and reconnects
    for sql in [
        "ALTER SYSTEM SET wal_receiver_timeout = '2s'",
        "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'",
        "SELECT pg_reload_conf()",
    ] {
        u.standby.batch_execute(sql).await.unwrap();
    }
    let p = connect(&u.primary.url("postgres")).await;
    let old = match senders_to_the_standby(&p).await[..] {
        [(pid, false)] => pid,
        ref other => panic!("premise: one WAL sender, behind: {other:?}"),
    };
    // the old connection falls silent (a network cut, as the primary sees it)
    let stopped = Stopped::new(old);
    tokio::task::block_in_place(|| u.replica.resume_replay()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = senders_to_the_standby(&p).await;
        if now.len() == 2 && now[0] == (old, false) && now[1].1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never reconnected and replayed: {now:?}\n{}",
            u.replica.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        values_under(&u.standby, 1).await,
        0,
        "premise: the standby replayed the rotation"
    );

    let retire = [
        "secrets",
        "retire",
        "--job",
        u.job.as_str(),
        "--wait-for-replicas",
        "30s",
    ];
    let child = retire_looking_at_the_standbys(&u, &retire).await;
    // the server drops the old connection
    drop(stopped);
    p.execute("SELECT pg_terminate_backend($1)", &[&old])
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        keyring_table(&u.keyring).entries[0].state,
        KeyState::Retired
    );
}
