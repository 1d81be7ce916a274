//! The pipeline's steps driven by hand, for tests that must act between a
//! batch's read and its write: open a job as `rekey run` does, then read and
//! re-encrypt its first page into a batch for the sink.

use std::path::Path;

use rekey::db::Database;
use rekey::engine::sink::Batch;
use rekey::engine::source::Source;
use rekey::engine::transform;
use rekey::job::{Job, JobSpec, Target};
use rekey::state::{self, JobRecord};

use crate::harness::TestDb;

/// A job opened by hand, one lane's worth of ranges planned.
pub struct Opened {
    /// The resolved job.
    pub job: Job,
    /// Where its connections go.
    pub database: Database,
    /// Its row in `rekey.jobs`, with its ranges.
    pub record: JobRecord,
}

/// Opens the job in `job_file` on `db` with the keys in `env` (set in this
/// process's environment, as a run would read them).
pub async fn open_job(db: &TestDb, job_file: &Path, env: &[(&str, String)]) -> Opened {
    let spec = JobSpec::load(job_file).unwrap();
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let job = Job::resolve(&spec, &db.client).await.unwrap();
    let database = Database::parse(&db.url).unwrap();
    let mut admin = database.connect().await.unwrap();
    state::ensure_schema(&mut admin).await.unwrap();
    let record = state::open_job(
        &mut admin,
        &job,
        false,
        async |c: &tokio_postgres::Client| rekey::engine::plan::job_ranges(c, &job, 1).await,
    )
    .await
    .unwrap();
    Opened {
        job,
        database,
        record,
    }
}

/// Reads the first page (up to 100 rows) of `target` and re-encrypts it, as
/// the pipeline does: the batch the sink would write, the last of its range.
pub async fn first_batch(database: &Database, target: &Target) -> Batch {
    let mut source = Source::new(database.connect().await.unwrap(), true);
    let rows = source.page(target, None, None, 100).await.unwrap();
    let mut cells = transform::Cells::default();
    transform::rewrite(target, &rows, &mut cells);
    let last_key = rows.last().map(|r| target.row_key(r));
    Batch {
        range_index: 0,
        rows,
        cells,
        last_key,
        end: true,
        lease: None,
        upper: None,
        slot: None,
    }
}
