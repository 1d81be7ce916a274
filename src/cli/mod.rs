//! The command line: [`args`] parses and validates what the user typed (no
//! I/O); one module per command resolves the job, drives the layers below,
//! prints the result (text, or one JSON object with `--json`) through
//! [`out`], which never panics, and picks the exit code ([`exit`]). Nothing
//! below imports from here.

pub mod args;
mod args_audit;
mod args_rotate;
mod args_values;
pub mod bench;
pub mod exit;
pub mod keygen;
pub mod out;
pub mod plan;
pub mod report;
pub mod rewrap;
pub mod rotate;
pub mod run;
mod run_audit;
pub mod secrets;
pub mod status;
pub mod verify;

use tokio_postgres::Client;

use crate::cli::out::out;
use crate::db::Database;
use crate::job::JobSpec;
use crate::state::Control;
use crate::Error;

use args::{Command, JobArgs};

/// Runs one subcommand and returns its exit code.
pub async fn dispatch(command: Command) -> Result<u8, Error> {
    match command {
        Command::Run(a) => run::run(&a).await,
        Command::Verify(a) => verify::verify(&a).await,
        Command::Status(a) => status::status(&a).await,
        Command::Pause(a) => status::control(&a, Control::Pause).await,
        Command::Resume(a) => status::control(&a, Control::Run).await,
        Command::Stop(a) => status::control(&a, Control::Stop).await,
        Command::Plan(a) => plan::plan(&a).await,
        Command::Keygen(a) => keygen::keygen(&a),
        Command::Bench(a) => bench::bench(&a).await,
        Command::Secrets(a) => secrets::secrets(a.command).await,
        Command::Rotate(a) => rotate::rotate(&a).await,
        Command::Report(a) => report::report(&a).await,
    }
}

/// The job file, the database it names, and a first connection.
pub(crate) struct Opened {
    /// The job file.
    pub spec: JobSpec,
    /// Where the database is.
    pub db: Database,
    /// A first connection.
    pub client: Client,
}

/// Reads the job file and connects to the database: `--database-url`, else
/// `DATABASE_URL`, else the job file's `[database] url`, else libpq's `PG*`
/// variables alone.
pub(crate) async fn open(args: &JobArgs) -> Result<Opened, Error> {
    let (spec, url) = resolve(args)?;
    let db = Database::parse(&url).map_err(|e| Error::Config(e.to_string()))?;
    let client = db.connect().await?;
    refuse_a_shared_default_name(&client, &spec).await?;
    // the operator of last resort in audit events
    let keys = spec
        .keys
        .as_ref()
        .or_else(|| spec.targets.first().and_then(|t| t.keys.as_ref()));
    crate::lifecycle::audit::note_fallback_operator(&client, keys).await?;
    Ok(Opened { spec, db, client })
}

/// Reads the job file and resolves its database (as [`open`], without
/// connecting); the job's key sources learn it too, for a key table.
pub(crate) fn resolve(args: &JobArgs) -> Result<(JobSpec, String), Error> {
    let mut spec = JobSpec::load(&args.job)?;
    let from_env = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    if let (None, Some(env), Some(file)) = (&args.database_url, &from_env, &spec.database.url) {
        warn_of_an_overridden_database(env, file);
    }
    let url = args
        .database_url
        .clone()
        .or(from_env)
        .or_else(|| spec.database.url.clone())
        .or_else(libpq_variables_only)
        .ok_or_else(|| Error::Config("no database given: pass --database-url, set DATABASE_URL or libpq's PGHOST/PGDATABASE/PGSERVICE, or add [database] url to the job file".into()))?;
    let targets = spec
        .targets
        .iter_mut()
        .flat_map(|t| t.keys.iter_mut().chain(t.to_keys.iter_mut()));
    for keys in spec.keys.iter_mut().chain(targets) {
        keys.database_url = Some(url.clone());
    }
    Ok((spec, url))
}

/// Says where `DATABASE_URL` (`env`) sends the command elsewhere than the
/// job file's `[database] url` (`file`): set for another job in the same
/// shell, it would otherwise rotate another database without a word.
fn warn_of_an_overridden_database(env: &str, file: &str) {
    let (Ok(env), Ok(file)) = (Database::parse(env), Database::parse(file)) else {
        return;
    };
    let (env, file) = (env.describe(), file.describe());
    if env != file {
        tracing::warn!(
            "DATABASE_URL ({env}) overrides the job file's [database] url ({file}): this command works on {env}; \
             unset DATABASE_URL (or pass --database-url) for another"
        );
    }
}

/// Refuses a job file whose name comes from its file name (`job.toml`: job
/// "job") when the job of that name on this database was started from
/// another file with other targets or keys: `status`, `stop`, `--restart`
/// and `rotate` would otherwise act on the other file's job.
async fn refuse_a_shared_default_name(client: &Client, spec: &JobSpec) -> Result<(), Error> {
    let (Some(name), Some(file), true) = (&spec.name, &spec.file, spec.name_from_file) else {
        return Ok(());
    };
    if !crate::state::schema_exists(client).await? {
        return Ok(());
    }
    let Some((Some(other), hash)) = crate::state::jobs::latest_job_origin(client, name).await?
    else {
        return Ok(());
    };
    if other == file.display().to_string() || hash == spec.spec_hash() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "job {name:?} takes its name from the file name of {}, and the job of that name on this database was started from \
         another job file ({other}) with other targets or keys: give this file its own name (name = \"...\" at its top) \
         so the two jobs stay apart",
        file.display()
    )))
}

/// An empty connection string when libpq's variables name a server or a
/// service (libpq then reads them as psql does), else None.
fn libpq_variables_only() -> Option<String> {
    [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGSERVICE",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|x| !x.is_empty()))
    .then(String::new)
}

/// Lanes when `--workers` is not given: the CPU count, at least 2.
pub fn default_lanes() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// Prints one JSON object on stdout (`--json`).
pub(crate) fn print_json(value: &serde_json::Value) {
    JSON_SAID.store(true, std::sync::atomic::Ordering::SeqCst);
    out!("{value}");
}

/// Whether the command's JSON object was printed (or is being): a second
/// signal then exits without a second one.
static JSON_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a command says as a second signal exits it at once: with `--json`,
/// the one object stdout promises (a failure's shape), else nothing more
/// than the log line.
pub(crate) fn said_at_once(json: bool) -> crate::control::signals::AtOnce {
    Box::new(move || {
        if json && !JSON_SAID.swap(true, std::sync::atomic::Ordering::SeqCst) {
            out!(
                "{}",
                serde_json::json!({
                "error": "stopped at once by a second signal",
                "kind": "stopped",
                "exit_code": exit::EXIT_STOPPED,
                    "hint": "every committed batch and step is kept: run the same command again to resume",
                })
            );
        }
    })
}
