//! Verification: proves that no value is left on an old key.
//!
//! Counts every value by the key its prefix names (one SQL scan per column,
//! where the format has a key prefix) and decrypts a sample; or, with
//! `full` (and always for formats without a prefix, or migrations), opens
//! every value through the pipeline in verify mode.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio_postgres::Client;

use crate::crypto::codec::CodecError;
use crate::crypto::keyring::KeyId;
use crate::db::idle::keeping_alive;
use crate::db::raw::params;
use crate::db::{Database, Page};
use crate::engine::pipeline::{self, Mode, Settings};
use crate::engine::sink::Failure;
use crate::engine::transform::{self, Cell, Cells};
use crate::engine::{plan, sql};
use crate::error::DbContext;
use crate::job::{Aad, Job, Target};
use crate::observe::counts::LiveCounts;
use crate::observe::progress::Progress;
use crate::secrets::archived::Held;
use crate::state;
use crate::Error;

/// How hard to look.
#[derive(Debug, Clone, Copy)]
pub struct Depth {
    /// Decrypt every value.
    pub full: bool,
    /// Otherwise, decrypt this many sampled rows per target.
    pub sample: u32,
    /// Lanes for a full pass.
    pub lanes: usize,
}

impl Depth {
    /// Every value decrypted, over `lanes` lanes (what a retire rests on).
    pub fn full(lanes: usize) -> Depth {
        Depth {
            full: true,
            sample: 0,
            lanes,
        }
    }
}

/// How a verification looked at the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Every value decrypted.
    Full,
    /// Key versions counted for every value, a sample decrypted.
    Sample,
}

/// What verification found (the `--json` object of `rekey verify`).
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Nothing on an old key and nothing undecryptable.
    pub verified: bool,
    /// How hard it looked.
    pub mode: VerifyMode,
    /// Non-NULL values.
    pub values_total: u64,
    /// Values under the target key.
    pub values_on_target_key: u64,
    /// Values under another key (or still in the old format).
    pub values_on_old_keys: u64,
    /// Values no key opens (or whose prefix names no key).
    pub values_undecryptable: u64,
    /// Search hashes that match no hash key given for their row's plaintext.
    pub values_hash_mismatched: u64,
    /// Values decrypted from samples (sample mode).
    pub values_sampled: u64,
    /// Values per key label, all columns together.
    pub by_key: BTreeMap<String, u64>,
    /// Full verify: values per id of the key that opened them.
    #[serde(skip)]
    pub by_key_id: BTreeMap<KeyId, u64>,
    /// Values per `table.column` and key label.
    pub by_column: BTreeMap<String, BTreeMap<String, u64>>,
    /// Values that did not decrypt (never the values themselves).
    pub failures: Vec<Failure>,
}

impl Verification {
    /// Values a full verify opened with key `id`, in any column and format.
    pub fn values_under_key(&self, id: KeyId) -> u64 {
        self.by_key_id.get(&id).copied().unwrap_or(0)
    }

    /// Values no key opens and search hashes no hash key made: what no
    /// run can fix.
    pub fn values_unreadable(&self) -> u64 {
        self.values_undecryptable + self.values_hash_mismatched
    }

    /// More values failed than [`Verification::failures`] lists (it is
    /// capped).
    pub fn failures_capped(&self) -> bool {
        self.values_unreadable() > self.failures.len() as u64
    }
}

/// Verifies every target of `job`, after checking its keys against the
/// fingerprints the job's last run recorded.
pub async fn verify(
    db: &Database,
    client: &Client,
    job: &Arc<Job>,
    depth: Depth,
    quiet: bool,
) -> Result<Verification, Error> {
    // refused whatever the values: not turned into a full verify when some are off the target key
    if !depth.full && depth.sample == 0 {
        return Err(Error::Config(
            "--sample 0 decrypts nothing, so it cannot verify anything: give --sample N (N at least 1) or --full; \
             `rekey plan` counts values per key version without decrypting"
                .into(),
        ));
    }
    check_recorded_keys(client, job).await?;
    let counted = plan::count_by_key(client, job).await?;
    let mut full = depth.full || counted.iter().any(|c| c.by_key.is_none());
    // A sample counts key versions by their prefix; it cannot tell a value
    // under an old key from a damaged one bearing that key's prefix. When the
    // count finds anything off the target key, every value is decrypted, so
    // the answer is the one `--full` gives.
    let off_target = |c: &plan::ColumnPlan| {
        let keys: u64 = c.by_key.as_ref().map_or(0, |k| k.values().sum());
        keys > c.on_target_key.unwrap_or(0)
    };
    if !full && counted.iter().any(off_target) {
        tracing::info!(
            "values are not all on the target key: decrypting every value to tell old keys from damaged values"
        );
        full = true;
    }
    let mut by_column: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut by_key_id = BTreeMap::new();
    let mut failures = Vec::new();
    let (mut total, mut on_target, mut on_old, mut undecryptable) = (0u64, 0u64, 0u64, 0u64);
    let mut sampled = 0u64;

    if full {
        let ranges = plan::job_ranges(client, job, depth.lanes).await?;
        let rows: u64 = counted.iter().map(|c| c.rows).max().unwrap_or(0);
        let progress = Progress::new(rows, "verifying", quiet);
        let settings = Settings {
            lanes: depth.lanes,
            ..Settings::default()
        };
        // this session may hold a lifecycle lock while the lanes decrypt
        let outcome = keeping_alive(
            client,
            pipeline::run(
                db,
                job.clone(),
                ranges,
                Mode::Verify,
                settings,
                Arc::new(LiveCounts::default()),
                progress,
            ),
        )
        .await?;
        if client.is_closed() {
            return Err(Error::Runtime(
                "the session that holds this command's locks was closed during the verify (by the server or the network): \
                 nothing was changed after it; run the same command again"
                    .into(),
            ));
        }
        on_target = outcome.on_target;
        on_old = outcome.on_old;
        undecryptable = outcome.counts.values_failed;
        total = on_target + on_old + undecryptable;
        by_column = outcome.by_key;
        by_key_id = outcome.by_key_id;
        failures = outcome.failures;
    } else {
        for c in &counted {
            let keys = c.by_key.clone().unwrap_or_default();
            let column_total: u64 = keys.values().sum();
            let (target, unknown) = (c.on_target_key.unwrap_or(0), c.unknown_key.unwrap_or(0));
            total += column_total;
            on_target += target;
            undecryptable += unknown;
            on_old += column_total - target - unknown;
            by_column.insert(format!("{}.{}", c.table, c.column), keys);
        }
        for t in &job.targets {
            let (n, failed) = sample_target(client, t, depth.sample).await?;
            sampled += n;
            for (f, col) in failed {
                failures.push(Failure {
                    table: t.table.to_string(),
                    column: t.columns[col].name.clone(),
                    key: f,
                    error: "sampled value did not decrypt",
                    // a sample that fails is read again in full, which names it
                    named_key: None,
                    target: t.index,
                });
            }
        }
        let sample_failures = failures.len() as u64;
        undecryptable += sample_failures;
        on_target = on_target.saturating_sub(sample_failures);
    }
    if !full && undecryptable > 0 {
        // a sampled value with the target key's prefix did not decrypt: count them all
        return Box::pin(verify(
            db,
            client,
            job,
            Depth {
                full: true,
                ..depth
            },
            quiet,
        ))
        .await;
    }

    // a search hash that matches no hash key is not a ciphertext no key opens
    let mismatched = failures
        .iter()
        .filter(|f| f.error == crate::crypto::codec::CodecError::HashMismatch.kind())
        .count() as u64;
    undecryptable = undecryptable.saturating_sub(mismatched);
    let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
    for keys in by_column.values() {
        for (k, n) in keys {
            *by_key.entry(k.clone()).or_default() += n;
        }
    }
    Ok(Verification {
        verified: on_old == 0 && undecryptable == 0 && mismatched == 0,
        mode: if full {
            VerifyMode::Full
        } else {
            VerifyMode::Sample
        },
        values_total: total,
        values_on_target_key: on_target,
        values_on_old_keys: on_old,
        values_undecryptable: undecryptable,
        values_hash_mismatched: mismatched,
        values_sampled: sampled,
        by_key,
        by_key_id,
        by_column,
        failures,
    })
}

/// Refuses keys that are not the ones the job's last run used: a target key
/// with another fingerprint would make values rekey wrote look
/// undecryptable, or a verify pass on the wrong key. Keys are compared by
/// id and fingerprint, never material; a job whose file changed since is not
/// compared (its targets may differ).
async fn check_recorded_keys(client: &Client, job: &Job) -> Result<(), Error> {
    let Some((job_id, spec_hash, recorded)) = state::last_job_keys(client, &job.name).await? else {
        return Ok(());
    };
    if spec_hash != job.spec_hash {
        tracing::info!("the job file changed since job {job_id} ran; its keys are not compared with that run's");
        return Ok(());
    }
    for (t, rec) in job
        .targets
        .iter()
        .zip(recorded.as_array().into_iter().flatten())
    {
        let sides = [
            (&t.write.keyring, t.write.source.as_ref(), "write"),
            (&t.read.keyring, t.read.source.as_ref(), "read"),
        ];
        let hash = t
            .hash
            .as_ref()
            .map(|h| (&h.keyring, Some(&h.source), "hash"));
        for (keyring, source, name) in sides.into_iter().chain(hash) {
            for key in keyring.keys() {
                let Some(was) = rec[name]["keys"][key.id().to_string()].as_str() else {
                    continue;
                };
                let now = key.fingerprint();
                if was != now {
                    let at = source
                        .map_or_else(|| format!("key {}", key.id()), |s| s.where_key(key.id()));
                    return Err(Error::Config(format!(
                        "{at} (for {}) is not the key job {:?} (job {job_id}) used: its fingerprint is {now}, the job recorded {was}; \
                         give the key the job ran with, then verify again",
                        t.table, job.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// How the command a preflight refuses for lets values that do not open
/// through: its own `--force`, or none (then the refusal does not tell the
/// operator to pass one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forcing {
    /// `rekey run --force`.
    Flag,
    /// A command without one, by its name (`rekey rotate`, `rekey bench`).
    NoFlag(&'static str),
}

impl Forcing {
    /// The way past a refusal over `what` ("every value that does not
    /// open"), as the end of its sentence.
    fn past(self, what: &str) -> String {
        match self {
            Forcing::Flag => format!(", or pass --force to quarantine {what}"),
            Forcing::NoFlag(command) => format!(
                ". `{command}` takes no --force, and does not go on over such values ({what}): where they \
                 are damaged values rather than another key's, restore them from a backup (or set them to NULL) \
                 first (`rekey run --force` quarantines them, but leaves them in the table, \
                 where this check finds them again)"
            ),
        }
    }
}

/// What is known of the key a run writes under, before it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKey {
    /// Given by the operator or the store: values already labelled with it
    /// must open under it ([`refuse_a_target_key_not_theirs`]).
    Given,
    /// The key a rotation read its values under, which an abort turns them
    /// back to: proven by that rotation where its material is the one the
    /// rotation's runs recorded (checked by fingerprint), and values
    /// labelled with it that no key opens (damaged before the rotation
    /// began) say nothing of it.
    ReadBefore,
}

/// What no run goes on past, `--force` or not: a table this role may not
/// (or cannot now) write, and a key pages cannot follow. The first checks
/// of [`preflight`], and all a forced run makes.
pub async fn check_table(
    client: &Client,
    t: &Target,
    lock_wait: Option<std::time::Duration>,
) -> Result<(), Error> {
    crate::job::visibility::check_writable(client, t, lock_wait).await?;
    crate::job::shared_keys::refuse_keys_shared_with_children(client, t).await
}

/// Values read from each target before a run to prove the keys open something.
const PREFLIGHT_ROWS: i64 = 200;

/// Before anything is written: decrypts the first stale values of every
/// target, and refuses when none of them opens and most fail authentication
/// (the wrong key given), which would otherwise quarantine the whole table. A target
/// with some values that open and some that do not proceeds: those are
/// quarantined one by one. Then, for a target key not proven,
/// [`refuse_a_target_key_not_theirs`]. `lock_wait` is how long the run's
/// statements wait for a lock (`--lock-timeout`; `None`, for ever): the
/// check that the tables may be updated waits as long.
pub async fn preflight(
    client: &Client,
    job: &Job,
    target: TargetKey,
    forcing: Forcing,
    lock_wait: Option<std::time::Duration>,
) -> Result<Preflighted, Error> {
    if target == TargetKey::ReadBefore {
        // the key as the rotation's runs recorded it, not merely a key by its id
        check_recorded_keys(client, job).await?;
    }
    let mut reads_labelled = Vec::new();
    for (i, t) in job.targets.iter().enumerate() {
        check_table(client, t, lock_wait).await?;
        if target == TargetKey::Given && refuse_a_target_key_not_theirs(client, t, forcing).await? {
            reads_labelled.push(i);
        }
        let (text, prefixed) = sql::select_page(
            t,
            sql::Bounds {
                lower: false,
                upper: false,
            },
            true,
        );
        let prefixes: Vec<Vec<u8>> = prefixed.iter().filter_map(|&c| t.stale_prefix(c)).collect();
        let mut params = params(&prefixes);
        params.push(&PREFLIGHT_ROWS);
        let rows = client
            .query(&text, &params)
            .await
            .ctx(|| format!("reading a sample of {}", t.table))?;
        let rows = page_of(t, &rows)?;
        refuse_missing_keys(job, t, &rows, forcing).await?;
        let mut cells = Cells::default();
        transform::classify(t, &rows, &mut cells);
        let tried = cells.iter().filter(|c| !matches!(c, Cell::Null)).count();
        let opened = cells
            .iter()
            .filter(|c| matches!(c, Cell::Opened { .. }))
            .count();
        // A wrong key shows as authentication failures; a few malformed
        // values (truncated, not base64) left over from an earlier run do not.
        let wrong_key = auth_failures(&cells);
        refuse_wrong_hash_key(t, &cells, forcing)?;
        if tried > 0 && opened == 0 && 2 * wrong_key >= tried {
            return Err(Error::Config(format!(
                "none of the {tried} values sampled from {} opens with the keys given (a wrong old key, or the wrong format?); \
                 nothing was written. Fix the keys or the job file{}",
                t.table,
                forcing.past("every value that does not open")
            )));
        }
        // not a ciphertext of the format at all (a plaintext column listed by
        // mistake, the wrong format): not damaged values an earlier run left
        let malformed = cells
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Cell::Failed(CodecError::BadEncoding | CodecError::Truncated)
                )
            })
            .count();
        if tried >= NOT_CIPHERTEXT_AT_LEAST
            && malformed == tried
            && !quarantined_before(client, job, t).await?
        {
            return Err(Error::Config(format!(
                "none of the {tried} values sampled from {} is a value of the job's format ({}: not base64, or \
                 shorter than the format's overhead): is every column listed encrypted, and in this format? Nothing \
                 was written. Fix the job file's columns or format{}",
                t.table,
                cells
                    .iter()
                    .find_map(|c| match c {
                        Cell::Failed(e) => Some(e.kind()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                forcing.past("every value that does not open")
            )));
        }
    }
    Ok(Preflighted { reads_labelled })
}

/// What the preflight found that the run must do besides its usual work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Preflighted {
    /// The targets (by index) some of whose sampled values already
    /// labelled with the target key do not open: the run reads those
    /// values too ([`Target::reads_labelled`]).
    pub reads_labelled: Vec<usize>,
}

impl Preflighted {
    /// Sets on `job` what the run must do, and says it (one line per
    /// target that reads its labelled values too).
    pub fn apply(&self, job: &mut Job) -> Vec<String> {
        let mut said = Vec::new();
        for &i in &self.reads_labelled {
            let Some(t) = job.targets.get_mut(i) else {
                continue;
            };
            t.reads_labelled = true;
            let label = t.target_label();
            said.push(format!(
                "some values of {} already labelled {label} do not open under it (damaged, or sealed under another \
                 key of that id): this run reads every value labelled {label} too, leaves those that open as they \
                 are and quarantines those that do not",
                t.table
            ));
        }
        said
    }
}

/// What a forced run does of the preflight's check of the values already
/// labelled with the target key: no refusal, but the targets some of whose
/// sampled labelled values do not open read them all.
pub async fn labelled_that_do_not_open(client: &Client, job: &Job) -> Result<Preflighted, Error> {
    let mut reads_labelled = Vec::new();
    for (i, t) in job.targets.iter().enumerate() {
        if labelled_sample(client, t).await?.refused > 0 {
            reads_labelled.push(i);
        }
    }
    Ok(Preflighted { reads_labelled })
}

/// Sampled values that must all be malformed before a target is refused
/// as not holding ciphertext of its format (fewer may be damaged values
/// of a table otherwise rotated).
const NOT_CIPHERTEXT_AT_LEAST: usize = 10;

/// Whether a run of job `job` has quarantined values of `t` before: a
/// sample of malformed values is then what it left, not a wrong column.
async fn quarantined_before(client: &Client, job: &Job, t: &Target) -> Result<bool, Error> {
    if !state::schema_exists(client).await? {
        return Ok(false);
    }
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM rekey.quarantine q JOIN rekey.jobs j ON j.job_id = q.job_id
                             WHERE j.name = $1 AND q.table_name = $2)",
            &[&job.name, &t.table.to_string()],
        )
        .await
        .ctx(|| format!("reading what earlier runs quarantined in {}", t.table))?
        .get(0))
}

/// The newest rows by key that [`refuse_a_target_key_not_theirs`] looks
/// among for values already labelled with the target key.
const NEWEST_ROWS: i64 = 10_000;

/// Refuses, before any write, a target key that opens none of the values
/// already labelled with it (written by an application that already writes
/// under that key id, or by an earlier rotation to it): it is then not the
/// key they were written under, and a run would re-encrypt every other
/// value under a key nothing else holds, while those values are skipped as
/// done. Looks among the newest rows by key and a sample of about 1,000
/// pages; one value that opens proves the key (authenticated encryption
/// does not open under another key), so damaged values with the target's
/// label beside one that opens are quarantined as before (where none
/// opens, `--force` skips this check).
async fn refuse_a_target_key_not_theirs(
    client: &Client,
    t: &Target,
    forcing: Forcing,
) -> Result<bool, Error> {
    let Labelled { on_target, refused } = labelled_sample(client, t).await?;
    if on_target == 0 && refused > 0 {
        let label = t.target_label();
        return Err(Error::Config(format!(
            "{refused} values sampled from {} are already labelled {label} (written by an application that already writes \
             under it, or by an earlier rotation), and the key given as {label} opens none of them: it is not \
             the key they were written under. Nothing was written: the run would re-encrypt every other value \
             under a key nothing else holds. Give the key they were written under (the one the application \
             uses), or, for a new key, a key id no value carries yet{}",
            t.table,
            match forcing {
                // the refusal's likely cause is the key: --force is for damaged values alone
                Forcing::Flag => ". If they are damaged values rather than another key's, --force quarantines what \
                                  does not open and goes on"
                    .to_string(),
                Forcing::NoFlag(_) => forcing.past("values no key opens"),
            }
        )));
    }
    Ok(refused > 0)
}

/// What a sample of target `t`'s values already labelled with the target
/// key came to.
#[derive(Debug, Clone, Copy, Default)]
struct Labelled {
    /// Values that open under the target key.
    on_target: usize,
    /// Values that fail authentication under it.
    refused: usize,
}

/// Samples target `t`'s values already labelled with the target key (among
/// the newest rows by key and about 1,000 pages) and opens them.
async fn labelled_sample(client: &Client, t: &Target) -> Result<Labelled, Error> {
    let Some((text, prefixed)) = sql::select_labelled(t) else {
        return Ok(Labelled::default());
    };
    let prefixes: Vec<Vec<u8>> = prefixed.iter().filter_map(|&c| t.stale_prefix(c)).collect();
    let percent = crate::engine::left::sample_percent(client, t).await?;
    let mut params = params(&prefixes);
    params.push(&NEWEST_ROWS);
    params.push(&percent);
    params.push(&PREFLIGHT_ROWS);
    let rows = client
        .query(&text, &params)
        .await
        .ctx(|| format!("reading values of {} already on the target key", t.table))?;
    let rows = page_of(t, &rows)?;
    let mut cells = Cells::default();
    transform::classify(t, &rows, &mut cells);
    let on_target = cells
        .iter()
        .filter(|c| {
            matches!(
                c,
                Cell::Opened {
                    on_target: true,
                    ..
                }
            )
        })
        .count();
    let refused = auth_failures(&cells);
    Ok(Labelled { on_target, refused })
}

/// Values that failed authentication: what a wrong key shows as.
fn auth_failures(cells: &[Cell]) -> usize {
    cells
        .iter()
        .filter(|c| {
            matches!(
                c,
                Cell::Failed(crate::crypto::codec::CodecError::AuthFailed)
            )
        })
        .count()
}

/// Sampled rows as the transform takes them.
fn page_of(t: &Target, rows: &[tokio_postgres::Row]) -> Result<Page, Error> {
    Page::from_rows(rows)
        .map_err(|e| Error::Runtime(format!("reading a sample of {}: {e}", t.table)))
}

/// Refuses, before any write, a target none of whose sampled search hashes
/// any hash key made (a wrong hash key, output or truncate), which would
/// otherwise quarantine every hash of the table.
fn refuse_wrong_hash_key(t: &Target, cells: &[Cell], forcing: Forcing) -> Result<(), Error> {
    let Some(hash) = &t.hash else {
        return Ok(());
    };
    let hashes = cells.iter().skip(hash.column).step_by(t.columns.len());
    let (mut tried, mut matched, mut mismatched) = (0usize, 0usize, 0usize);
    for cell in hashes {
        match cell {
            Cell::Null => continue,
            Cell::Opened { .. } => matched += 1,
            Cell::Failed(crate::crypto::codec::CodecError::HashMismatch) => mismatched += 1,
            _ => {}
        }
        tried += 1;
    }
    if tried > 0 && matched == 0 && 2 * mismatched >= tried {
        return Err(Error::Config(format!(
            "none of the {tried} search hashes sampled from {}.{} is the HMAC of its plaintext under a hash key given \
             (the new one is {}): the old hash key is missing, or output or truncate differ from what the application writes. \
             Nothing was written. Give the old hash key as well as the new one, or fix the job file{}",
            t.table,
            t.columns[hash.column].name,
            hash.source.where_key(hash.hasher.target()),
            forcing.past("every hash that matches no key")
        )));
    }
    Ok(())
}

/// Refuses, before any write, values that name a key the keys given do not
/// hold (an old key left out): every one of them would be quarantined. A key
/// id named by a stray value or two (a damaged version byte) is not a key
/// left out: those values are quarantined one by one. A key the store
/// retired is said with what its archive holds of it (values restored
/// from a backup after a retire).
async fn refuse_missing_keys(
    job: &Job,
    t: &Target,
    rows: &Page,
    forcing: Forcing,
) -> Result<(), Error> {
    let mut missing: BTreeMap<KeyId, u64> = BTreeMap::new();
    let mut tried = 0u64;
    for row in rows.rows() {
        for col in 0..t.columns.len() {
            let Some(stored) = transform::held(t, row, col) else {
                continue;
            };
            tried += 1;
            if let Some(id) = transform::missing_key(t, col, stored) {
                *missing.entry(id).or_default() += 1;
            }
        }
    }
    // a key left out shows in at least 2 values and 1 in 20 of those sampled
    missing.retain(|_, n| *n >= 2 && *n * 20 >= tried);
    if missing.is_empty() {
        return Ok(());
    }
    // a versioned-gcm version byte of 0: no key has it, so no key given could open them
    if let Some((_, n)) = missing
        .iter()
        .find(|(id, _)| !t.read.format.names_a_key(**id))
    {
        return Err(Error::Config(format!(
            "of the {tried} values sampled from {}, {n} begin with version byte 0, which no versioned-gcm key has \
             (versions are 1 to 255): no key given can open them, so nothing was written. They are not values \
             this format made (check the target's `format`), or they are damaged: restore them from a backup{}",
            t.table,
            forcing.past("every value no key opens")
        )));
    }
    let named: Vec<String> = missing
        .iter()
        .map(|(id, n)| {
            let at = t.read.source.as_ref().map_or_else(String::new, |s| {
                format!(": {} is not given", s.where_key(*id))
            });
            format!("{n} under key {}{at}", t.read.codec.key_label(*id))
        })
        .collect();
    // a retired key: what brings it back, if anything
    let retired: Vec<String> = crate::engine::named_keys::named_in_counts(job, t, &missing)
        .await
        .iter()
        .filter(|n| matches!(n.held, Held::Archived | Held::Destroyed))
        .map(|n| match n.held {
            Held::Archived => format!(
                " Key {} was retired and is still in the store's archive (were these rows restored from a backup?): \
                 `{}` brings it back as a previous key, for a run to rewrite its values.",
                n.key_id, n.restore_command
            ),
            _ => format!(
                " Key {} was retired and its material destroyed (purged, or compromised): no key opens its values \
                 any more; restore them from a backup taken after the rotation, or write them again from their source.",
                n.key_id
            ),
        })
        .collect();
    Err(Error::Config(format!(
        "of the {tried} values sampled from {}, {}; the keys given do not hold that key, so nothing was written.{} \
         Give the old key as well as the new one{}",
        t.table,
        named.join("; "),
        retired.concat(),
        forcing.past("every value under a key that is not given")
    )))
}

/// Decrypts up to `n` sampled rows of a target; returns rows sampled and the failed keys.
async fn sample_target(
    client: &Client,
    t: &Target,
    n: u32,
) -> Result<(u64, Vec<(String, usize)>), Error> {
    if n == 0 {
        return Ok((0, Vec::new()));
    }
    let rows_est = plan::estimated_rows(client, t).await?.max(1.0);
    let percent = (100.0 * 2.0 * f64::from(n) / rows_est).clamp(0.0001, 100.0) as f32;
    let rows = client
        .query(&sql::select_sample(t), &[&percent, &i64::from(n)])
        .await
        .ctx(|| format!("sampling {}", t.table))?;
    let mut cells = Cells::default();
    transform::classify(t, &page_of(t, &rows)?, &mut cells);
    let ncols = t.columns.len();
    let key_col = t.key.len() + ncols + usize::from(matches!(t.aad, Aad::Column(_)));
    let mut failed = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        if let Cell::Failed(_) = cell {
            let key: Option<String> = rows[i / ncols].try_get(key_col).ok();
            failed.push((key.unwrap_or_default(), i % ncols));
        }
    }
    Ok((rows.len() as u64, failed))
}
