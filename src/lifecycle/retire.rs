//! Retiring a key: only on a full proof, in the same invocation, that no
//! value needs it; the key then leaves what applications read for the
//! store's archive (destroyed at once when it was compromised).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::control::stop::Stop;
use crate::crypto::keyring::KeyId;
use crate::db::idle::keeping_alive;
use crate::db::writers::{open_writers, OpenWriter};
use crate::db::Database;
use crate::engine::named_keys::NamedKey;
use crate::engine::verify::{self, Depth};
use crate::error::DbContext;
use crate::job::Job;
use crate::lifecycle::audit::What;
use crate::lifecycle::steps;
use crate::secrets::Store;
use crate::state::rotated::{self, LeftOut, RetiringStore};
use crate::Error;

use super::replayed;
use super::rotation::{Ended, Progressed, RotateOptions};

/// Retires `old` after proving that no value still needs it.
pub async fn retire(
    db: &Database,
    client: &Client,
    job: &Arc<Job>,
    store: &mut Store,
    old: KeyId,
    opts: &RotateOptions,
) -> Result<Progressed, Error> {
    let key_ref = format!("{}#{old}", store.secret_id());
    // the current or pending key, or one the store does not hold: no verify can help
    store
        .table()
        .retirable(old)
        .map_err(|e| Error::Config(format!("{}: {e}; nothing was retired", store.secret_id())))?;
    if let Some(t) = job.filtered_target() {
        return Err(Error::Config(format!(
            "target {} has a `where` filter, so verification cannot see every row; retire the key with a job that covers whole tables",
            t.table
        )));
    }
    // another job rotating its tables away from this key on the same store:
    // its values under it are out of this job's verify
    let others = crate::state::rotations::others_away_from(
        client,
        &job.name,
        &store.secret_id(),
        i64::from(old),
    )
    .await?;
    if let Some((other, id, step)) = others.first() {
        return Err(Error::Config(format!(
            "job {other:?} is rotating its tables away from key {old} in {} too (rotation {id}, step {step}), and its values \
             under key {old} are out of this job's verify: finish that rotation first (`rekey rotate --job` its file), or \
             give it up (`rekey rotate --abort --job` its file), then retire key {old}; nothing was retired",
            store.secret_id()
        )));
    }
    // values in another database sharing the store: this retire cannot read them
    refuse_other_databases(client, store, old, "retired").await?;
    // a key marked compromised (a key table's COMPROMISED row, a compromise
    // rotation's mark) is destroyed whatever this invocation's reason
    let compromised = opts.compromised || store.table().is_compromised(old);
    if compromised && !opts.accept_unverified.is_empty() {
        return Err(Error::Config(format!(
            "a compromised key's material is destroyed at once, so key {old} cannot be retired on your word \
             (--accept-unverified): list the tables in the job file so that the full verify reads them{}. Nothing was retired",
            if opts.compromised {
                ", or retire without --reason compromise (the key then stays in the store's archive, unless it is marked compromised)"
            } else {
                " (the key is marked compromised, so it is destroyed whatever the reason given)"
            }
        )));
    }
    // each step's future boxed, so the retire's own stays small
    let unverified = Box::pin(refuse_tables_left_out(
        client,
        job,
        old,
        &opts.accept_unverified,
        opts.never_current,
        compromised,
    ))
    .await?;
    // a key repeated across inheritance children would make the verify's pages skip rows
    for t in &job.targets {
        Box::pin(crate::job::shared_keys::refuse_keys_shared_with_children(
            client, t,
        ))
        .await?;
    }
    // what a transaction still open wrote is invisible to the verify: a value
    // it committed after under the old key would lose its key
    let stop = &opts.settings.stop;
    if stop.requested() {
        return Ok(stopped(old, "before the retire began"));
    }
    // a standby that disconnects while behind during the wait and the verify
    // (hours, on a large job) is still seen by the retire's last step
    let mut watch = replayed::Watch::begin(db).await?;
    let open = watch
        .during(Box::pin(writers_ended(
            client,
            job,
            opts.wait_for_writers,
            stop,
        )))
        .await?;
    if stop.requested() {
        return Ok(stopped(
            old,
            "while waiting for transactions still open that wrote to the job's tables",
        ));
    }
    if let Some(w) = open.first() {
        let notes = format!(
            "a transaction still open has written to {} ({}){}: what it wrote is invisible to the verify, \
             and a value it writes under key {old} would lose its key",
            w.table,
            described(w),
            match open.len() - 1 {
                0 => String::new(),
                more => format!(", and {more} more"),
            }
        );
        let end_it = match w.pid {
            Some(pid) => format!("SELECT pg_terminate_backend({pid})"),
            None => "ROLLBACK PREPARED, see pg_prepared_xacts".to_string(),
        };
        let line = format!(
            "refusing to retire key {old} after waiting {} for it: {notes}. Retire once it ends; if it is abandoned, \
             end it ({end_it}), or wait longer (--wait-for-writers)",
            humantime::format_duration(opts.wait_for_writers),
        );
        return refused(client, opts, &key_ref, ("pending", None), &notes, line).await;
    }
    // Retire rests on a full verify of this invocation: every value decrypted,
    // with the keys matched against the job's recorded fingerprints.
    // what those writers committed is among what the standbys must hold
    watch.again().await?;
    let v = watch
        .during(Box::pin(verify::verify(
            db,
            client,
            job,
            Depth::full(opts.settings.lanes),
            opts.quiet,
        )))
        .await?;
    // in either format: a migration reads one and writes another
    let remaining = v.values_under_key(old);
    if remaining > 0 || v.values_unreadable() > 0 {
        let unreadable = v.values_unreadable();
        let mut notes =
            format!("{remaining} values still under key {old}, {unreadable} undecryptable");
        if remaining > 0 {
            notes.push_str("; rotate them first (`rekey run`)");
        }
        let mut named = Vec::new();
        if unreadable > 0 {
            // `run` reads values on old keys only: one labelled with the target key it never reads
            notes.push_str(
                "; no key given opens the undecryptable ones (`rekey verify --full` lists them)",
            );
            // values under a key retired before, come back: what brings it back
            let (said, keys) = crate::engine::named_keys::said_after(
                job,
                &v,
                "restore them from a backup or give the job the key they were written under",
            )
            .await;
            named = keys;
            notes.push_str(&said);
        }
        let line = format!("refusing to retire key {old}: {notes}");
        let refusal = refused(
            client,
            opts,
            &key_ref,
            ("failed", Some(remaining)),
            &notes,
            line,
        )
        .await?;
        return Ok(Progressed {
            named_keys: named,
            ..refusal
        });
    }
    // a stop asked for during the verify, which does not watch for it
    if stop.requested() {
        return Ok(stopped(old, "after the verify"));
    }
    // a standby that has not replayed the rotation still serves values under the key
    let replayed = Box::pin(replayed::standbys_replayed(
        opts.wait_for_replicas,
        stop,
        watch,
    ))
    .await?;
    if stop.requested() {
        return Ok(stopped(
            old,
            "while waiting for the standbys to replay the rotation",
        ));
    }
    // what could not be checked is said whether the retire goes on or not
    let mut lines: Vec<String> = replayed
        .warnings
        .iter()
        .map(|w| format!("warning: {w}"))
        .collect();
    if let Some(first) = replayed.behind.first() {
        let notes = format!(
            "standby {} {}{}: {} values under key {old}, which applications reading it could no longer open, and \
             promoted before it catches up it would keep them",
            first.described(),
            if first.gone.is_some() {
                "was not seen to replay the rotation's writes before it disconnected"
            } else {
                "has not yet replayed the rotation's writes"
            },
            match replayed.behind.len() - 1 {
                0 => String::new(),
                more => format!(" (and {more} more)"),
            },
            if first.gone.is_some() {
                "until it does, it holds"
            } else {
                "it still serves"
            }
        );
        let then = if first.gone.is_some() {
            "Reconnect it and let it replay, then retire: a retire run again does not see a standby that is not \
             connected (one in use no longer: stop it, and drop its replication slot)"
        } else {
            "Retire once it has caught up (its replay_lsn in pg_stat_replication), or wait longer \
             (--wait-for-replicas); stop a standby no longer in use, and drop its replication slot"
        };
        let line = format!(
            "refusing to retire key {old} after waiting {} for it: {notes}. {then}",
            humantime::format_duration(opts.wait_for_replicas),
        );
        // the verify passed: what is missing is the standbys' replay
        let status = ("passed", Some(v.values_total));
        let mut p = refused(client, opts, &key_ref, status, &notes, line).await?;
        p.lines.append(&mut lines);
        return Ok(p);
    }
    // looked at again after the verify (which may take hours): a run in
    // another database may have started under the key meanwhile
    refuse_other_databases(client, store, old, "retired").await?;
    // the lock's session is kept from idling while the store works (a
    // purge's wait for Secrets Manager)
    let applied = keeping_alive(client, steps::retire(store, old, compromised)).await?;
    let verified = if unverified.is_empty() {
        "a full verify found no value under it"
    } else {
        "a full verify of the job's targets found no value under it"
    };
    let mut notes = if compromised {
        format!("key {old} retired and its material destroyed (compromise); {verified}")
    } else if !store.can_purge() {
        format!(
            "key {old} retired; {verified}; rekey keeps no archive of keys in the environment (the variable is removed where it is set)"
        )
    } else {
        format!(
            "key {old} retired; {verified}; its material stays in the store's archive until purged"
        )
    };
    if !unverified.is_empty() {
        let tables = unverified.join(", ");
        notes.push_str(&format!(
            "; not verified, on the operator's word (--accept-unverified): {tables}"
        ));
        lines.push(format!(
            "not verified, on your word (--accept-unverified): {tables}; the audit trail records it"
        ));
    }
    // environment keys: rekey writes nothing there, so a retire run again
    // before the variable is removed is the same retire, recorded once
    let again = !store.writable()
        && opts
            .audit
            .has_key_event(client, "key_retired", &key_ref)
            .await?;
    if again {
        lines.push(format!(
            "key {old} was retired already (the audit trail records it); the change below is not made yet"
        ));
    } else {
        opts.audit
            .record(
                client,
                What {
                    event_type: "key_retired",
                    secret_id: &key_ref,
                    // what the operator vouched for was not read
                    verification_status: if unverified.is_empty() {
                        "passed"
                    } else {
                        "partial"
                    },
                    affected_records: Some(v.values_total),
                    notes: &notes,
                    job_id: None,
                },
            )
            .await?;
    }
    if crate::state::rotations::old_key_retired(client, &job.name, old).await? {
        lines.push(format!("the rotation that replaced key {old} is complete"));
    }
    lines.push(if compromised {
        format!("retired key {old} and destroyed its material (compromise)")
    } else if !store.can_purge() {
        // environment keys: rekey keeps no archive to restore from
        format!("retired key {old}; rekey keeps no archive of keys in the environment: the variable's value, once removed, \
                 is wherever you keep your secrets' history, or gone")
    } else {
        format!("retired key {old}; `rekey secrets restore --key-id {old}` brings it back until it is purged (`rekey secrets purge`, or {} after retiring)", humantime::format_duration(crate::secrets::ARCHIVE_RETENTION))
    });
    applied.tell(
        &mut lines,
        "make these changes where the application's environment is set:",
    );
    Ok(Progressed {
        ended: Ended::Done,
        lines,
        events: if again {
            Vec::new()
        } else {
            vec!["key_retired".into()]
        },
        step: None,
        rotation: None,
        named_keys: Vec::new(),
    })
}

/// A retire stopped on request (`when`): nothing was retired, and the
/// same command starts it again.
fn stopped(old: KeyId, when: &str) -> Progressed {
    Progressed {
        ended: Ended::Stopped,
        lines: vec![format!(
            "stopped {when}: key {old} was not retired; run the same command again to retire it"
        )],
        events: Vec::new(),
        step: None,
        rotation: None,
        named_keys: Vec::new(),
    }
}

/// A retire refused: recorded in the audit trail (`status`: its
/// verification status and the values counted, where counted), said with
/// `line`, and ended as not verified (exit 4).
async fn refused(
    client: &Client,
    opts: &RotateOptions,
    key_ref: &str,
    (status, affected): (&str, Option<u64>),
    notes: &str,
    line: String,
) -> Result<Progressed, Error> {
    opts.audit
        .record(
            client,
            What {
                event_type: "retire_refused",
                secret_id: key_ref,
                verification_status: status,
                affected_records: affected,
                notes,
                job_id: None,
            },
        )
        .await?;
    Ok(Progressed {
        ended: Ended::NotVerified,
        lines: vec![line],
        events: vec!["retire_refused".into()],
        step: None,
        rotation: None,
        named_keys: Vec::new(),
    })
}

/// Why the archived material of retired keys `ids` may not be destroyed
/// yet, if it may not: a full verify of the job (which must cover whole
/// tables) found values no key of the store opens. A row restored from a
/// backup under a retired key reads so, and only that key's archived
/// material could ever open it again.
pub async fn purge_refused(
    db: &Database,
    client: &Client,
    job: &Arc<Job>,
    store: &str,
    ids: &[KeyId],
    lanes: usize,
) -> Result<Option<(String, Vec<NamedKey>)>, Error> {
    if let Some(t) = job.filtered_target() {
        return Err(Error::Config(format!(
            "target {} has a `where` filter, so no verify sees every row, and a purge destroys keys for good: purge with a job \
             that covers whole tables; nothing was purged",
            t.table
        )));
    }
    let v = Box::pin(verify::verify(db, client, job, Depth::full(lanes), false)).await?;
    let unreadable = v.values_unreadable();
    if unreadable == 0 {
        return Ok(None);
    }
    let why = format!(
        "refusing to destroy the archived material of keys {ids:?}: a full verify found {unreadable} values no key of {store} opens, \
         and a value restored from a backup under a retired key reads so: only that key's archived material could open it again"
    );
    // for each key the values name: the command that brings it back
    let (named, advice, all) = crate::engine::named_keys::advice_after(job, &v).await;
    if !all {
        return Ok(Some((
            format!(
                "{why}. Restore the key (`rekey secrets restore --job <the job file> --key-id N`) and rotate them (`rekey run`), \
                 or, where they are damaged, fix them (`rekey verify --full` lists them); purge once a full verify finds none. \
                 Nothing was purged{}",
                advice.iter().map(|a| format!("\n{a}")).collect::<String>()
            ),
            named,
        )));
    }
    Ok(Some((
        format!(
            "{why}. Nothing was purged; purge once a full verify finds none (`rekey verify --full` lists the values):{}",
            advice.iter().map(|a| format!("\n{a}")).collect::<String>()
        ),
        named,
    )))
}

/// Waits, up to `limit`, for the transactions of other sessions (prepared
/// ones too) that had written to the job's tables (or their partitions and
/// children) and were still open when it began; returns those still open
/// then, one each. Those that begin meanwhile are not waited for: the
/// applications write under the new key by now, and a later verify sees
/// what they commit. A stop asked for (a signal under `rotate`) ends the
/// wait at once; the caller looks at `stop` after.
pub(super) async fn writers_ended(
    client: &Client,
    job: &Job,
    limit: Duration,
    stop: &Stop,
) -> Result<Vec<OpenWriter>, Error> {
    let tables: Vec<String> = job.targets.iter().map(|t| t.qualified()).collect();
    let what = || "looking for open transactions that wrote to the job's tables".to_string();
    let mut open = open_writers(client, &tables).await.ctx(what)?;
    // one per transaction, whatever the tables it holds locks on
    open.sort_by(|a, b| a.transaction.cmp(&b.transaction));
    open.dedup_by(|a, b| a.transaction == b.transaction);
    let Some(first) = open.first() else {
        return Ok(open);
    };
    tracing::info!(
        "waiting up to {} for {} transaction(s) still open that wrote to the job's tables ({} first)",
        humantime::format_duration(limit),
        open.len(),
        described(first)
    );
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    while !open.is_empty() && deadline.is_none_or(|d| Instant::now() < d) {
        if !stop.sleep(WRITERS_POLL).await {
            break;
        }
        let now = open_writers(client, &tables).await.ctx(what)?;
        open.retain(|w| now.iter().any(|n| n.transaction == w.transaction));
    }
    Ok(open)
}

/// An open transaction for people: its process, since when and its state
/// where this role may see them; or that it is prepared.
pub(super) fn described(w: &OpenWriter) -> String {
    let Some(pid) = w.pid else {
        return format!("a prepared transaction, {}", w.transaction);
    };
    let mut said = format!("process {pid}");
    if let Some(since) = &w.since {
        said.push_str(&format!(", open since {since}"));
    }
    if let Some(state) = &w.state {
        said.push_str(&format!(", {state}"));
    }
    said
}

/// How often [`writers_ended`] looks again.
const WRITERS_POLL: Duration = Duration::from_millis(100);

/// Refuses to retire a key that the store records values in another
/// database may be under ([`crate::secrets::uses`]): the full verify reads
/// this database alone. Nothing on the operator's word (`--accept-unverified`
/// names tables of this database): a run there narrows the record, and
/// `rekey secrets forget` drops a database that no longer uses the store.
/// A purge of a key retired before the record named it is refused alike
/// (`done`: what was not done, "retired", "purged").
pub async fn refuse_other_databases(
    client: &Client,
    store: &Store,
    old: KeyId,
    done: &str,
) -> Result<(), Error> {
    // read again: a run in another database may have recorded its use since the store was opened
    let Some(records) = store.uses_now().await? else {
        return Ok(());
    };
    let own = crate::engine::uses::user(client, "").await?.database_id;
    if !records.iter().any(|u| u.database_id == own) {
        // no run of this version here: a database sharing the store that
        // ran no such run either is as unknown to this retire
        tracing::warn!(
            "{} holds no record of this database: its runs here were made by a rekey older than the record of the \
             databases using a store, this database is a copy of the one they ran in (a copy is another database \
             to the record), or the record was removed. Another database sharing the store whose runs were too is \
             unknown here: where one may use it, run its job there (the run records its keys) before a key is \
             retired or purged",
            store.secret_id()
        );
    }
    let others = crate::secrets::uses::needing(&records, old, &own);
    let Some(first) = others.first() else {
        return Ok(());
    };
    Err(Error::Config(format!(
        "{} records that key {old} may still encrypt values in another database: {}. This retire's verify reads \
         this database alone, and destroying the key would lose them. Nothing was {done}. Run that job in its \
         database until it ends with every value on the key it writes under (`rekey run`, or `rekey rotate`, with \
         its job file against that database): the store then records the keys its values are under (a key that \
         stopped being current less than {} before that run ended stays recorded, as applications there may still \
         write under it: run it again once that time has passed). Where that database no \
         longer uses this store (dropped, moved to another store), drop its record: `rekey secrets forget --database {}` \
         with this job file",
        store.secret_id(),
        others.iter().map(|u| u.describe()).collect::<Vec<_>>().join("; "),
        humantime::format_duration(crate::secrets::uses::STALE_WRITERS),
        first.database_id,
    )))
}

/// Refuses a retire from a job file that no longer lists (itself or as a
/// partition or child of a listed table) a table or a column in which this
/// job's earlier runs rewrote values under the retiring store's keys (in
/// `rekey.progress` and `rekey.job_targets`, abandoned runs too) and that
/// still exists: the full verify sees only the job's targets, and a value
/// there (a row restored from a backup, an application still writing under
/// the old key) may still need the key. A column dropped from its table
/// holds no values; a table rotated under another store's keys holds none
/// of this store's. The operator may vouch for a table by name
/// (`accepted`): each name must be one left out, and what it covers (the
/// table, or columns of it) is returned for the audit trail.
async fn refuse_tables_left_out(
    client: &Client,
    job: &Job,
    old: KeyId,
    accepted: &[String],
    never_current: bool,
    compromised: bool,
) -> Result<Vec<String>, Error> {
    let listed: Vec<String> = job.targets.iter().map(|t| t.table.to_string()).collect();
    let columns: Vec<(String, String)> = job
        .targets
        .iter()
        .flat_map(|t| t.columns.iter().map(|c| (t.qualified(), c.name.clone())))
        .collect();
    let sides = || job.targets.iter().flat_map(|t| [&t.read, &t.write]);
    let mut labels: Vec<String> = sides()
        .filter_map(|s| s.source.as_ref().map(|k| k.store_label()))
        .collect();
    let mut fingerprints: Vec<String> = sides()
        .flat_map(|s| s.keyring.keys().map(|k| k.fingerprint()))
        .collect();
    for v in [&mut labels, &mut fingerprints] {
        v.sort();
        v.dedup();
    }
    // the retiring key's fingerprint, for a key never current
    let retiring = job
        .targets
        .iter()
        .find_map(|t| t.write.keyring.get(old).or_else(|| t.read.keyring.get(old)))
        .map(|k| k.fingerprint());
    // another keyring file holding a key of this store's (imported from the
    // same key) keeps its copy when this one is destroyed
    let mut held_elsewhere = Vec::new();
    for label in rotated::other_stores(client, &labels).await? {
        let Some(path) = label.strip_prefix("file:") else {
            continue;
        };
        for f in
            crate::secrets::file::fingerprints_held(std::path::Path::new(path)).unwrap_or_default()
        {
            if fingerprints.contains(&f) {
                held_elsewhere.push(format!("{label} {f}"));
            }
        }
    }
    let store = RetiringStore {
        held_elsewhere: &held_elsewhere,
        labels: &labels,
        fingerprints: &fingerprints,
        job_file: job.file.as_deref(),
        written_under: if never_current {
            // a key no target holds cannot be told: any run under the store counts
            retiring.as_deref()
        } else {
            None
        },
    };
    let left_out = rotated::left_out(client, &job.name, &listed, &columns, &store).await?;
    if let Some(stray) = accepted
        .iter()
        .find(|a| !left_out.iter().any(|l| &l.table == *a))
    {
        let tables: BTreeSet<&str> = left_out.iter().map(|l| l.table.as_str()).collect();
        return Err(Error::Config(format!(
            "--accept-unverified {stray}: {stray} is not a table this job rotated in an earlier run and its file no longer \
             lists (those are: {}); name each as the refusal does (schema.table). Nothing was retired",
            if tables.is_empty() {
                "none".to_string()
            } else {
                tables.into_iter().collect::<Vec<_>>().join(", ")
            }
        )));
    }
    let refused: Vec<&LeftOut> = left_out
        .iter()
        .filter(|l| !accepted.contains(&l.table))
        .collect();
    let (it, its) = match refused.len() {
        // what was vouched for, as the refusal named it (a column of a listed table too)
        0 => return Ok(left_out.iter().map(LeftOut::to_string).collect()),
        1 => ("it", "its"),
        _ => ("them", "their"),
    };
    let mut tables: Vec<&str> = refused.iter().map(|l| l.table.as_str()).collect();
    tables.dedup();
    let vouch = tables
        .iter()
        .map(|t| format!("--accept-unverified {t}"))
        .collect::<Vec<_>>()
        .join(" ");
    let (others, own): (Vec<&&LeftOut>, Vec<&&LeftOut>) =
        refused.iter().partition(|l| l.other_job.is_some());
    if !others.is_empty() {
        let (it, its) = if others.len() == 1 {
            ("it", "its")
        } else {
            ("them", "their")
        };
        return Err(Error::Config(format!(
            "other jobs ran over tables under the keys of this store that job {:?} does not list: {}. The full verify \
             that retire rests on would not read {its} values, and a value there (one an application wrote while key \
             {old} was current, one that job has not rotated yet) may still need key {old}. Nothing was retired. List \
             {it} in this job's file, so that one job lists every table the key encrypts (a job file may hold many \
             targets){}{}",
            job.name,
            others.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
            if compromised {
                on_word_refused(old)
            } else {
                format!(
                    "; or, where you know that no value there needs key {old} (that job has rotated {it} to a newer \
                     key since key {old} stopped being current, and `rekey verify --full` with its file says so), \
                     retire with `rekey secrets retire --key-id {old} {vouch}`, which the audit trail records as not verified"
                )
            },
            if own.is_empty() {
                String::new()
            } else {
                format!(
                    "; this job's file no longer lists {} either, which it rotated in an earlier run",
                    own.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
                )
            }
        )));
    }
    Err(Error::Config(format!(
        "job {:?} rotated {} in an earlier run, and the job file no longer lists {it}: the full verify that retire \
         rests on would not read {its} values, and a value there may still need key {old}. Nothing was retired. List {it} \
         in the job file again (or retire with the job file the rotation ran with){}",
        job.name,
        refused.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
        if compromised {
            on_word_refused(old)
        } else {
            format!(
                "; or, where you know that no value there needs key {old} (the table moved to a job of its own, say), \
                 retire with `rekey secrets retire --key-id {old} {vouch}`, which the audit trail records as not verified"
            )
        },
    )))
}

/// Why a compromised key offers no retire on the operator's word.
fn on_word_refused(old: KeyId) -> String {
    format!(
        ". Key {old} is compromised: its material is destroyed at once, so it cannot be retired on your word \
         (--accept-unverified); once listed, the verify reads the values there, and `rekey run` moves any still under \
         key {old}"
    )
}
