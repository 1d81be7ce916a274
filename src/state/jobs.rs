//! Jobs in `rekey.jobs`: opened (new, or an unfinished one resumed), their
//! live control, their totals, and finished.

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::{Client, GenericClient};

use crate::error::DbContext;
use crate::job::Job;
use crate::observe::counts::Counts;
use crate::Error;

use super::progress::{counts_from, KeyRange, RangeState, COUNT_COLUMNS, RETRY_RANGE, SUM_COUNTS};

/// A job row opened for running: new, or an unfinished one resumed.
#[derive(Debug)]
pub struct JobRecord {
    /// `rekey.jobs.job_id`.
    pub id: i64,
    /// Whether an unfinished job was picked up.
    pub resumed: bool,
    /// The unfinished job of this name given up for this one (`--restart`).
    pub abandoned: Option<i64>,
    /// Every range, finished or not.
    pub ranges: Vec<RangeState>,
    /// What earlier runs of this job already did; after a rewrite,
    /// what every run of every process has done, this one included.
    pub prior: Counts,
}

/// Opens the job: resumes the unfinished job of this name when its spec and
/// keys match, refuses when they do not, else starts a new one over the
/// ranges `plan` splits its tables into.
pub async fn open_job(
    client: &mut Client,
    job: &Job,
    restart: bool,
    plan: impl AsyncFnOnce(&Client) -> Result<Vec<RangeState>, Error>,
) -> Result<JobRecord, Error> {
    // Processes starting together must agree on one job row: the first plans
    // it, the others resume it.
    let lock = format!("rekey.open:{}", job.name);
    super::locks::wait_for(client, &lock)
        .await
        .ctx(|| format!("opening job {:?}", job.name))?;
    let opened = open_job_locked(client, job, restart, plan).await;
    let unlocked = super::locks::release(client, &lock)
        .await
        .ctx(|| format!("opening job {:?}", job.name));
    let opened = opened?;
    unlocked?;
    Ok(opened)
}

/// The job file and spec hash of the latest job named `name`, if any.
pub async fn latest_job_origin(
    client: &Client,
    name: &str,
) -> Result<Option<(Option<String>, String)>, Error> {
    let row = client
        .query_opt(
            // through jsonb: a schema from before job_file existed reads NULL
            "SELECT to_jsonb(j) ->> 'job_file', spec_hash FROM rekey.jobs j WHERE name = $1 ORDER BY job_id DESC LIMIT 1",
            &[&name],
        )
        .await
        .ctx(|| format!("reading job {name:?}"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The id of an unfinished job of this name and the key set it was started
/// with, if one is unfinished (compare with [`Job::describe_keys`]).
pub async fn unfinished_job_keys(
    client: &Client,
    name: &str,
) -> Result<Option<(i64, serde_json::Value)>, Error> {
    Ok(running_job(client, name)
        .await?
        .map(|(id, _, keys)| (id, keys)))
}

/// Job `name`'s unfinished run, if any: its id, `spec_hash` and key set.
async fn running_job(
    client: &Client,
    name: &str,
) -> Result<Option<(i64, String, serde_json::Value)>, Error> {
    let row = client
        .query_opt(
            "SELECT job_id, spec_hash, keys FROM rekey.jobs WHERE name = $1 AND state = 'running'",
            &[&name],
        )
        .await
        .ctx(|| format!("reading job {name:?}"))?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Gives up job `id`: the next run of its name starts over.
pub async fn abandon(client: &Client, id: i64) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.jobs SET state = 'abandoned', updated_at = now() WHERE job_id = $1 AND state = 'running'",
            &[&id],
        )
        .await
        .ctx(|| format!("giving up job {id}"))?;
    Ok(())
}

/// The refusal to resume job `job`'s unfinished run `id` (recorded with
/// `hash` and `old_keys`) from another job file or with other keys.
fn refuse_to_resume(
    job: &Job,
    id: i64,
    hash: &str,
    old_keys: &serde_json::Value,
) -> Result<(), Error> {
    let keys = job.describe_keys();
    if hash != job.spec_hash {
        return Err(Error::Config(format!(
            "job {:?} (id {id}) is unfinished and was started from a different job file; finish it with the original file, \
             or start over with `rekey run --restart` (values already rotated stay rotated)",
            job.name
        )));
    }
    if *old_keys != keys {
        return Err(Error::Config(format!(
            "job {:?} (id {id}) is unfinished and was started with a different key set (ids or fingerprints differ: \
             was {old_keys}, now {keys}); restore the original keys to finish it, or start over with `rekey run --restart`",
            job.name
        )));
    }
    Ok(())
}

/// Each target's table as job `job_id` began on it, by target: its oid,
/// and whether an UPDATE trigger fired on rekey's writes there (`None`: a
/// job begun before that was recorded). None where the engine schema
/// predates the record (a job begun by an older rekey).
pub async fn began_on(client: &Client, job_id: i64) -> Result<HashMap<usize, Began>, Error> {
    let what = || "reading the tables the job began on".to_string();
    let recorded: bool = client
        .query_one(
            "SELECT to_regclass('rekey.job_targets') IS NOT NULL
                AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('rekey.job_targets')
                               AND attname = 'update_triggers' AND NOT attisdropped)",
            &[],
        )
        .await
        .ctx(what)?
        .get(0);
    if !recorded {
        return Ok(HashMap::new());
    }
    Ok(client
        .query(
            "SELECT target, table_oid, update_triggers FROM rekey.job_targets WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(what)?
        .iter()
        .filter_map(|r| {
            let (target, oid, update_triggers): (i32, u32, Option<bool>) =
                (r.get(0), r.get(1), r.get(2));
            usize::try_from(target).ok().map(|t| {
                (
                    t,
                    Began {
                        oid,
                        update_triggers,
                    },
                )
            })
        })
        .collect())
}

/// A target's table as its job began on it ([`began_on`]).
#[derive(Debug, Clone, Copy)]
pub struct Began {
    /// The table's oid.
    pub oid: u32,
    /// Whether an UPDATE trigger fired on rekey's writes there.
    pub update_triggers: Option<bool>,
}

/// Refuses to resume job `id` where a target's name now reaches another
/// table than the one the job began on (renamed away and another made
/// under the name since, a DBA's swap): the ranges left are the first
/// one's, and the resume would rotate the second's and say done.
async fn refuse_a_replaced_table(client: &Client, job: &Job, id: i64) -> Result<(), Error> {
    let began = began_on(client, id).await?;
    for t in &job.targets {
        let Some(was) = began.get(&t.index).map(|b| b.oid) else {
            continue;
        };
        let Some(moved) = crate::job::visibility::moved_from(client, t, was).await? else {
            continue;
        };
        let went = match moved.now {
            Some(w) => format!("is now {w}"),
            None => "was dropped".to_string(),
        };
        return Err(Error::Config(format!(
            "job {:?} (id {id}) is unfinished, and {} is not the table it began on: that one {went} (renamed or replaced \
             since), and its rows the job had not reached are on their old key. Give the target the name of the table the \
             applications read, or start over on the table the name reaches now with `rekey run --restart`",
            job.name, t.table
        )));
    }
    Ok(())
}

/// What opening job `job` would refuse, read without a lock or a change
/// (for a dry run): its unfinished run started from another job file or
/// with other keys, unless `restart` abandons it.
pub async fn check_resumable(client: &Client, job: &Job, restart: bool) -> Result<(), Error> {
    if restart || !super::schema_exists(client).await? {
        return Ok(());
    }
    match running_job(client, &job.name).await? {
        Some((id, hash, keys)) => {
            refuse_to_resume(job, id, &hash, &keys)?;
            refuse_a_replaced_table(client, job, id).await
        }
        None => Ok(()),
    }
}

async fn open_job_locked(
    client: &mut Client,
    job: &Job,
    restart: bool,
    plan: impl AsyncFnOnce(&Client) -> Result<Vec<RangeState>, Error>,
) -> Result<JobRecord, Error> {
    let keys = job.describe_keys();
    let what = || format!("opening job {:?}", job.name);
    let mut abandoned = None;
    if let Some((id, hash, old_keys)) = running_job(client, &job.name).await? {
        if restart {
            abandon(client, id).await?;
            abandoned = Some(id);
        } else {
            refuse_to_resume(job, id, &hash, &old_keys)?;
            refuse_a_replaced_table(client, job, id).await?;
            // a stop asked of the last run is spent; a pause still holds
            // (unless processes are still stopping: a process started meanwhile must stop too)
            client
                .execute(
                    "UPDATE rekey.jobs SET control = 'run' WHERE job_id = $1 AND control = 'stop'
                        AND NOT EXISTS (SELECT 1 FROM rekey.progress WHERE job_id = $1 AND NOT done AND owner IS NOT NULL AND lease_until > now())",
                    &[&id],
                )
                .await
                .ctx(what)?;
            // partitions attached since the job began are the job's too
            record_parts(client, id, job).await?;
            let (ranges, prior) = load_ranges(client, id, job.targets.len()).await?;
            return Ok(JobRecord {
                id,
                resumed: true,
                abandoned: None,
                ranges,
                prior,
            });
        }
    }

    let planned = plan(client).await?;
    let tx = client.transaction().await.ctx(what)?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO rekey.jobs (name, spec_hash, keys, state, job_file, started_xid)
             VALUES ($1, $2, $3, 'running', $4, txid_snapshot_xmin(txid_current_snapshot())) RETURNING job_id",
            &[&job.name, &job.spec_hash, &keys, &job.file],
        )
        .await
        .ctx(what)?
        .get(0);
    // the columns each target rotates: retire checks none was left out of the job file since,
    for t in &job.targets {
        let columns: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        // and the stores its values were read and written under (none for keys handed in whole)
        let stores: BTreeSet<String> = [&t.read.source, &t.write.source]
            .into_iter()
            .flatten()
            .map(|k| k.store_label())
            .collect();
        let stores = (!stores.is_empty()).then(|| stores.into_iter().collect::<Vec<_>>());
        tx.execute(
            "INSERT INTO rekey.job_targets (job_id, target, table_name, table_oid, columns, attnums, key_stores, update_triggers)
             SELECT $1, $2, $3, c.oid, $5,
                    ARRAY(SELECT a.attnum FROM unnest($5::text[]) WITH ORDINALITY AS u(name, i)
                            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = u.name ORDER BY u.i),
                    $6, $7
               FROM pg_class c WHERE c.oid = $4",
            &[&id, &(t.index as i32), &t.table.to_string(), &t.oid, &columns, &stores, &t.update_triggers],
        )
        .await
        .ctx(what)?;
    }
    // and their partitions and children: one detached since is a table of its own
    record_parts(&tx, id, job).await?;
    let insert = tx
        .prepare("INSERT INTO rekey.progress (job_id, target, range_no, table_name, lower_key, upper_key) VALUES ($1, $2, $3, $4, $5, $6)")
        .await
        .ctx(what)?;
    for r in &planned {
        let table = job.targets[r.target].table.to_string();
        tx.execute(
            &insert,
            &[
                &id,
                &(r.target as i32),
                &r.range_no,
                &table,
                &r.bounds.lower,
                &r.bounds.upper,
            ],
        )
        .await
        .ctx(what)?;
    }
    tx.commit().await.ctx(what)?;
    Ok(JobRecord {
        id,
        resumed: false,
        abandoned,
        ranges: planned,
        prior: Counts::default(),
    })
}

async fn load_ranges(
    client: &Client,
    job_id: i64,
    targets: usize,
) -> Result<(Vec<RangeState>, Counts), Error> {
    let rows = client
        .query(
            &format!("SELECT target, range_no, lower_key, upper_key, last_key, done, {COUNT_COLUMNS} FROM rekey.progress WHERE job_id = $1 ORDER BY target, range_no"),
            &[&job_id],
        )
        .await
        .ctx(|| format!("loading the progress of job {job_id}"))?;
    let mut prior = Counts::default();
    let mut ranges = Vec::new();
    for r in &rows {
        prior += counts_from(r, 6);
        let range_no: i32 = r.get(1);
        if range_no == RETRY_RANGE {
            continue;
        }
        let target = usize::try_from(r.get::<_, i32>(0)).ok().filter(|t| *t < targets).ok_or_else(|| {
            Error::Runtime(format!("rekey.progress of job {job_id} names a target this job does not have; the engine state was edited by hand"))
        })?;
        ranges.push(RangeState {
            target,
            range_no,
            bounds: KeyRange {
                lower: r.get(2),
                upper: r.get(3),
            },
            last: r.get(4),
            done: r.get(5),
        });
    }
    Ok((ranges, prior))
}

/// Where a job stands (`rekey.jobs.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Open: runs join and resume it.
    Running,
    /// Every range finished.
    Done,
    /// Given up by `rekey run --restart`.
    Abandoned,
}

impl JobState {
    /// The word stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Abandoned => "abandoned",
        }
    }

    /// Reads the stored word, refusing what rekey never writes.
    pub fn stored(word: &str) -> Result<JobState, Error> {
        match word {
            "running" => Ok(JobState::Running),
            "done" => Ok(JobState::Done),
            "abandoned" => Ok(JobState::Abandoned),
            other => Err(Error::Runtime(format!("rekey.jobs.state holds {other:?}, which rekey never writes; the engine state was edited by hand"))),
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's live control (`rekey.jobs.control`), also the words of a control file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// Go on.
    Run,
    /// Read nothing until told to run.
    Pause,
    /// Stop cleanly, checkpointed.
    Stop,
}

impl Control {
    /// The word stored and written: run, pause or stop.
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Run => "run",
            Control::Pause => "pause",
            Control::Stop => "stop",
        }
    }

    /// Reads the word back; `None` for anything else.
    pub fn parse(word: &str) -> Option<Control> {
        match word {
            "run" => Some(Control::Run),
            "pause" => Some(Control::Pause),
            "stop" => Some(Control::Stop),
            _ => None,
        }
    }

    /// Reads the stored word, refusing what rekey never writes.
    pub fn stored(word: &str) -> Result<Control, Error> {
        Control::parse(word).ok_or_else(|| Error::Runtime(format!("rekey.jobs.control holds {word:?}, which rekey never writes; the engine state was edited by hand")))
    }
}

/// The job's live control.
pub async fn job_control(client: &Client, job_id: i64) -> Result<Control, Error> {
    let word: String = client
        .query_one(
            "SELECT control FROM rekey.jobs WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| format!("reading the control of job {job_id}"))?
        .get(0);
    Control::stored(&word)
}

/// Sets the control of the running job named `name` (`rekey pause|resume|stop`);
/// false when no job of that name is running.
pub async fn set_control(client: &Client, name: &str, control: Control) -> Result<bool, Error> {
    let word = control.as_str();
    Ok(client
        .execute("UPDATE rekey.jobs SET control = $2, updated_at = now() WHERE name = $1 AND state = 'running'", &[&name, &word])
        .await
        .ctx(|| format!("setting job {name:?} to {word}"))?
        > 0)
}

/// What every run of every process did for the job, from `rekey.progress`.
pub async fn job_totals(client: &Client, job_id: i64) -> Result<Counts, Error> {
    let row = client
        .query_one(
            &format!("SELECT {SUM_COUNTS} FROM rekey.progress WHERE job_id = $1"),
            &[&job_id],
        )
        .await
        .ctx(|| format!("adding up the totals of job {job_id}"))?;
    Ok(counts_from(&row, 0))
}

/// Marks the job finished with its totals, if it is: every range done, and
/// still the running job of its name. The UPDATE commits synchronously, so
/// every batch committed before it is durable with it.
pub async fn finish_job(
    client: &Client,
    job_id: i64,
    summary: &serde_json::Value,
) -> Result<(), Error> {
    let what = || format!("finishing job {job_id}");
    let finished = client
        .execute(
            "UPDATE rekey.jobs SET state = 'done', finished_at = now(), updated_at = now(), summary = $2
              WHERE job_id = $1 AND state = 'running'
                AND NOT EXISTS (SELECT 1 FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done)",
            &[&job_id, summary],
        )
        .await
        .ctx(what)?;
    if finished == 1 {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT state, (SELECT count(*) FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done) FROM rekey.jobs WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(what)?;
    let (state, open) = (JobState::stored(row.get(0))?, row.get::<_, i64>(1));
    if state == JobState::Done {
        // another process sharing the job finished it first
        return Ok(());
    }
    Err(Error::Runtime(if state != JobState::Running {
        format!("job {job_id} is {state} now (another process restarted or finished it); this process's batches are committed, nothing more to do here")
    } else {
        format!(
            "job {job_id} still has {open} unfinished range(s): the server lost commits (a crash), or another process still works them; \
             run the same command again to finish it"
        )
    }))
}

/// The id of the latest job named `name` that was not abandoned, where it
/// is rotation `rotation`'s run, finished, under the spec hashed
/// `spec_hash` and the key set `keys` ([`crate::job::Job::describe_keys`]);
/// `None` where the latest is any other (a `rekey run` since, an edited
/// job file, another key set, one not finished).
pub async fn finished_rotation_run(
    client: &Client,
    name: &str,
    rotation: i64,
    spec_hash: &str,
    keys: &serde_json::Value,
) -> Result<Option<i64>, Error> {
    let row = client
        .query_opt(
            "SELECT job_id, state = 'done' AND summary ->> 'rotation' = $2::text AND spec_hash = $3 AND keys = $4
               FROM rekey.jobs WHERE name = $1 AND state <> 'abandoned' ORDER BY job_id DESC LIMIT 1",
            &[&name, &rotation.to_string(), &spec_hash, keys],
        )
        .await
        .ctx(|| format!("reading the last run of job {name:?}"))?;
    Ok(row.and_then(|r| {
        r.get::<_, Option<bool>>(1)
            .unwrap_or(false)
            .then(|| r.get(0))
    }))
}

/// The latest job of this name that was not abandoned: its id, spec hash
/// and the key ids and fingerprints it ran with; `None` before any run
/// (or before rekey's schema exists).
pub async fn last_job_keys(
    client: &Client,
    name: &str,
) -> Result<Option<(i64, String, serde_json::Value)>, Error> {
    if !super::schema_exists(client).await? {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT job_id, spec_hash, keys FROM rekey.jobs WHERE name = $1 AND state <> 'abandoned' ORDER BY job_id DESC LIMIT 1", &[&name])
        .await
        .ctx(|| format!("reading the keys job {name:?} ran with"))?
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Records the partitions and inheritance children (at any depth) the
/// job's targets have now, with the columns the job rotates in them, beside
/// those recorded before (`rekey.job_target_parts`): at the job's start,
/// at each run's start and end, so a partition attached while the job ran
/// and detached before a retire is a table the retire knows of.
pub async fn record_parts(
    client: &impl GenericClient,
    job_id: i64,
    job: &Job,
) -> Result<(), Error> {
    for t in &job.targets {
        let columns: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        client
            .execute(
                "WITH RECURSIVE parts(oid) AS (
                     SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = $3::text::regclass
                     UNION SELECT i.inhrelid FROM pg_inherits i JOIN parts ON i.inhparent = parts.oid)
                 INSERT INTO rekey.job_target_parts (job_id, target, table_name, table_oid, columns, attnums)
                 SELECT $1, $2, n.nspname || '.' || c.relname, c.oid, $4,
                        ARRAY(SELECT a.attnum FROM unnest($4::text[]) WITH ORDINALITY AS u(name, i)
                                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = u.name ORDER BY u.i)
                   FROM parts JOIN pg_class c ON c.oid = parts.oid JOIN pg_namespace n ON n.oid = c.relnamespace
                 ON CONFLICT (job_id, target, table_oid) DO NOTHING",
                &[&job_id, &(t.index as i32), &t.qualified(), &columns],
            )
            .await
            .ctx(|| format!("recording the partitions of {} for job {job_id}", t.table))?;
    }
    Ok(())
}
