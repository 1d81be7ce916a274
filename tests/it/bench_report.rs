//! `rekey bench --report-dir`: the report's samples reach the end of the run
//! and mark a kill and its resume; the chart has labelled axes ticked from 0
//! and draws the interrupted run with its marks; `--with-load` reports the
//! application's TPS, latency and the WAL written, full speed and throttled;
//! every run reports its WAL (the series, per row, per second, against the
//! `--max-wal-rate` cap) and the time `rekey run` spends before its first batch.

use rekey::db::cluster::{ClusterOptions, TempCluster};

use crate::harness::*;

/// A quiet `rekey bench` of 20,000 rows in batches of 500 with `extra`
/// flags, into a report directory: what it printed, its `report.json`, and
/// the directory (kept while the caller holds it).
fn bench_20k(extra: &[&str]) -> (std::process::Output, serde_json::Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().display().to_string();
    let mut args = vec!["bench", "--rows", "20000", "--batch-size", "500"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--report-dir", &report_dir, "--quiet"]);
    let out = rekey(&args, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let report =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    (out, report, dir)
}

#[test]
fn a_bench_report_samples_to_the_end_and_charts_the_kill_and_resume() {
    let (_, report, dir) = bench_20k(&["--interrupt-at", "0.5", "--json"]);
    let progress = report["progress"].as_array().unwrap();
    let last = progress.last().unwrap();
    assert_eq!(last[1], 20_000, "the samples end with every row: {last}");
    let rekey_s = report["rekey_runs_s"][0].as_f64().unwrap();
    assert!(
        (last[0].as_f64().unwrap() - rekey_s).abs() < 1e-6,
        "{last} vs {rekey_s}"
    );
    let killed = report["killed_at_s"].as_f64().unwrap();
    let resumed = report["resumed_at_s"].as_f64().unwrap();
    assert!(0.0 < killed && killed <= resumed, "{killed} {resumed}");
    assert!(report["throughput"].as_array().unwrap().len() >= 60);
    for pace in ["last_tenth_rate_ratio", "resumed_last_tenth_rate_ratio"] {
        let ratio = report[pace]
            .as_f64()
            .unwrap_or_else(|| panic!("no {pace}: {report}"));
        assert!(0.0 < ratio && ratio.is_finite(), "{pace}: {ratio}");
    }

    let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
    for label in [
        "rows/s",
        "seconds since the start of the run",
        "killed",
        "resumed",
        "p99",
        "milliseconds",
    ] {
        assert!(svg.contains(label), "the chart lacks {label:?}");
    }
    let squeezed: String = svg.split_whitespace().collect();
    assert!(
        squeezed.contains(">0<") && squeezed.contains(">0.0<"),
        "no tick at 0 on both axes"
    );
}

#[test]
fn a_resumed_bench_pass_counts_its_own_rows_against_the_rows_it_found_left() {
    // paced so each pass logs a few lines; the interrupted round runs last,
    // so the last progress line is its resumed pass's
    let out = rekey(
        &[
            "bench",
            "--rows",
            "20000",
            "--batch-size",
            "500",
            "--interrupt-at",
            "0.5",
            "--max-rows-per-sec",
            "20000",
            "--progress-every",
            "100ms",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let log = stderr(&out);
    let lines = progress_lines(&log);
    for v in &lines {
        if let Some(total) = v["rows_total"].as_u64() {
            assert!(v["rows_done"].as_u64().unwrap() <= total, "{v}\n{log}");
        }
    }
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no progress line: {log}"));
    let total = last["rows_total"]
        .as_u64()
        .unwrap_or_else(|| panic!("the resumed pass lost its total: {last}\n{log}"));
    assert!(total < 20_000, "the whole table, not the rows left: {last}");
}

#[test]
fn a_bench_report_measures_the_wal_and_the_time_before_the_first_batch() {
    // a cap far above what the run writes: reported, never holding
    let (out, r, _dir) = bench_20k(&["--max-wal-rate", "1GiB/s"]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} in {r}"));
    let rekey_s = f(&r["rekey_s"]);

    let series: Vec<(f64, u64)> = r["wal_progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (f(&p[0]), p[1].as_u64().unwrap()))
        .collect();
    assert_eq!(series[0], (0.0, 0), "the series starts at the run's start");
    assert!(
        series
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "time and WAL only go forward: {series:?}"
    );
    let &(end, wal_bytes) = series.last().unwrap();
    assert!(
        (end - rekey_s).abs() < 1e-6,
        "the series ends with the run: {end} vs {rekey_s}"
    );
    assert_eq!(
        r["wal_bytes"], wal_bytes,
        "the whole run's WAL is the series' last point"
    );
    // a rewritten row's new tuple and index entry are some hundreds of bytes
    let per_row = f(&r["wal_bytes_per_row"]);
    assert!((50.0..100_000.0).contains(&per_row), "{per_row} B/row");
    assert!((per_row - wal_bytes as f64 / 20_000.0).abs() < 1e-6, "{r}");
    assert!(
        (f(&r["wal_bytes_per_s"]) - wal_bytes as f64 / rekey_s).abs() < 1e-3,
        "{r}"
    );
    assert_eq!(r["wal_cap_bytes_per_s"], 1u64 << 30);
    // the busiest 10 s, as the window function reads the run's own series
    // (equal up to the JSON round trip of the samples' seconds)
    let busiest = rekey::bench::busiest(&series, 10.0);
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => false,
    };
    assert!(
        close(r["wal_busiest_10s_bytes_per_s"].as_f64(), busiest),
        "{busiest:?} vs {r}"
    );
    assert!(
        close(
            r["wal_busiest_10s_over_cap"].as_f64(),
            busiest.map(|b| b / f64::from(1u32 << 30))
        ),
        "{r}"
    );

    let (setup_s, whole_s) = (f(&r["setup_s"]), f(&r["whole_s"]));
    // the keys checked, the job and its ranges written: statements on the
    // server, not nothing
    assert!(setup_s > 0.001, "{r}");
    assert!(whole_s > rekey_s, "{r}");
    assert!(
        (whole_s - (setup_s + rekey_s)).abs() < 1e-6,
        "one round: {r}"
    );
    assert!(f(&r["whole_ratio"]) < f(&r["ratio"]), "{r}");

    let text = String::from_utf8_lossy(&out.stdout);
    let wal_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("WAL "))
        .unwrap_or_else(|| panic!("no WAL line: {text}"));
    assert!(
        wal_line.contains(&format!("{per_row:.0} B/row")),
        "{wal_line}"
    );
    assert!(text.contains("before the first batch"), "{text}");

    // 20,000 rows write a few MB of WAL: under the default max_wal_size, the
    // server is never asked for a checkpoint, so nothing is advised
    let checkpoints = r["checkpoints"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert!(
        checkpoints.iter().all(|c| c["cause"] != "requested"),
        "{checkpoints:?}"
    );
    assert_eq!(r["checkpoint_advice"], serde_json::Value::Null, "{r}");
    let max_wal_size = r["max_wal_size_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        max_wal_size > wal_bytes,
        "the bench's own cluster allows more: {r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bench_whose_wal_passes_max_wal_size_marks_the_checkpoints_and_names_the_setting() {
    let cluster = TempCluster::start(ClusterOptions { durable: true }).expect("a private cluster");
    let admin = connect(&cluster.url("postgres")).await;
    // the least it takes: a checkpoint is asked for every ~17 MB of WAL
    admin
        .batch_execute("ALTER SYSTEM SET max_wal_size = '32MB'")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let requested_count = async || -> i64 {
        admin
            .query_one("SELECT checkpoints_req FROM pg_stat_bgwriter", &[])
            .await
            .unwrap()
            .get(0)
    };
    let requested_before = requested_count().await;
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().display().to_string();
    let url = cluster.url("postgres");
    let out = tokio::task::block_in_place(|| {
        rekey(
            &[
                "bench",
                "--database-url",
                &url,
                "--rows",
                "100000",
                "--report-dir",
                &report_dir,
            ],
            &[],
        )
    });
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let requested_by_the_bench = requested_count().await - requested_before;
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let rekey_s = r["rekey_s"].as_f64().unwrap();
    let wal_bytes = r["wal_bytes"].as_u64().unwrap();
    assert!(
        wal_bytes > 32 << 20,
        "enough WAL to ask for checkpoints: {r}"
    );

    let requested: Vec<&serde_json::Value> = r["checkpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .filter(|c| c["cause"] == "requested")
        .collect();
    assert!(!requested.is_empty(), "{}", r["checkpoints"]);
    // none listed twice: no more than the server counted over the whole
    // bench (its seeding and floor included)
    assert!(
        requested.len() as i64 <= requested_by_the_bench,
        "{} requested listed, {requested_by_the_bench} counted: {}",
        requested.len(),
        r["checkpoints"]
    );
    let mut last_began = -1.0;
    for c in &requested {
        // begun during the run, in order: the server runs one at a time
        let began = c["began_at_s"].as_f64().unwrap_or_else(|| panic!("{c}"));
        assert!(
            began > last_began && began <= rekey_s,
            "{c} in a {rekey_s} s run"
        );
        last_began = began;
        if let Some(ended) = c["ended_at_s"].as_f64() {
            assert!(began < ended && ended <= rekey_s, "{c}");
        }
    }
    assert!(
        requested.iter().any(|c| c["ended_at_s"].is_f64()),
        "one ended during the run, its start placed by its redo point: {requested:?}"
    );
    assert_eq!(r["max_wal_size_bytes"], 32u64 << 20);
    let advice = r["checkpoint_advice"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(advice.contains("max_wal_size (32 MiB)"), "{advice}");
    assert!(advice.contains("at least"), "{advice}");

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{} requested", requested.len())),
        "the summary counts them: {text}"
    );
    assert!(
        text.contains(advice),
        "the summary gives the advice: {text}"
    );
    let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
    assert!(
        svg.contains("a checkpoint of the server"),
        "the chart marks them"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_job_projects_only_what_plan_says_is_left_to_rewrite() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let bench = |db_rows_left: u64| {
        let out = rekey(
            &[
                "bench", "--rows", "5000", "--job", &job, "--quiet", "--json",
            ],
            &seed_env(),
        );
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
        let projections = json(&out)["projections"].clone();
        assert_eq!(projections[0][0], db_rows_left, "{projections}");
        projections[0][1].as_f64().unwrap()
    };
    assert!(bench(3_000) > 0.0);
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(bench(0), 0.0, "a rotated table needs no window");
}

#[test]
fn bench_with_load_reports_the_applications_cost_at_full_speed_and_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let out = rekey(
        &[
            "bench",
            "--rows",
            "20000",
            "--with-load",
            "--load-scale",
            "1",
            "--load-baseline-secs",
            "2",
            "--max-rows-per-sec",
            "10000",
            "--report-dir",
            &dir.path().display().to_string(),
            "--json",
            "--quiet",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let load = json(&out)["load"].clone();
    let runs = load["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "full speed, then throttled: {load}");
    assert!(runs[0]["max_rows_per_sec"].is_null(), "{load}");
    assert_eq!(runs[1]["max_rows_per_sec"], 10_000, "{load}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    for run in runs {
        for window in ["baseline", "during"] {
            let w = &run[window];
            assert!(f(&w["tps"]) > 0.0, "{window}: {run}");
            assert!(
                f(&w["latency_ms_p50"]) > 0.0
                    && f(&w["latency_ms_p50"]) <= f(&w["latency_ms_p99"])
                    && f(&w["latency_ms_p99"]) <= f(&w["latency_ms_max"]),
                "{window}: {run}"
            );
        }
        let per_row = f(&run["rekey_wal_bytes_per_row"]);
        // a rewritten row's new tuple and index entry are some hundreds of bytes
        assert!((50.0..100_000.0).contains(&per_row), "{run}");
        let per_s = f(&run["rekey_wal_bytes_per_s"]);
        let expected = per_row * f(&run["rekey_rows_per_s"]);
        assert!(
            per_s > expected * 0.5 && per_s < expected * 2.0,
            "WAL/s {per_s} vs WAL/row x rows/s {expected}: {run}"
        );
        assert!(f(&run["wal_bytes_per_s"]) >= per_s * 0.5, "{run}");
        let from = f(&run["rekey_from_s"]);
        assert!(from >= 1.5 && f(&run["rekey_to_s"]) > from, "{run}");
        assert!(!run["app_tps"].as_array().unwrap().is_empty(), "{run}");
        assert!(
            run["checkpoints"].is_array(),
            "the checkpoints during each loaded run: {run}"
        );
    }
    let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
    for label in [
        "transactions/s",
        "app TPS, rekey at full speed",
        "app TPS, rekey at max 10000 rows/s",
    ] {
        assert!(svg.contains(label), "the chart lacks {label:?}");
    }
}

// Today: `rekey bench --database-url` dropped its scratch schema but left
// the engine's schema `rekey` (its state tables) it had created in the
// database, though README says the bench leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_bench_on_a_real_server_leaves_no_schema_of_its_own_behind() {
    let db = TestDb::new().await;
    let schemas = async || -> Vec<String> {
        db.client
            .query(
                "SELECT nspname::text FROM pg_namespace
                  WHERE nspname !~ '^pg_' AND nspname <> 'information_schema' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let before = schemas().await;
    let out = rekey(
        &[
            "bench",
            "--database-url",
            &db.url,
            "--rows",
            "200",
            "--quiet",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(schemas().await, before, "{}", printed(&out));
}
