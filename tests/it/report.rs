//! Audit and evidence: `rekey run`'s audit events and their counts, the
//! fields every event carries (keys, incident, notes, an operator that is
//! never "unknown"), the hash chain under concurrent writers, and `rekey
//! report` with `--check` finding an edited, deleted or reordered event.

use crate::harness::*;

/// The JSON audit lines beside the job file.
fn audit_lines(dir: &tempfile::TempDir) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.path().join("patients.audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Values of `patient_persons` whose version byte is `v`.
async fn values_on(db: &TestDb, v: i32) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FILTER (WHERE get_byte(phone_encrypted, 0) = $1)
                  + count(*) FILTER (WHERE get_byte(emergency_contact_phone_encrypted, 0) = $1)
               FROM patient_persons",
            &[&v],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn run_records_an_event_saying_how_many_values_it_rewrote_with_keys_incident_and_notes() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let job = job.to_str().unwrap();
    // a reason that is not one is refused before anything runs
    let out = rekey(
        &["run", "--job", job, "--reason", "because I said so"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(stderr(&out).contains("not a reason"), "{}", printed(&out));

    let before = values_on(&db, 1).await;
    // no USER, no LOGNAME (the harness clears the environment): the operator is the database role
    let out = rekey(
        &[
            "run",
            "--job",
            job,
            "--json",
            "--reason",
            "scheduled_annual",
            "--incident",
            "CHG-2026-17",
            "--notes",
            "Annual rotation per policy",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let rewritten = before - values_on(&db, 1).await;
    assert!(rewritten > 0 && values_on(&db, 2).await == rewritten);

    let events = audit_lines(&dir);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["run_started", "run_completed"]);
    let done = &events[1];
    assert_eq!(done["affected_records"], rewritten, "{done}");
    assert_eq!(done["job_id"], json(&out)["job_id"]);
    assert_eq!(
        events[0]["job_id"],
        json(&out)["job_id"],
        "run_started names its job: {}",
        events[0]
    );
    for e in &events {
        assert_eq!(
            (e["old_key"].as_i64(), e["new_key"].as_i64()),
            (Some(1), Some(2)),
            "{e}"
        );
        assert_eq!(e["incident_id"], "CHG-2026-17");
        assert_eq!(e["notes"], "Annual rotation per policy");
        assert_eq!(e["reason"], "scheduled_annual");
        assert_eq!(
            e["operator"], "postgres",
            "the session's role, never unknown: {e}"
        );
    }
    let row = db
        .client
        .query_one(
            "SELECT affected_records, old_key, new_key, incident_id, notes, operator, reason, hash, prev_hash
               FROM rekey.audit WHERE event_type = 'run_completed'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(rewritten));
    assert_eq!(
        (row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)),
        (Some(1), Some(2))
    );
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some("CHG-2026-17")
    );
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("Annual rotation per policy")
    );
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("postgres"));
    assert_eq!(
        row.get::<_, Option<String>>(7).as_deref(),
        done["hash"].as_str()
    );
    assert_eq!(
        row.get::<_, Option<String>>(8).as_deref(),
        events[0]["hash"].as_str()
    );

    // a second run finds nothing stale and says so: zero
    let out = rekey(&["run", "--job", job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(audit_lines(&dir)[3]["affected_records"], 0);
    let out = rekey(&["report", "--job", job, "--check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Before: `run --restart` gave up the unfinished job with no event, so the
// trail never said what became of it or of the values it had rewritten.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_records_the_unfinished_job_it_gives_up_with_what_it_had_rewritten() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let window = [
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "5000",
        "--run-time",
        "500ms",
    ];
    let out = rekey(&window, &seed_env());
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let first = json(&out);
    let rewritten = first["job_totals"]["values_rewritten"].as_u64().unwrap();
    assert!(rewritten > 0, "{first}");

    let out = rekey(&["run", "--job", &j, "--json", "--restart"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let second = json(&out);
    assert_ne!(second["job_id"], first["job_id"]);
    let events = audit_lines(&dir);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "run_started",
            "run_window_ended",
            "reencryption_abandoned",
            "run_started",
            "run_completed"
        ]
    );
    let given_up = &events[2];
    assert_eq!(given_up["job_id"], first["job_id"], "{given_up}");
    assert_eq!(given_up["affected_records"], rewritten, "{given_up}");
    assert_eq!(events[3]["job_id"], second["job_id"], "{}", events[3]);
}

// Today: a run that failed once it had started (here past the limit of
// rows the database refuses one by one) left `run_started` as the trail's
// last word on it, with no end, nor what it had committed before failing.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_fails_records_its_failure_with_what_it_had_rewritten() {
    let db = TestDb::new().await;
    db.seed_patients(1_600).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.id > 500 THEN RAISE EXCEPTION 'frozen'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER frozen BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION frozen();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));

    let events = audit_lines(&dir);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types, ["run_started", "run_failed"], "{events:?}");
    let failed = &events[1];
    assert_eq!(failed["job_id"], events[0]["job_id"], "{failed}");
    assert_eq!(failed["verification_status"], "pending", "{failed}");
    assert_eq!(
        failed["affected_records"],
        values_on(&db, 2).await,
        "{failed}"
    );
    let detail = failed["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the run failed after re-encrypting")
            && detail.contains("refused the write of more than 1000 rows"),
        "{failed}"
    );
    assert_eq!(check(&j).0, Some(0), "{}", check(&j).1);
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_appending_at_once_never_fork_the_chain() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let mut setup = connect(&db.url).await;
    rekey::state::ensure_schema(&mut setup).await.unwrap();
    let audit = rekey::lifecycle::audit::Audit {
        path: dir.path().join("patients.audit.jsonl"),
        operator: "alice".into(),
        reason: Some("scheduled".into()),
        chain: "patients".into(),
        incident_id: None,
        operator_notes: None,
        keys: None,
    };
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (audit, url) = (audit.for_keys(Some(1), 2), db.url.clone());
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await;
            for i in 0..5 {
                let what = rekey::lifecycle::audit::What {
                    event_type: "test_event",
                    secret_id: "file:k#2",
                    verification_status: "not_applicable",
                    affected_records: Some(w * 100 + i),
                    notes: "",
                    job_id: None,
                };
                audit.record(&client, what).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seqs: Vec<i64> = db
        .client
        .query(
            "SELECT seq FROM rekey.audit WHERE chain = 'patients' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<i64>>());
    let out = rekey(
        &[
            "report",
            "--job",
            job.to_str().unwrap(),
            "--check",
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["check"]["file_events"], 30);
}

/// Drives `rekey rotate --grace 0s` until the rotation is over: a call that
/// waits for an operator step exits 6 and the next one goes on.
fn rotate_to_the_end(job: &str, extra: &[&str]) {
    for _ in 0..8 {
        let args = [
            &["rotate", "--job", job, "--grace", "0s", "--json"][..],
            extra,
        ]
        .concat();
        let out = rekey(&args, &keyring_pass_env());
        match out.status.code() {
            Some(6) => continue,
            Some(0) if json(&out)["step"] == "retired" => return,
            Some(0) => continue,
            _ => panic!("rotate failed: {}", printed(&out)),
        }
    }
    panic!("the rotation did not end in 8 calls");
}

/// `rekey report --check`: its exit code and what it printed.
fn check(job: &str) -> (Option<i32>, String) {
    let out = rekey(&["report", "--job", job, "--check"], &[]);
    (out.status.code(), printed(&out))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_reports_every_step_and_check_finds_each_edit_deletion_and_reordering() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    rotate_to_the_end(
        &job,
        &[
            "--operator",
            "alice",
            "--reason",
            "scheduled_annual",
            "--incident",
            "INC-2026-001",
            "--notes",
            "Annual rotation per policy",
        ],
    );

    let out_dir = dir.path().join("evidence");
    let out = rekey(
        &[
            "report",
            "--job",
            &job,
            "--out",
            out_dir.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let files: Vec<String> = json(&out)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert!(
        files[0].ends_with(".json") && files[1].ends_with(".md"),
        "{files:?}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    let page = std::fs::read_to_string(&files[1]).unwrap();
    let steps: Vec<&str> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "key_staged",
            "reencryption_completed",
            "verification_passed",
            "key_promoted",
            "key_retired"
        ],
        "{doc}"
    );
    for s in &steps {
        assert!(page.contains(s), "the page names {s}:\n{page}");
    }
    assert_eq!(doc["who"], serde_json::json!(["alice"]));
    assert_eq!(doc["why"], "scheduled_annual");
    assert_eq!(doc["incident_id"], serde_json::json!(["INC-2026-001"]));
    assert_eq!(
        doc["notes"],
        serde_json::json!(["Annual rotation per policy"])
    );
    assert_eq!(
        (
            doc["keys"]["old"]["id"].as_i64(),
            doc["keys"]["new"]["id"].as_i64()
        ),
        (Some(1), Some(2))
    );
    assert!(
        doc["keys"]["old"]["fingerprint"].is_string()
            && doc["keys"]["new"]["fingerprint"].is_string(),
        "{doc}"
    );
    assert_eq!(doc["final_full_verify"]["passed"], true, "{doc}");
    assert_eq!(
        doc["final_full_verify"]["values_checked_or_left"],
        values_in(2_000)
    );
    assert!(
        doc["reencryption_jobs"][0]["duration_s"].is_number(),
        "{doc}"
    );
    assert!(doc["steps"][4]["seconds_since_previous_step"].is_number());
    assert_eq!(doc["events"].as_array().unwrap().len(), 5);
    for e in doc["events"].as_array().unwrap() {
        assert_eq!(
            (e["old_key"].as_i64(), e["new_key"].as_i64()),
            (Some(1), Some(2)),
            "{e}"
        );
        assert_eq!(
            (e["incident_id"].as_str(), e["reason"].as_str()),
            (Some("INC-2026-001"), Some("scheduled_annual"))
        );
    }
    let out = rekey(
        &[
            "report",
            "--job",
            &job,
            "--out",
            out_dir.to_str().unwrap(),
            "--format",
            "html",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let html = std::fs::read_to_string(files[1].replace(".md", ".html")).unwrap();
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<td>key_retired</td>"),
        "{html}"
    );
    assert!(page.contains(doc["events"][4]["hash"].as_str().unwrap()));
    // never key material: neither the old key nor the new one appears
    let ring = rekey::secrets::file::KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P")
        .unwrap()
        .table
        .keyring()
        .unwrap();
    let new_key = hex::encode(ring.get(2).unwrap().material());
    let written = std::fs::read_to_string(&files[0]).unwrap() + &page;
    assert!(!written.contains(K1) && !written.contains(&new_key));

    assert_eq!(check(&job).0, Some(0), "{}", check(&job).1);
    let trail = dir.path().join("patients.audit.jsonl");
    let original = std::fs::read_to_string(&trail).unwrap();

    // an event edited in the table
    let edit = "UPDATE rekey.audit SET affected_records = affected_records + 1 WHERE event_type = 'reencryption_completed'";
    db.client.batch_execute(edit).await.unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("reencryption_completed") && said.contains("edited"),
        "{said}"
    );
    db.client
        .batch_execute(&edit.replace("+ 1", "- 1"))
        .await
        .unwrap();
    assert_eq!(check(&job).0, Some(0));

    // an event edited in the file
    let lines: Vec<&str> = original.lines().collect();
    let promoted = lines
        .iter()
        .position(|l| l.contains("\"key_promoted\""))
        .unwrap();
    let mut edited = lines.clone();
    let forged = lines[promoted].replace("\"alice\"", "\"mallory\"");
    edited[promoted] = &forged;
    std::fs::write(&trail, edited.join("\n") + "\n").unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted") && said.contains(&format!("line {}", promoted + 1)),
        "{said}"
    );

    // a line deleted from the file, and two lines swapped
    let mut dropped = lines.clone();
    dropped.remove(promoted);
    std::fs::write(&trail, dropped.join("\n") + "\n").unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted") && said.contains("deleted"),
        "{said}"
    );
    let mut swapped = lines.clone();
    swapped.swap(promoted, promoted - 1);
    std::fs::write(&trail, swapped.join("\n") + "\n").unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(said.contains("reordered"), "{said}");
    // the whole file gone
    std::fs::remove_file(&trail).unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(said.contains("the file is missing"), "{said}");
    std::fs::write(&trail, &original).unwrap();
    assert_eq!(check(&job).0, Some(0));

    // an event deleted from the table
    db.client
        .batch_execute("DELETE FROM rekey.audit WHERE event_type = 'verification_passed'")
        .await
        .unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted") && said.contains("event 3 is missing"),
        "{said}"
    );
}

#[cfg(feature = "aws")]
#[tokio::test(flavor = "multi_thread")]
async fn with_an_aws_store_and_no_user_the_operator_is_the_aws_caller_identity() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("rekey-test/operator-{}", std::process::id());
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-secrets-manager\"\nsecret_id = \"{secret}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            moto().endpoint
        ),
    )
    .unwrap();
    let job = job.to_str().unwrap();
    let mut import = aws_env();
    import.extend([
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
    ]);
    let out = rekey(
        &[
            "secrets",
            "init",
            "--job",
            job,
            "--import-env",
            "ENCRYPTION",
        ],
        &import,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["run", "--job", job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let events = audit_lines(&dir);
    let last = events.last().unwrap();
    assert_eq!(last["event_type"], "run_completed");
    let operator = last["operator"].as_str().unwrap();
    assert!(
        operator.starts_with("arn:aws:"),
        "the STS caller identity: {last}"
    );
}

// Before events named their database: one job file run against staging and
// then production appends both databases' events to one file, and
// `report --check` against either said "rekey.audit holds another event at
// this place: one of them was replaced" (exit 7), a tamper alarm for what
// nobody tampered with.
#[tokio::test(flavor = "multi_thread")]
async fn one_audit_file_serving_two_databases_checks_against_each_and_still_finds_an_edit() {
    let staging = TestDb::new().await;
    let production = TestDb::new().await;
    staging.seed_patients(300).await;
    production.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = staging.patients_job(&dir);
    let job = job.to_str().unwrap();
    for db in [&staging, &production] {
        let out = rekey(
            &["run", "--job", job, "--database-url", &db.url],
            &seed_env(),
        );
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    }
    let lines = audit_lines(&dir);
    assert_eq!(
        lines.iter().filter(|l| l["seq"] == 1).count(),
        2,
        "both databases' first events are in the one file: {lines:?}"
    );
    for db in [&staging, &production] {
        let out = rekey(
            &[
                "report",
                "--job",
                job,
                "--check",
                "--json",
                "--database-url",
                &db.url,
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
        let check = &json(&out)["check"];
        let own = check["file_events"].as_u64().unwrap_or_default();
        assert_eq!(
            (own, check["file_other_databases"].as_u64()),
            (
                check["table_events"].as_u64().unwrap_or_default(),
                Some(lines.len() as u64 - own)
            ),
            "{check}"
        );
    }

    // an edit of production's own line is still found
    let path = dir.path().join("patients.audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.lines().last().unwrap().to_string();
    let edited = last.replacen("\"operator\":\"", "\"operator\":\"x", 1);
    assert_ne!(edited, last);
    std::fs::write(&path, text.replace(&last, &edited)).unwrap();
    let out = rekey(
        &[
            "report",
            "--job",
            job,
            "--check",
            "--database-url",
            &production.url,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(7), "{}", printed(&out));
    assert!(
        printed(&out).contains("the line was edited"),
        "{}",
        printed(&out)
    );

    // changing the database's identity, which would set every line of the
    // file aside as another database's, is itself found
    std::fs::write(&path, &text).unwrap();
    production
        .client
        .batch_execute("UPDATE rekey.identity SET database_id = 'elsewhere'")
        .await
        .unwrap();
    let out = rekey(
        &[
            "report",
            "--job",
            job,
            "--check",
            "--database-url",
            &production.url,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(7), "{}", printed(&out));
    assert!(
        printed(&out).contains("rekey.identity was changed or removed"),
        "{}",
        printed(&out)
    );
}

/// `rekey rotate` of job `job` with `extra`, spawned quietly.
fn spawn_rotate(job: &str, extra: &[&str]) -> std::process::Child {
    let args = [
        &["rotate", "--job", job, "--no-wait", "--batch-size", "200"][..],
        extra,
    ]
    .concat();
    spawn_rekey(&args, &keyring_pass_env())
}

/// `rekey report` of job `job` into `out`: the JSON document and the page.
fn report(job: &str, out: &std::path::Path) -> (serde_json::Value, String) {
    let said = rekey(
        &[
            "report",
            "--job",
            job,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert_eq!(said.status.code(), Some(0), "{}", printed(&said));
    let files = json(&said)["files"].clone();
    let read = |i: usize| std::fs::read_to_string(files[i].as_str().unwrap()).unwrap();
    (serde_json::from_str(&read(0)).unwrap(), read(1))
}

/// The first event of `events` of type `t`.
fn event<'a>(events: &'a [serde_json::Value], t: &str) -> &'a serde_json::Value {
    events
        .iter()
        .find(|e| e["event_type"] == t)
        .unwrap_or_else(|| panic!("no {t} event in {events:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotate_stopped_during_its_reencryption_records_how_many_values_it_rewrote() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let mut child = spawn_rotate(&job, &[]);
    wait_for_progress(&db, &mut child, values_in(20_000) / 3).await;
    let out = rekey(&["stop", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let status = child.wait().unwrap();
    let rewritten = values_on(&db, 2).await;
    assert!(
        rewritten > 0 && values_on(&db, 1).await > 0,
        "stopped too late or too early ({status})"
    );

    let events = audit_lines(&dir);
    let stopped = event(&events, "reencryption_stopped");
    assert_eq!(stopped["affected_records"], rewritten, "{stopped}");
    assert_eq!(stopped["verification_status"], "pending", "{stopped}");
    assert!(stopped["job_id"].is_i64(), "{stopped}");
    // the next rotate resumes the same job and counts only what it adds
    let out = rekey(
        &["rotate", "--job", &job, "--no-wait", "--json"],
        &keyring_pass_env(),
    );
    assert!(
        matches!(out.status.code(), Some(0 | 6)),
        "{}",
        printed(&out)
    );
    let events = audit_lines(&dir);
    let completed = event(&events, "reencryption_completed");
    assert_eq!(completed["job_id"], stopped["job_id"], "{completed}");
    assert_eq!(values_on(&db, 1).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_of_an_aborted_rotation_shows_the_killed_reencryption_it_turned_back() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    // killed half-way: no event of its own can say what it did
    let mut child = spawn_rotate(&job, &[]);
    wait_for_progress(&db, &mut child, values_in(20_000) / 3).await;
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for_rekeys_sessions_to_end(&db).await;
    let forward = values_on(&db, 2).await;
    assert!(
        forward > 0 && values_on(&db, 1).await > 0,
        "killed too late"
    );
    let doc = report(&job, &dir.path().join("mid-rotation")).0;
    let running = &doc["reencryption_jobs"][0];
    assert_eq!(running["state"], "running", "{doc:#}");
    assert_eq!(running["totals"]["values_rewritten"], forward, "{running}");

    let out = rekey(
        &["rotate", "--job", &job, "--abort", "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(values_on(&db, 2).await, 0);

    let (doc, page) = report(&job, &dir.path().join("evidence"));
    let jobs = doc["reencryption_jobs"].as_array().unwrap();
    let given_up = jobs
        .iter()
        .find(|j| j["state"] == "abandoned")
        .unwrap_or_else(|| panic!("the killed forward job is missing: {doc:#}"));
    assert_eq!(
        given_up["totals"]["values_rewritten"], forward,
        "{given_up}"
    );
    let reverted = jobs.iter().find(|j| j["state"] == "done").unwrap();
    assert_eq!(
        reverted["totals"]["values_rewritten"], forward,
        "{reverted}"
    );
    let events = doc["events"].as_array().unwrap();
    let abandoned = event(events, "reencryption_abandoned");
    assert_eq!(abandoned["affected_records"], forward, "{abandoned}");
    assert_eq!(abandoned["job_id"], given_up["job_id"], "{abandoned}");
    // the abort's last event belongs to the rotation it ended
    assert_eq!(
        event(events, "rotation_aborted")["rotation_id"],
        doc["rotation_id"]
    );
    assert!(page.contains("| abandoned |"), "{page}");
}

// Before: only key_staged carried them; the events of the later steps,
// the retire of a compromised key's material included, said `scheduled`
// with no incident.
#[tokio::test(flavor = "multi_thread")]
async fn the_later_steps_of_a_rotation_carry_the_reason_incident_and_notes_it_started_with() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--reason",
            "compromise",
            "--incident",
            "INC-9",
            "--notes",
            "laptop stolen",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    rotate_to_the_end(&job, &[]);

    let events = audit_lines(&dir);
    let retired = event(&events, "key_retired");
    assert!(
        retired["detail"].as_str().unwrap().contains("destroyed"),
        "{retired}"
    );
    for e in &events {
        assert_eq!(
            (
                e["reason"].as_str(),
                e["incident_id"].as_str(),
                e["notes"].as_str()
            ),
            (Some("compromise"), Some("INC-9"), Some("laptop stolen")),
            "{e}"
        );
    }
}

// Before: the switch stored `compromise` alone, so the later steps' events
// said `compromise` with the rotation's first incident (none).
#[tokio::test(flavor = "multi_thread")]
async fn a_switch_to_compromise_mode_keeps_the_reason_and_incident_it_was_given() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let out = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--reason",
            "suspected_key_compromise",
            "--incident",
            "INC-7",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    rotate_to_the_end(&job, &[]);
    let events = audit_lines(&dir);
    let retired = event(&events, "key_retired");
    assert_eq!(
        (retired["reason"].as_str(), retired["incident_id"].as_str()),
        (Some("suspected_key_compromise"), Some("INC-7")),
        "{retired}"
    );
}

// Before: an abort that gave up the forward job and then failed (another
// process held the job) recorded `reencryption_abandoned`, and the abort
// run again recorded it a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_given_up_is_recorded_once_though_the_abort_that_gave_it_up_failed_after() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let mut child = spawn_rotate(&job, &[]);
    wait_for_progress(&db, &mut child, values_in(20_000) / 3).await;
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for_rekeys_sessions_to_end(&db).await;

    // another process joined to the job: the abort cannot give it up
    let holder = connect(&db.url).await;
    holder
        .execute(
            "SELECT pg_advisory_lock_shared(hashtextextended('rekey.job:patients', 0))",
            &[],
        )
        .await
        .unwrap();
    let abort = ["rotate", "--job", job.as_str(), "--abort"];
    let out = rekey(&abort, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    drop(holder);
    let out = rekey(&abort, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let given_up = audit_lines(&dir)
        .iter()
        .filter(|e| e["event_type"] == "reencryption_abandoned")
        .count();
    assert_eq!(given_up, 1);
}

// Before: the abort recorded `rotation_aborted`, then failed to close the
// rotation; run again, it recorded a second one.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_that_failed_after_recording_its_end_records_it_once_when_run_again() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    // the rotation cannot be closed: the abort fails after its event
    db.client
        .batch_execute(
            "CREATE FUNCTION refuse_close() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'closing refused by the test'; END $$;
             CREATE TRIGGER refuse_close BEFORE UPDATE ON rekey.rotations FOR EACH ROW
               WHEN (NEW.step = 'rolled_back') EXECUTE FUNCTION refuse_close();",
        )
        .await
        .unwrap();
    let abort = ["rotate", "--job", job.as_str(), "--abort"];
    let out = rekey(&abort, &keyring_pass_env());
    assert_ne!(out.status.code(), Some(0), "{}", printed(&out));
    let aborted = || {
        audit_lines(&dir)
            .iter()
            .filter(|e| e["event_type"] == "rotation_aborted")
            .count()
    };
    assert_eq!(
        aborted(),
        1,
        "the event is written before the close: {}",
        printed(&out)
    );
    db.client
        .batch_execute("DROP TRIGGER refuse_close ON rekey.rotations")
        .await
        .unwrap();
    let out = rekey(&abort, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(aborted(), 1, "{}", printed(&out));
}

/// The `rekey.audit` events of chain `patients` (type, seq), in chain order.
async fn table_trail(db: &TestDb) -> Vec<(String, i64)> {
    db.client
        .query(
            "SELECT event_type, seq FROM rekey.audit WHERE chain = 'patients' AND seq IS NOT NULL ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

// Before: rekey killed after an event's JSON line was written and synced but
// before its transaction committed left the line in the file and not in
// rekey.audit; the next event took the same place in the chain, and from
// then on every `rekey report` exited 7, "one of them was replaced, or this
// file also serves a copy of this database", a tampering alarm for a crash;
// and the key_promoted event of a promotion that had committed was never in
// rekey.audit. A deferred trigger that refuses the commit puts the trail in
// that state without timing: the line is written, the row never commits.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_commit_never_came_is_recorded_by_the_next_command_and_the_chain_checks() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let rotate = ["rotate", "--job", job.as_str(), "--grace", "0s", "--json"];
    let out = rekey(&rotate, &keyring_pass_env());
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    db.client
        .batch_execute(
            "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$;
             CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON rekey.audit
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
               WHEN (NEW.event_type = 'key_promoted') EXECUTE FUNCTION refuse_commit();",
        )
        .await
        .unwrap();
    let mut crashed = None;
    for _ in 0..8 {
        let out = rekey(&rotate, &keyring_pass_env());
        match out.status.code() {
            Some(0 | 6) => continue,
            _ => {
                crashed = Some(printed(&out));
                break;
            }
        }
    }
    let said = crashed.expect("the promotion's event was refused");
    assert!(said.contains("commit refused by the test"), "{said}");
    // the promotion committed; its event is in the file only
    let step: String = db
        .client
        .query_one("SELECT step FROM rekey.rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(step, "promoted");
    let promoted_in_file = || {
        audit_events(&dir)
            .iter()
            .filter(|e| e["event_type"] == "key_promoted")
            .count()
    };
    assert_eq!(promoted_in_file(), 1);
    assert!(!table_trail(&db)
        .await
        .iter()
        .any(|(t, _)| t == "key_promoted"));
    // until the next command, the check says what a crash leaves
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted")
            && said.contains("rekey stopped between writing this line and committing"),
        "{said}"
    );

    // killed again, while the next command records the pending event (before
    // its own intent commits: it writes no line)
    let run = ["run", "--job", job.as_str()];
    let out = rekey(&run, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted") && said.contains("rekey stopped"),
        "{said}"
    );
    db.client
        .batch_execute("DROP TRIGGER refuse_commit ON rekey.audit")
        .await
        .unwrap();

    rotate_to_the_end(&job, &[]);
    let (code, said) = check(&job);
    assert_eq!(code, Some(0), "{said}");
    // the file alone vouches for the events taken from it: every check says so
    assert!(
        said.contains("recorded in rekey.audit from their lines in the file")
            && said.contains("(key_promoted)"),
        "the check does not name the events taken from the file: {said}"
    );
    let trail = table_trail(&db).await;
    let types: Vec<&str> = trail.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "key_promoted").count(),
        1,
        "{types:?}"
    );
    // the run that failed recording the pending event wrote no line of its own
    let promoted = types.iter().position(|t| *t == "key_promoted").unwrap();
    assert_eq!(types[promoted + 1], "key_retired", "{types:?}");
    assert_eq!(promoted_in_file(), 1);
    for (i, (_, seq)) in trail.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1, "{trail:?}");
    }
    let file: Vec<(String, i64)> = audit_events(&dir)
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_string(),
                e["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(file, trail);
    let (doc, _) = report(&job, &dir.path().join("evidence"));
    assert!(
        doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "key_promoted"),
        "{doc}"
    );

    // still tampering: the adopted event edited in the table
    db.client
        .batch_execute(
            "UPDATE rekey.audit SET operator = 'mallory' WHERE event_type = 'key_promoted'",
        )
        .await
        .unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_promoted") && said.contains("edited"),
        "{said}"
    );
}

// A line cut short (the process killed inside the write, or the machine
// lost power before the sync) never committed: the next line starts on a
// line of its own, and the fragment is not taken for an edited event.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_cut_short_by_a_crash_leaves_a_trail_that_checks() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    let trail = dir.path().join("patients.audit.jsonl");
    let mut text = std::fs::read_to_string(&trail).unwrap();
    let whole = text.lines().last().unwrap().to_string();
    text.push_str(&whole[..whole.len() / 2]);
    std::fs::write(&trail, &text).unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(0), "{said}");
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let (code, said) = check(&job);
    assert_eq!(code, Some(0), "{said}");
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("\"run_completed\"")),
        "{text}"
    );
    // a whole line cut to a fragment is still a deleted event
    let lines: Vec<&str> = text.lines().collect();
    let mut cut: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    cut[0] = lines[0][..lines[0].len() / 2].to_string();
    std::fs::write(&trail, cut.join("\n") + "\n").unwrap();
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(
        said.contains("key_staged") && said.contains("deleted"),
        "{said}"
    );
}

/// Audit settings of chain `patients` writing to `path`, for tests that
/// record events through the library.
fn audit_at(path: std::path::PathBuf) -> rekey::lifecycle::audit::Audit {
    rekey::lifecycle::audit::Audit {
        path,
        operator: "alice".into(),
        reason: Some("scheduled".into()),
        chain: "patients".into(),
        incident_id: None,
        operator_notes: None,
        keys: None,
    }
}

/// An event of type `event_type` about key `secret_id`.
fn what<'a>(event_type: &'a str, secret_id: &'a str) -> rekey::lifecycle::audit::What<'a> {
    rekey::lifecycle::audit::What {
        event_type,
        secret_id,
        verification_status: "not_applicable",
        affected_records: None,
        notes: "",
        job_id: None,
    }
}

/// The intents of chain `patients` not yet settled: (seq, written_to).
async fn intents_left(db: &TestDb) -> Vec<(i64, String)> {
    db.client
        .query(
            "SELECT seq, written_to FROM rekey.audit_intents WHERE chain = 'patients' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Makes the commit of every `rekey.audit` row of type `event_type` fail:
/// the line is written, the row never commits, as when rekey is killed
/// between the two.
async fn refuse_commits_of(db: &TestDb, event_type: &str) {
    db.client
        .batch_execute(&format!(
            "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$;
             CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON rekey.audit
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
               WHEN (NEW.event_type = '{event_type}') EXECUTE FUNCTION refuse_commit();"
        ))
        .await
        .unwrap();
}

// Before: anyone who could append to the JSON file could append a line
// chained to the table's last event (the hash is plain SHA-256 of fields
// anyone can read), and the next rekey command recorded it in rekey.audit
// as an event rekey had written, stopped before its commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_appended_to_the_file_chained_to_the_last_event_is_never_recorded() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    let trail = dir.path().join("patients.audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let head: rekey::lifecycle::audit::Event =
        serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let mut body = head.body.clone();
    body.event_type = "key_retired".into();
    body.detail = "key 1 retired; a full verify found no value under it".into();
    body.seq += 1;
    body.prev_hash = head.hash.clone();
    let forged = body.sealed();
    std::fs::write(&trail, format!("{text}{}\n", forged.line().unwrap())).unwrap();

    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let trail_now = table_trail(&db).await;
    assert!(
        !trail_now.iter().any(|(t, _)| t == "key_retired"),
        "the line appended by hand was recorded as rekey's: {trail_now:?}"
    );
    assert_eq!(
        trail_now.last().map(|(t, _)| t.as_str()),
        Some("run_completed")
    );
    let (code, said) = check(&job);
    assert_eq!(code, Some(7), "{said}");
    assert!(said.contains("(key_retired)"), "{said}");
}

// Before: a line whose write failed part way stayed in the file though the
// command reported the failure; one whose sync failed after a whole write
// was recorded by the next command as if it had succeeded. A file size
// limit makes the write fail part way, without timing.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_whose_write_failed_is_cut_back_and_never_recorded() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    let trail = dir.path().join("patients.audit.jsonl");
    let before = std::fs::read(&trail).unwrap();
    let events_before = table_trail(&db).await;
    // SIGXFSZ ignored: the write returns an error instead of killing rekey
    let mut limited = std::process::Command::new("sh");
    limited
        .args(["-c", "trap '' XFSZ; exec prlimit --fsize=\"$0\" -- \"$@\""])
        .arg((before.len() + 40).to_string())
        .arg(env!("CARGO_BIN_EXE_rekey"))
        .args(["run", "--job", &job])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(keyring_pass_env())
        .stdin(std::process::Stdio::null());
    let out = limited.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("writing the audit log"),
        "{}",
        printed(&out)
    );
    assert!(
        std::fs::read(&trail).unwrap() == before,
        "the part of the line written stayed in the file"
    );
    assert_eq!(table_trail(&db).await, events_before);
    assert_eq!(intents_left(&db).await, []);

    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["report", "--job", &job, "--check", "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["check"]["file_cut_short"],
        0,
        "{}",
        printed(&out)
    );
    assert_eq!(json(&out)["check"]["adopted"], serde_json::json!([]));
}

// Before: each event read the whole audit log first, for lines a stopped
// rekey had left: a pipe given as --audit-log made the command wait
// forever for a writer. An intent naming the pipe (a rekey killed there
// after committing it) makes the next command look.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipe_as_the_audit_log_takes_the_events_and_is_never_read() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let pipe = dir.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(made.success());
    let mut setup = connect(&db.url).await;
    rekey::state::ensure_schema(&mut setup).await.unwrap();
    db.client
        .execute(
            "INSERT INTO rekey.audit_intents (chain, seq, hash, written_to) VALUES ('patients', 1, repeat('a', 64), $1)",
            &[&audit_at(pipe.clone()).written_to()],
        )
        .await
        .unwrap();
    let mut child = rekey_cmd(
        &["run", "--job", &job, "--audit-log", pipe.to_str().unwrap()],
        &seed_env(),
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("rekey still waits on the pipe after two minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(
        table_trail(&db).await,
        [
            ("run_started".to_string(), 1),
            ("run_completed".to_string(), 2)
        ]
    );
    assert_eq!(intents_left(&db).await, []);
}

// Before: `run --restart` with an audit log it could not write gave up the
// unfinished job, then failed to record that it had: the job was lost with
// no event saying so.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_whose_audit_log_cannot_be_written_gives_up_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let window = [
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "5000",
        "--run-time",
        "500ms",
    ];
    let out = rekey(&window, &seed_env());
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let first = json(&out);
    let nowhere = dir.path().join("missing").join("audit.jsonl");
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--restart",
            "--audit-log",
            nowhere.to_str().unwrap(),
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("cannot be opened for append")
            && printed(&out).contains("--audit-log"),
        "{}",
        printed(&out)
    );
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["job_id"],
        first["job_id"],
        "the unfinished job was given up: {}",
        printed(&out)
    );
    let types: Vec<String> = audit_lines(&dir)
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "run_started",
            "run_window_ended",
            "run_started",
            "run_completed"
        ]
    );
}

// An event whose commit never came is recorded from the file its intent
// names, whichever file the next event goes to; an intent with no line is
// an event that never happened; another host's is left for a command there.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_left_in_one_file_is_recorded_by_the_next_event_written_to_another() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(&db.url).await;
    rekey::state::ensure_schema(&mut client).await.unwrap();
    let a = audit_at(dir.path().join("a.jsonl"));
    let b = audit_at(dir.path().join("b.jsonl"));
    a.record(&client, what("first", "file:k#1")).await.unwrap();
    refuse_commits_of(&db, "left_in_a").await;
    let err = a
        .record(&client, what("left_in_a", "file:k#1"))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("commit refused by the test"),
        "{err:?}"
    );
    db.client
        .batch_execute("DROP TRIGGER refuse_commit ON rekey.audit")
        .await
        .unwrap();
    // the lock was given back: another session records at once
    let held: bool = db
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                             WHERE locktype = 'advisory' AND granted
                               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                               AND ((classid::bigint << 32) | objid::bigint) = hashtextextended('rekey.audit:patients', 0))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!held, "the chain's lock is still held after the failure");
    db.client
        .execute(
            "INSERT INTO rekey.audit_intents (chain, seq, hash, written_to)
             VALUES ('patients', 2, repeat('b', 64), $1), ('patients', 2, repeat('c', 64), 'elsewhere:/var/log/a.jsonl')",
            &[&b.written_to()],
        )
        .await
        .unwrap();
    b.record(&client, what("second", "file:k#1")).await.unwrap();
    assert_eq!(
        table_trail(&db).await,
        [
            ("first".to_string(), 1),
            ("left_in_a".to_string(), 2),
            ("second".to_string(), 3)
        ]
    );
    let adopted: Vec<String> = db
        .client
        .query(
            "SELECT event_type FROM rekey.audit WHERE adopted_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(adopted, ["left_in_a"]);
    assert_eq!(
        intents_left(&db).await,
        [(2, "elsewhere:/var/log/a.jsonl".to_string())]
    );
}

// Before: an environment key's id given again after an abort matched the
// key_retired event of the earlier key with that id, and the later key's
// retire was never recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_id_given_again_is_not_taken_for_the_key_retired_before_under_it() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut client = connect(&db.url).await;
    rekey::state::ensure_schema(&mut client).await.unwrap();
    let audit = audit_at(dir.path().join("patients.audit.jsonl"));
    let open = |old: i64, new: i64| {
        format!(
            "INSERT INTO rekey.rotations (job_name, step, reason, operator, secret_id, old_key, new_key, grace_s)
             VALUES ('patients', 'staged', 'scheduled', 'alice', 'env:ENCRYPTION', {old}, {new}, 0)"
        )
    };
    // rotation 1 stages key 2, and its abort retires it
    client.batch_execute(&open(1, 2)).await.unwrap();
    let key = "env:ENCRYPTION#2";
    audit
        .record(&client, what("key_staged", key))
        .await
        .unwrap();
    audit
        .record(&client, what("key_retired", key))
        .await
        .unwrap();
    // the same retire run again is the same event
    assert!(audit
        .has_key_event(&client, "key_retired", key)
        .await
        .unwrap());
    client
        .batch_execute(
            "UPDATE rekey.rotations SET step = 'rolled_back', finished_at = now() WHERE rotation_id = 1",
        )
        .await
        .unwrap();
    // ... once the rotation is over too
    assert!(audit
        .has_key_event(&client, "key_retired", key)
        .await
        .unwrap());
    // rotation 2 gives the id 2 to a new key, and later retires it
    client.batch_execute(&open(1, 2)).await.unwrap();
    audit
        .record(&client, what("key_staged", key))
        .await
        .unwrap();
    assert!(!audit
        .has_key_event(&client, "key_retired", key)
        .await
        .unwrap());
}
