//! `rekey status`, and the live control of a running job: `rekey pause`,
//! `rekey resume`, `rekey stop`.

use serde_json::json;

use crate::cli::args::StatusArgs;
use crate::cli::out::out;
use crate::cli::{open, print_json, Opened};
use crate::state::rotations::{self, Rotation, Step};
use crate::state::{self, Control, JobState};
use crate::Error;

/// `rekey pause`, `rekey resume`, `rekey stop`: sets the running job's control,
/// which every process running it reads after each batch.
pub async fn control(args: &StatusArgs, to: Control) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    if !state::schema_exists(&client).await? || !state::set_control(&client, &name, to).await? {
        return Err(Error::Config(format!("no job named {name:?} is running on this database; `rekey status --job ...` shows its state")));
    }
    let said = match to {
        Control::Pause => "pausing: every process running it stops reading after its current batch; `rekey resume` goes on",
        Control::Stop => "stopping: every process running it stops after its current batch, checkpointed; `rekey run` resumes it",
        Control::Run => "resuming",
    };
    if args.common.json {
        print_json(&json!({ "job": name, "control": to.as_str() }));
    } else {
        out!("{name}: {said}");
    }
    Ok(0)
}

/// `rekey status`.
pub async fn status(args: &StatusArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    let exists = state::schema_exists(&client).await?;
    let found = if exists {
        state::job_status(&client, &name).await?
    } else {
        None
    };
    // the job's rotation in progress: `rekey rotate` continues it, not `rekey run`
    let rotation = if exists {
        rotations::open_rotation(&client, spec.name.as_deref().unwrap_or_default()).await?
    } else {
        None
    };
    let rotation_json = rotation.as_ref().map(|r| {
        json!({ "id": r.id, "step": r.step.as_str(), "old_key": r.old_key, "new_key": r.new_key })
    });
    let Some(s) = found else {
        if args.common.json {
            print_json(&json!({ "job": name, "state": "never run", "rotation": rotation_json }));
        } else {
            out!("{name}: never run on this database");
            if let Some(r) = &rotation {
                out!("  {}", rotation_line(r));
            }
        }
        return Ok(0);
    };
    if args.common.json {
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        v["rotation"] = rotation_json.unwrap_or_default();
        print_json(&v);
    } else {
        out!(
            "{} (job {}): {}, {}/{} ranges done, {} rows scanned, {} values rewritten, {} failed (quarantined: {}), {} conflicts; started {}, last checkpoint {}{}",
            s.name,
            s.job_id,
            s.state,
            s.ranges_done,
            s.ranges_total,
            s.counts.rows_scanned,
            s.counts.values_rewritten,
            s.counts.values_failed,
            s.quarantined,
            s.counts.conflicts,
            s.started_at,
            s.updated_at,
            s.finished_at.as_ref().map(|f| format!(", finished {f}")).unwrap_or_default()
        );
        if s.values_not_rotated > 0 {
            let why = s
                .not_rotated_by_reason
                .iter()
                .map(|(r, n)| format!("{n} {r} ({})", not_rotated_because(r)))
                .collect::<Vec<_>>()
                .join(", ");
            out!(
                "  {} values NOT rotated, still under their old key: {why}; \
                 see SELECT reason, detail, pk_text FROM rekey.not_rotated WHERE job_id = {}",
                s.values_not_rotated,
                s.job_id
            );
        }
        if s.conflicts_left > 0 {
            out!(
                "  {} rows still changing under the runs, left for the next run to re-read",
                s.conflicts_left
            );
        }
        if s.rows_written_behind > 0 {
            out!(
                "  {} rows written behind the run under an old key (after it passed them): `rekey run` again rotates them",
                s.rows_written_behind
            );
        }
        if let Some(r) = &rotation {
            out!("  {}", rotation_line(r));
        }
        if s.state == JobState::Running {
            let control = match s.control {
                Control::Pause => " (paused by `rekey pause`)",
                Control::Stop => " (stop requested)",
                Control::Run => "",
            };
            let resumes = match &rotation {
                Some(r) if r.step == Step::Aborting => "`rekey rotate --abort`",
                Some(_) => "`rekey rotate`",
                None => "`rekey run`",
            };
            match s.workers.len() {
                0 => out!(
                    "  not being run by any process now{control} (the last one stopped, or was killed): \
                     {resumes} with the same job file resumes it"
                ),
                n => out!(
                    "  being run by {n} process{}{control}: {}",
                    if n == 1 { "" } else { "es" },
                    s.workers.join(", ")
                ),
            }
        }
    }
    Ok(0)
}

/// The job's rotation in progress, and what continues it.
fn rotation_line(r: &Rotation) -> String {
    let old = r
        .old_key
        .map_or_else(|| "no key".to_string(), |k| format!("key {k}"));
    match r.step {
        Step::Aborting => format!(
            "rotation {} is being aborted (back to {old}; key {} is retired once no value needs it): \
             `rekey rotate --abort` with the same job file continues it",
            r.id, r.new_key
        ),
        step => format!(
            "rotation {} ({old} to key {}) is at step {}: `rekey rotate` with the same job file continues it",
            r.id,
            r.new_key,
            step.as_str()
        ),
    }
}

/// What a reason in `rekey.not_rotated` means, for people.
fn not_rotated_because(reason: &str) -> &'static str {
    match reason {
        "write_refused" => "the update left the row alone: a trigger returned NULL, a row-level security policy or a rule",
        "write_undone" => "a BEFORE UPDATE trigger put another value back",
        "row_locked" => "another transaction held the row locked through every try",
        "write_rejected" => "the database raised an error for the row, a trigger's exception or a constraint: its words are in detail",
        _ => "see the reason column",
    }
}
