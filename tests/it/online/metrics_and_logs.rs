//! What a run shows while it runs: the metrics endpoint (the hold, the rows
//! rewritten) and `--log-format json` (one object a line, with the hold's
//! reason).

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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
