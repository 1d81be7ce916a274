//! A server that accepts connections and never answers: every command gives
//! up within the connect timeout, naming the host and port.

use std::net::TcpListener;

use super::*;

/// A job file for `patient_persons` with no database in it (the URL comes from `--database-url`).
fn patients_job_without_database(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("patients.toml");
    std::fs::write(
        &path,
        "[keys]\nsource = \"env\"\n\n[[target]]\ntable = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    )
    .unwrap();
    path.display().to_string()
}

/// A TCP listener on 127.0.0.1 that accepts every connection and never
/// writes a byte (a stuck pooler, a half-dead host); returns its port. The
/// accepted sockets are kept open for the life of the test process.
fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// How long a command may take against the silent server with a 3 s connect timeout.
const SILENT_BOUND: Duration = Duration::from_secs(15);

/// Runs `run`, `plan` and `verify` at once against a silent server (with
/// `url` and `env`) and asserts that each exits 1 within [`SILENT_BOUND`]
/// with a message naming the host and the port.
fn assert_every_command_gives_up_on_a_silent_server(url: &str, port: u16, env: &[(&str, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let j = patients_job_without_database(&dir);
    let commands: [&[&str]; 3] = [&["run", "--json"], &["plan"], &["verify"]];
    let outcomes: Vec<(String, Bounded)> = std::thread::scope(|s| {
        let running: Vec<_> = commands
            .iter()
            .map(|c| {
                let mut args: Vec<&str> = vec![c[0], "--job", &j, "--database-url", url];
                args.extend_from_slice(&c[1..]);
                let name = c[0].to_string();
                s.spawn(move || (name, rekey_bounded(&args, env, SILENT_BOUND)))
            })
            .collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut wrong = Vec::new();
    for (command, outcome) in &outcomes {
        match outcome {
            Bounded::Killed(said) => wrong.push(format!("`rekey {command}` still ran after {SILENT_BOUND:?} (killed); it had said: {said:?}")),
            Bounded::Exited(out, took) => {
                let said = stderr(out);
                if out.status.code() != Some(1) || !said.contains("127.0.0.1") || !said.contains(&port.to_string()) {
                    wrong.push(format!("`rekey {command}` exited {:?} after {took:?}; expected 1, naming 127.0.0.1 and port {port}; said: {said:?}", out.status.code()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "against a server that never answers:\n{}",
        wrong.join("\n")
    );
}

// Today: `run`, `plan` and `verify` all still running (no output) when
// killed after 15 s: connect_timeout bounds the TCP connect only, not the
// start-up handshake the server never answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_fails_run_plan_and_verify_within_the_connect_timeout_of_the_url(
) {
    let port = silent_server();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=rekey connect_timeout=3");
    tokio::task::block_in_place(|| {
        assert_every_command_gives_up_on_a_silent_server(&url, port, &seed_env())
    });
}

// Today: as above, all three killed after 15 s with no output.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_fails_run_plan_and_verify_within_pgconnect_timeout() {
    let port = silent_server();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=rekey");
    let mut env = seed_env();
    env.push(("PGCONNECT_TIMEOUT", "3".into()));
    tokio::task::block_in_place(|| {
        assert_every_command_gives_up_on_a_silent_server(&url, port, &env)
    });
}
