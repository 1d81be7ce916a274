//! The evidence of one rotation, for an auditor: who, when, why, the
//! incident, the keys by fingerprint (never material), every step with its
//! timestamps, counts and durations, the re-encryption's job, the final full
//! verify, and the audit events with their hashes, read from `rekey.audit`,
//! `rekey.rotations` and `rekey.jobs`. [`check`] verifies the chain;
//! [`page`] renders the document for people (Markdown or HTML).

pub mod check;
pub mod page;

use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::error::DbContext;
use crate::lifecycle::chain::Event;
use crate::Error;

/// The rotation `id` of job `name` (default: its latest), as
/// `rekey.rotations` holds it (timestamps in UTC).
async fn rotation(client: &Client, name: &str, id: Option<i64>) -> Result<Value, Error> {
    let row = client
        .query_opt(
            "SELECT to_jsonb(r) FROM rekey.rotations r
              WHERE job_name = $1 AND ($2::bigint IS NULL OR rotation_id = $2)
              ORDER BY rotation_id DESC LIMIT 1",
            &[&name, &id],
        )
        .await
        .ctx(|| "reading the rotation (rekey.rotations)".into())?;
    row.map(|r| r.get(0)).ok_or_else(|| {
        Error::Config(match id {
            Some(id) => format!("job {name:?} has no rotation {id} in rekey.rotations; `rekey report --job ...` without --rotation reports the latest"),
            None => format!("job {name:?} has no rotation recorded yet: run `rekey rotate --job ...` first"),
        })
    })
}

/// The `rekey.jobs` rows of the re-encryptions (timestamps in UTC): the
/// jobs the rotation's events name, and every job of its name started while
/// it was open (a run killed or given up wrote no event of its own). Each
/// with its totals as its progress holds them, a job left unfinished too.
async fn jobs(client: &Client, rot: &Value, ids: &[i64]) -> Result<Vec<Value>, Error> {
    let (name, id) = (rot["job_name"].as_str(), rot["rotation_id"].as_i64());
    let rows = client
        .query(
            "SELECT jsonb_build_object('job_id', job_id, 'name', name, 'state', state, 'keys', keys,
                      'started_at', started_at, 'finished_at', finished_at,
                      'duration_s', round(extract(epoch FROM finished_at - started_at)::numeric, 3),
                      'summary', summary,
                      'totals', (SELECT jsonb_build_object('values_rewritten', coalesce(sum(values_rewritten), 0),
                                          'values_failed', coalesce(sum(values_failed), 0),
                                          'values_not_rotated', coalesce(sum(values_not_rotated), 0))
                                   FROM rekey.progress p WHERE p.job_id = j.job_id))
               FROM rekey.jobs j
              WHERE job_id = ANY($1)
                 OR EXISTS (SELECT 1 FROM rekey.rotations r
                             WHERE r.rotation_id = $3 AND j.name = $2 AND j.started_at >= r.started_at
                               AND j.started_at <= coalesce(r.finished_at, 'infinity'))
              ORDER BY job_id",
            &[&ids, &name, &id],
        )
        .await
        .ctx(|| "reading the re-encryption jobs (rekey.jobs)".into())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Key `id`'s fingerprint as the jobs recorded it, if they did.
fn fingerprint_in(jobs: &[Value], id: Option<i64>) -> Option<String> {
    let id = id?.to_string();
    jobs.iter()
        .flat_map(|j| j["keys"].as_array().into_iter().flatten())
        .flat_map(|t| [&t["read"]["keys"][&id], &t["write"]["keys"][&id]])
        .find_map(|f| f.as_str().map(str::to_string))
}

/// Seconds from `a` to `b` (RFC 3339), when both parse.
fn seconds_between(a: &str, b: &str) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_microseconds()? as f64 / 1e6)
}

/// The distinct non-empty values of one field, in order of appearance.
fn distinct<'a>(events: &'a [Event], field: impl Fn(&'a Event) -> Option<&'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for v in events.iter().filter_map(field) {
        if !v.is_empty() && !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The evidence document of one rotation of job `name`, with the result of
/// checking the chain it rests on.
pub async fn gather(
    client: &Client,
    name: &str,
    rotation_id: Option<i64>,
    checked: &check::Checked,
) -> Result<Value, Error> {
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .ctx(|| "setting the report's time zone".into())?;
    let rot = rotation(client, name, rotation_id).await?;
    let id = rot["rotation_id"].as_i64();
    let events: Vec<Event> = match check::table_events(client, name).await? {
        Ok(all) => all
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| e.body.rotation_id == id)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut job_ids: Vec<i64> = events.iter().filter_map(|e| e.body.job_id).collect();
    job_ids.extend(rot["job_id"].as_i64());
    job_ids.sort_unstable();
    job_ids.dedup();
    let jobs = jobs(client, &rot, &job_ids).await?;
    let (old, new) = (rot["old_key"].as_i64(), rot["new_key"].as_i64());
    let new_fp = rot["new_fingerprint"]
        .as_str()
        .map(str::to_string)
        .or_else(|| fingerprint_in(&jobs, new));
    let first = events.first().map(|e| e.body.timestamp.clone());
    let steps: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let b = &e.body;
            let since = |t: Option<&String>| t.and_then(|t| seconds_between(t, &b.timestamp));
            json!({
                "seq": b.seq,
                "step": b.event_type,
                "at": b.timestamp,
                "operator": b.operator,
                "verification_status": b.verification_status,
                "affected_records": b.affected_records,
                "job_id": b.job_id,
                "detail": b.detail,
                "seconds_since_previous_step": since(i.checked_sub(1).map(|p| &events[p].body.timestamp)),
                "seconds_since_start": since(first.as_ref()),
            })
        })
        .collect();
    let full_verify = events
        .iter()
        .rev()
        .find(|e| matches!(e.body.event_type.as_str(), "key_retired" | "retire_refused"))
        .map_or_else(
            || json!({ "done": false, "why": format!("the rotation is at step {}; the full verify runs when the old key is retired, after the grace period", rot["step"].as_str().unwrap_or("?")) }),
            |e| json!({
                "done": true,
                "at": e.body.timestamp,
                "passed": e.body.verification_status == "passed",
                "values_checked_or_left": e.body.affected_records,
                "detail": e.body.detail,
                "event_hash": e.hash,
            }),
        );
    Ok(json!({
        "report": "rekey rotation evidence",
        "report_version": 1,
        "generated_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "job": name,
        "rotation_id": id,
        "step": rot["step"],
        "who": distinct(&events, |e| Some(e.body.operator.as_str())),
        "started_by": rot["operator"],
        "why": rot["reason"],
        "incident_id": distinct(&events, |e| e.body.incident_id.as_deref()),
        "notes": distinct(&events, |e| e.body.notes.as_deref()),
        "when": {
            "started_at": rot["started_at"],
            "promoted_at": rot["promoted_at"],
            "finished_at": rot["finished_at"],
            "first_event_at": first,
            "last_event_at": events.last().map(|e| e.body.timestamp.clone()),
        },
        "secret_id": rot["secret_id"],
        "keys": {
            "old": { "id": old, "fingerprint": fingerprint_in(&jobs, old) },
            "new": { "id": new, "fingerprint": new_fp },
        },
        "grace_s": rot["grace_s"],
        "steps": steps,
        "reencryption_jobs": jobs.iter().map(|j| { let mut j = j.clone(); if let Some(o) = j.as_object_mut() { o.remove("keys"); } j }).collect::<Vec<_>>(),
        "final_full_verify": full_verify,
        "chain": checked,
        "rotation_record": rot,
        "events": events,
    }))
}
