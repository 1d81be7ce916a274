//! Rotations in `rekey.rotations`: where each job's key rotation stands, so
//! a later invocation continues from the step the last one reached.

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::error::DbContext;
use crate::Error;

/// The step a rotation has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The new key is pending; values are not yet rewritten.
    Staged,
    /// Every value was rewritten under the new key.
    Ran,
    /// Verification found nothing on an old key.
    Verified,
    /// The new key is current; the old one is previous.
    Promoted,
    /// The old key is retired: the rotation is over.
    Retired,
    /// The rotation was rolled back: over.
    RolledBack,
    /// `rotate --abort`: the staged key is un-staged and values are being
    /// rewritten back to the old key; ends as rolled back.
    Aborting,
}

impl Step {
    /// The word stored in `rekey.rotations.step`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Staged => "staged",
            Step::Ran => "ran",
            Step::Verified => "verified",
            Step::Promoted => "promoted",
            Step::Retired => "retired",
            Step::RolledBack => "rolled_back",
            Step::Aborting => "aborting",
        }
    }

    fn stored(word: &str) -> Result<Step, Error> {
        Ok(match word {
            "staged" => Step::Staged,
            "ran" => Step::Ran,
            "verified" => Step::Verified,
            "promoted" => Step::Promoted,
            "retired" => Step::Retired,
            "rolled_back" => Step::RolledBack,
            "aborting" => Step::Aborting,
            other => return Err(Error::Runtime(format!("rekey.rotations holds step {other:?}, which rekey never writes; the engine state was edited by hand"))),
        })
    }
}

/// One row of `rekey.rotations`.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// `rotation_id`.
    pub id: i64,
    /// Where it stands.
    pub step: Step,
    /// The key that was current when it started, if any.
    pub old_key: Option<KeyId>,
    /// The key it rotates to.
    pub new_key: KeyId,
    /// Seconds the old key stays after promotion.
    pub grace_s: i64,
    /// When the new key was promoted (Unix seconds).
    pub promoted_at_s: Option<i64>,
    /// The staged key's fingerprint, once known.
    pub new_fingerprint: Option<String>,
    /// Why it was started (the compromise reason changes the procedure).
    pub reason: String,
    /// Promoted over values an application wrote behind its run under the
    /// old key: a catch-up run is due, and the retire waits for it.
    pub catch_up_due: bool,
}

/// The last rotation of a job that is over.
#[derive(Debug, Clone)]
pub struct Finished {
    /// `rotation_id`.
    pub id: i64,
    /// Retired or rolled back.
    pub step: Step,
    /// The key it rotated to.
    pub new_key: KeyId,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// The key it rotated from.
    pub old_key: Option<KeyId>,
    /// Seconds its old key stayed after promotion.
    pub grace_s: i64,
}

/// What a new rotation records.
#[derive(Debug, Clone, Copy)]
pub struct NewRotation<'a> {
    /// The job.
    pub job_name: &'a str,
    /// Why (scheduled, emergency, compromise).
    pub reason: &'a str,
    /// Who.
    pub operator: &'a str,
    /// The incident it answers, if said.
    pub incident_id: Option<&'a str>,
    /// The operator's notes, if any.
    pub notes: Option<&'a str>,
    /// The store, never a value.
    pub secret_id: &'a str,
    /// The current key now.
    pub old_key: Option<KeyId>,
    /// The staged key.
    pub new_key: KeyId,
    /// Seconds the old key stays after promotion.
    pub grace_s: i64,
    /// The staged key's fingerprint, when rekey can read it back.
    pub new_fingerprint: Option<&'a str>,
}

/// The rotation of job `name` still in progress, if any.
pub async fn open_rotation(client: &Client, name: &str) -> Result<Option<Rotation>, Error> {
    let row = client
        .query_opt(
            // through jsonb: `--dry-run` reads a schema from before catch_up_due
            "SELECT rotation_id, step, old_key, new_key, grace_s, floor(extract(epoch FROM promoted_at))::bigint, new_fingerprint, reason,
                    coalesce((to_jsonb(r) ->> 'catch_up_due')::boolean, false)
               FROM rekey.rotations r WHERE job_name = $1 AND step NOT IN ('retired', 'rolled_back')",
            &[&name],
        )
        .await
        .ctx(|| "reading the rotation in progress".into())?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Rotation {
        id: r.get(0),
        step: Step::stored(r.get(1))?,
        old_key: r.get::<_, Option<i64>>(2).map(key).transpose()?,
        new_key: key(r.get(3))?,
        grace_s: r.get(4),
        promoted_at_s: r.get(5),
        new_fingerprint: r.get(6),
        reason: r.get(7),
        catch_up_due: r.get(8),
    }))
}

/// The rotations of other jobs than `name` on the same store
/// (`secret_id`) away from key `old` that have not promoted yet: (job,
/// rotation id, step). Their tables still hold values under it, which this
/// job's verify never reads; and those promoted that still owe the run
/// over values written behind them. (One promoted with none owed has
/// verified its own tables; two jobs at that step may each retire, or
/// neither could.)
pub async fn others_away_from(
    client: &Client,
    name: &str,
    secret_id: &str,
    old: i64,
) -> Result<Vec<(String, i64, String)>, Error> {
    // a job without a name is "rekey" to its runs and "" to its rotations
    let names: Vec<&str> = if name == "rekey" {
        vec![name, ""]
    } else {
        vec![name]
    };
    let rows = client
        .query(
            "SELECT job_name, rotation_id, step FROM rekey.rotations r
              WHERE job_name <> ALL ($1) AND secret_id = $2 AND old_key = $3
                AND (step IN ('staged', 'ran', 'verified', 'aborting')
                     OR (step = 'promoted' AND coalesce((to_jsonb(r) ->> 'catch_up_due')::boolean, false)))
              ORDER BY rotation_id",
            &[&names, &secret_id, &old],
        )
        .await
        .ctx(|| "reading the other jobs' rotations on the same store".into())?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The rotations of other jobs than `name` (as rotations record it: ""
/// for a job without a name) on the same store (`secret_id`) that have
/// staged a key and not promoted it yet, or are giving it up: (job,
/// rotation id, the key staged, step).
pub async fn others_staged(
    client: &Client,
    name: &str,
    secret_id: &str,
) -> Result<Vec<(String, i64, KeyId, Step)>, Error> {
    let rows = client
        .query(
            "SELECT job_name, rotation_id, new_key, step FROM rekey.rotations
              WHERE job_name <> $1 AND secret_id = $2 AND step IN ('staged', 'ran', 'verified', 'aborting')
              ORDER BY rotation_id",
            &[&name, &secret_id],
        )
        .await
        .ctx(|| "reading the other jobs' rotations on the same store".into())?;
    rows.iter()
        .map(|r| {
            let step: String = r.get(3);
            Ok((r.get(0), r.get(1), key(r.get(2))?, Step::stored(&step)?))
        })
        .collect()
}

/// A key id read back from `rekey.rotations`.
fn key(v: i64) -> Result<KeyId, Error> {
    KeyId::try_from(v).map_err(|_| {
        Error::Runtime(format!(
            "rekey.rotations holds key id {v}, which is not a key id"
        ))
    })
}

/// Whether rotation `rotation_id`, ended by a rollback outside an abort,
/// still owes the rewrite of its values back to the old key: no run of the
/// job (`job`, as `rekey.jobs` names it) begun after the rollback has
/// finished writing every target under the old key with no value left
/// behind (quarantined or not rotated). Only where values do not show their
/// key is this asked.
pub async fn rewrite_back_unproven(
    client: &Client,
    rotation_id: i64,
    job: &str,
) -> Result<bool, Error> {
    let row = client
        .query_one(
            // through jsonb: `--dry-run` reads a schema from before rewrite_back_due
            "SELECT coalesce((to_jsonb(r) ->> 'rewrite_back_due')::boolean, false) AND NOT EXISTS (
                        SELECT 1 FROM rekey.jobs j
                         WHERE j.name = $2 AND j.state = 'done' AND j.started_at > r.finished_at
                           AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(j.keys) t
                                            WHERE (t->'write'->>'target')::bigint IS DISTINCT FROM r.old_key)
                           AND NOT EXISTS (SELECT 1 FROM rekey.quarantine q WHERE q.job_id = j.job_id)
                           AND NOT EXISTS (SELECT 1 FROM rekey.not_rotated n WHERE n.job_id = j.job_id))
               FROM rekey.rotations r WHERE r.rotation_id = $1",
            &[&rotation_id, &job],
        )
        .await
        .ctx(|| format!("reading whether rotation {rotation_id}'s values were rewritten back"))?;
    Ok(row.get(0))
}

/// Whether a rotation of job `name` promoted key `key` (rekey promotes
/// only on its proof: in the layouts where applications then read only the
/// new key, a full verify put every value under it).
pub async fn promoted_to(client: &Client, name: &str, key: KeyId) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM rekey.rotations
                             WHERE job_name = $1 AND new_key = $2 AND step IN ('promoted', 'retired'))",
            &[&name, &i64::from(key)],
        )
        .await
        .ctx(|| format!("reading whether a rotation promoted key {key}"))?;
    Ok(row.get(0))
}

/// The most recent rotation of job `name` that is over, if any.
pub async fn last_finished(client: &Client, name: &str) -> Result<Option<Finished>, Error> {
    let row = client
        .query_opt(
            "SELECT rotation_id, step, new_key, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    old_key, grace_s
               FROM rekey.rotations WHERE job_name = $1 AND step IN ('retired', 'rolled_back')
              ORDER BY rotation_id DESC LIMIT 1",
            &[&name],
        )
        .await
        .ctx(|| "reading the last rotation".into())?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Finished {
        id: r.get(0),
        step: Step::stored(r.get(1))?,
        new_key: key(r.get(2))?,
        finished_at: r
            .get::<_, Option<String>>(3)
            .unwrap_or_else(|| "an unrecorded time".into()),
        old_key: r.get::<_, Option<i64>>(4).map(key).transpose()?,
        grace_s: r.get(5),
    }))
}

/// Sets how long rotation `id` keeps its old key after promotion.
pub async fn set_grace(client: &Client, id: i64, grace_s: i64) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET grace_s = $2, updated_at = now() WHERE rotation_id = $1",
            &[&id, &grace_s],
        )
        .await
        .ctx(|| "recording the grace period".into())?;
    Ok(())
}

/// Turns rotation `id` into a compromise rotation (for `reason`): no grace
/// period; an incident and notes given with the switch replace its own.
pub async fn set_compromised(
    client: &Client,
    id: i64,
    reason: &str,
    incident_id: Option<&str>,
    notes: Option<&str>,
) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET reason = $2, grace_s = 0, updated_at = now(),
                    incident_id = coalesce($3, incident_id), notes = coalesce($4, notes)
              WHERE rotation_id = $1",
            &[&id, &reason, &incident_id, &notes],
        )
        .await
        .ctx(|| "recording the compromise".into())?;
    Ok(())
}

/// Ends the rotation of job `name` that is waiting to retire key `old`,
/// once that key was retired outside `rekey rotate` (`rekey secrets
/// retire`); true when there was one.
pub async fn old_key_retired(client: &Client, name: &str, old: KeyId) -> Result<bool, Error> {
    let n = client
        .execute(
            "UPDATE rekey.rotations SET step = 'retired', finished_at = now(), updated_at = now()
              WHERE job_name = $1 AND old_key = $2 AND step = 'promoted'",
            &[&name, &i64::from(old)],
        )
        .await
        .ctx(|| "recording the retirement in the rotation".into())?;
    Ok(n > 0)
}

/// Records a rotation that has just staged its key.
pub async fn start_rotation(client: &Client, r: &NewRotation<'_>) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO rekey.rotations (job_name, step, reason, operator, secret_id, old_key, new_key, grace_s, new_fingerprint,
                                          incident_id, notes)
             VALUES ($1, 'staged', $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[&r.job_name, &r.reason, &r.operator, &r.secret_id, &r.old_key.map(i64::from), &i64::from(r.new_key), &r.grace_s, &r.new_fingerprint,
              &r.incident_id, &r.notes],
        )
        .await
        .ctx(|| "recording the rotation".into())?;
    Ok(())
}

/// Moves rotation `id` to `step` (promotion and the end are timestamped).
/// A catch-up run stays due through promotion; any other step clears it.
pub async fn set_step(client: &Client, id: i64, step: Step) -> Result<(), Error> {
    let word = step.as_str();
    client
        .execute(
            "UPDATE rekey.rotations SET step = $2, updated_at = now(),
                    catch_up_due = catch_up_due AND $2 = 'promoted',
                    promoted_at = CASE WHEN $2 = 'promoted' THEN now() ELSE promoted_at END,
                    finished_at = CASE WHEN $2 IN ('retired', 'rolled_back') THEN now() ELSE finished_at END
              WHERE rotation_id = $1",
            &[&id, &word],
        )
        .await
        .ctx(|| format!("recording rotation step {word}"))?;
    Ok(())
}

/// Moves rotation `id` to verified over values written behind its run: a
/// catch-up run is due after promotion (one statement, so no crash leaves
/// the one without the other).
pub async fn verified_with_catch_up_due(client: &Client, id: i64) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET step = 'verified', catch_up_due = true, updated_at = now() WHERE rotation_id = $1",
            &[&id],
        )
        .await
        .ctx(|| "recording the catch-up run due".into())?;
    Ok(())
}

/// Records that rotation `id`'s catch-up run left nothing on an old key.
pub async fn caught_up(client: &Client, id: i64) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET catch_up_due = false, updated_at = now() WHERE rotation_id = $1",
            &[&id],
        )
        .await
        .ctx(|| "recording the catch-up run".into())?;
    Ok(())
}

/// Records the staged key's fingerprint once it can be read.
pub async fn set_fingerprint(client: &Client, id: i64, fingerprint: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET new_fingerprint = $2 WHERE rotation_id = $1",
            &[&id, &fingerprint],
        )
        .await
        .ctx(|| "recording the staged key's fingerprint".into())?;
    Ok(())
}

/// Ends job `name`'s rotation in progress as rolled back.
pub async fn roll_back(client: &Client, name: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET step = 'rolled_back', rewrite_back_due = true, finished_at = now(), updated_at = now()
              WHERE job_name = $1 AND step NOT IN ('retired', 'rolled_back')",
            &[&name],
        )
        .await
        .ctx(|| "recording the rollback".into())?;
    Ok(())
}
