//! With `--json`, a failure is one JSON object on stdout (`error`, `kind`,
//! `exit_code`, `hint`) as well as the human line on stderr, for every
//! command, so scripts never scrape stderr.

use crate::harness::*;

/// The error object a failed `--json` command printed; its exit code agrees with the process's.
fn error_object(out: &std::process::Output) -> serde_json::Value {
    let v = json(out);
    assert_eq!(
        v["exit_code"].as_i64().map(|c| c as i32),
        out.status.code(),
        "{}",
        printed(out)
    );
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty())
            && v["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{v}"
    );
    assert!(
        stderr(out).starts_with("rekey") || stderr(out).starts_with("error"),
        "{}",
        printed(out)
    );
    v
}

#[test]
fn a_bad_job_file_is_a_config_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(&job, "[[target]]\ntable = 1\n").unwrap();
    let j = job.display().to_string();
    for args in [
        vec!["run", "--job", j.as_str(), "--json"],
        vec!["verify", "--job", j.as_str(), "--json"],
        vec!["status", "--job", j.as_str(), "--json"],
        vec!["rotate", "--job", j.as_str(), "--json"],
        vec!["secrets", "show", "--job", j.as_str(), "--json"],
    ] {
        let out = rekey(&args, &[]);
        let v = error_object(&out);
        assert_eq!(
            (out.status.code(), v["kind"].as_str()),
            (Some(2), Some("config")),
            "{args:?}: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_url_and_an_unreachable_server_are_error_objects() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();

    let out = rekey(
        &[
            "plan",
            "--job",
            &job,
            "--json",
            "--database-url",
            "postgres://h:notaport/db",
        ],
        &seed_env(),
    );
    let v = error_object(&out);
    assert_eq!(
        (out.status.code(), v["kind"].as_str()),
        (Some(2), Some("config")),
        "{v}"
    );

    // a port nothing listens on: refused at once
    let port = free_port();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=x");
    let out = rekey(
        &["plan", "--job", &job, "--json", "--database-url", &url],
        &seed_env(),
    );
    let v = error_object(&out);
    assert_eq!(
        (out.status.code(), v["kind"].as_str()),
        (Some(1), Some("connect")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "{v}"
    );
}

#[test]
fn a_command_line_clap_refuses_is_a_usage_error_object() {
    let out = rekey(&["run", "--job", "j.toml", "--json", "--no-such-flag"], &[]);
    let v = error_object(&out);
    assert_eq!(
        (out.status.code(), v["kind"].as_str()),
        (Some(2), Some("usage")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("--no-such-flag"),
        "{v}"
    );
}

// Before: `{"error":"invalid value 'eve"}`, cut at the value's newline.
#[test]
fn a_usage_error_object_keeps_the_whole_message_of_a_value_with_a_newline() {
    let out = rekey(
        &[
            "run",
            "--job",
            "j.toml",
            "--json",
            "--operator",
            "eve\nmallory",
        ],
        &[],
    );
    let v = error_object(&out);
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("eve\nmallory") && error.contains("--operator"),
        "{v}"
    );
    assert!(!error.contains("Usage:"), "{v}");
}

#[test]
fn without_json_stdout_stays_empty_on_failure() {
    let out = rekey(&["run", "--job", "/nonexistent/job.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(out.stdout.is_empty(), "{}", printed(&out));
}

#[test]
fn secrets_show_refuses_the_flags_it_would_not_use() {
    for flag in ["--reveal", "--operator=x", "--reason=scheduled"] {
        let out = rekey(&["secrets", "show", "--job", "j.toml", flag], &[]);
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", printed(&out));
        assert!(
            stderr(&out).contains("unexpected argument"),
            "{flag}: {}",
            printed(&out)
        );
    }
}

// Before: "preparing writes to public.patient_persons: ... DO ALSO rules are
// not supported for data-modifying statements in WITH", exit 1, with a hint
// to leave rows out with `where` (no `where` helps).
#[tokio::test(flavor = "multi_thread")]
async fn an_update_rule_is_a_config_error_naming_it_and_a_disabled_one_is_not() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute(
            "CREATE RULE noted AS ON UPDATE TO patient_persons DO ALSO NOTIFY patients_changed;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let v = error_object(&out);
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("noted (DO ALSO)") && error.contains("DISABLE RULE"),
        "{v}"
    );
    db.client
        .batch_execute("ALTER TABLE patient_persons DISABLE RULE noted")
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Today: "the database refused the write itself (a trigger, constraint or
// rule of the table raised the error) ... leave those rows out with the
// target's `where`", for an error raised by a function in that very
// `where` while rekey read: nothing had been written, and the advice
// pointed at the wrong statement.
#[tokio::test(flavor = "multi_thread")]
async fn an_error_raised_while_reading_is_not_hinted_as_a_refused_write() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION still_kept(id bigint) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
               IF id = 150 THEN RAISE EXCEPTION 'patient % was archived', id; END IF;
               RETURN true;
             END $$;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "still_kept(id)")
        .display()
        .to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let v = error_object(&out);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("patient 150 was archived"),
        "{v}"
    );
    let hint = v["hint"].as_str().unwrap();
    assert!(
        !hint.contains("refused the write") && hint.contains("while rekey read"),
        "{v}"
    );
}
