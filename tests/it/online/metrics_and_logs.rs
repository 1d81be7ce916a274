//! What a run shows while it runs: the metrics endpoint (the hold, the rows
//! rewritten, the batches waiting between stages: a lane holds two pages)
//! and `--log-format json` (one object a line, with the hold's reason).

use super::*;

/// `GET /metrics` from a running rekey, as Prometheus scrapes it.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.starts_with("HTTP/1.1 200") {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no metrics on port {port}: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_shows_the_hold_and_the_rows_rewritten() {
    let (_db, dir, j) = patients(4_000).await;
    let control = dir.path().join("control");
    std::fs::write(&control, "pause").unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let c = control.display().to_string();
    let child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "2000",
        "--control-file",
        &c,
        "--check-every",
        "100ms",
        "--metrics-addr",
        &addr,
    ]);
    let mut held = String::new();
    for _ in 0..100 {
        held = tokio::task::block_in_place(|| scrape(port));
        if held.contains("rekey_throttled 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held.contains("rekey_throttled 1"), "{held}");
    assert!(
        held.contains("rekey_throttle_info{reason=\"control_file\"} 1"),
        "{held}"
    );
    std::fs::write(&control, "run").unwrap();
    let mut running = String::new();
    for _ in 0..100 {
        running = tokio::task::block_in_place(|| scrape(port));
        if running.contains("outcome=\"rewritten\"") && running.contains("rekey_throttled 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running.contains("rekey_throttled 0"), "{running}");
    assert!(
        running
            .contains("rekey_values_total{table=\"public.patient_persons\",outcome=\"rewritten\"}"),
        "{running}"
    );
    assert!(running.contains("rekey_batch_seconds_bucket"), "{running}");
    assert!(
        running.contains("rekey_queue_depth{stage=\"to_sink\"}"),
        "{running}"
    );
    assert!(running.contains("rekey_eta_seconds"), "{running}");
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_writes_one_object_per_line_with_the_hold_reason() {
    let (db, dir, j) = patients(1_000).await;
    let control = dir.path().join("control");
    std::fs::write(&control, "pause").unwrap();
    let c = control.display().to_string();
    let mut run = Watched::spawn(&[
        "--log-format",
        "json",
        "run",
        "--job",
        &j,
        "--json",
        "--quiet",
        "--control-file",
        &c,
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("paused by the control file", Duration::from_secs(30))
        .await;
    std::fs::write(&control, "stop").unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("paused by the control file"))
            && l["reason"] == "control_file"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string()),
        "{stderr}"
    );
}

/// The value of `rekey_queue_depth{stage}` on a metrics page (`None`: not shown yet).
fn queue_depth(page: &str, stage: &str) -> Option<u64> {
    let name = format!("rekey_queue_depth{{stage=\"{stage}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of `rekey_pages_held` on a metrics page (`None`: not shown yet).
fn pages_held(page: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix("rekey_pages_held "))
        .and_then(|v| v.trim().parse().ok())
}

/// While its sink waits (here on a row an application holds locked), a
/// lane holds two pages (the one being written, and the next, sealed and
/// ready), not three or five: with three, the lane reads one more page while
/// the sink waits, and holds it for as long as the sink waits.
#[tokio::test(flavor = "multi_thread")]
async fn a_lane_whose_sink_waits_holds_no_more_than_two_pages() {
    let (db, _dir, j) = patients(4_000).await;
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM patient_persons WHERE id = 1 FOR UPDATE", &[])
        .await
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--workers",
        "1",
        "--batch-size",
        "200",
        "--lock-timeout",
        "60s",
        "--check-every",
        "100ms",
        "--metrics-addr",
        &addr,
    ]);
    // the first batch waits on the lock; the next one is sealed and ready
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = tokio::task::block_in_place(|| scrape(port));
        if queue_depth(&page, "to_sink") == Some(1) && pages_held(&page).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sink never had a batch waiting: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // then the lane holds those two and reads no more: five scrapes in a
    // row, the gauges set at each check (every 100 ms)
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let page = tokio::task::block_in_place(|| scrape(port));
        assert_eq!(
            pages_held(&page),
            Some(2),
            "pages held while the sink waits: {page}"
        );
    }
    let still = lock_waits(&db).await;
    assert_eq!(
        still.len(),
        1,
        "premise: the sink waited on the lock throughout: {still:?}"
    );
    tx.rollback().await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}
