//! The audit chain: an event's canonical form, its SHA-256 link to the
//! event before it, and the checks `rekey report --check` runs over the
//! rows of `rekey.audit` and the lines of the JSON file. Pure: no I/O.
//!
//! An event's `hash` is the SHA-256 (ring) of its [`Body`] serialized as
//! JSON, fields in declaration order, `prev_hash` included; the first event
//! of a chain links to [`GENESIS`]. One chain per job name; `seq` numbers
//! its events from 1. Editing an event breaks its own hash; deleting or
//! reordering one breaks `seq` and the next event's link; the file and the
//! table must hold the same events, each file holding at least every event
//! recorded as written to it (`written_to`). Deleting the newest events of
//! both copies at once is the one change a chain alone cannot show: keep
//! the JSON file where the database's administrators cannot write.
//!
//! A crash leaves differences that are not tampering. An event's intent
//! (its chain, place and hash, in `rekey.audit_intents`) commits before its
//! line is written, and its line is synced before the event commits, so a
//! process killed between the line and the commit leaves a line past the
//! table's last event, linked to it, with an intent naming it
//! ([`intended`]): the next event recorded (or [`super::audit::Audit::settle`])
//! inserts it into the table as it was written ([`super::audit`]). Until
//! then the check names it, and says so; it cannot tell it from the
//! table's newest event deleted with its intent left behind. A line no
//! intent names was not written by rekey, however well it is chained (the
//! hash is plain SHA-256 of fields anyone can read): it is never recorded,
//! and the check names it as an event missing from the table. A line cut
//! short by a crash inside its write is counted, not read: it never
//! committed, and an event of the table cut down to a fragment is still
//! missing from the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::KeyId;
use crate::Error;

/// What the first event of a chain links to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event as hashed: every field but the hash itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// What happened: key_staged, run_completed, verification_passed, ...
    pub event_type: String,
    /// When (UTC, RFC 3339 with microseconds, the database's clock).
    pub timestamp: String,
    /// The store and key id concerned (never the value).
    pub secret_id: String,
    /// Who ran it.
    pub operator: String,
    /// Why: scheduled, scheduled_annual, emergency, compromise, ...
    pub reason: String,
    /// The incident it answers (`--incident`).
    pub incident_id: Option<String>,
    /// passed, failed, pending, not_applicable.
    pub verification_status: String,
    /// Values re-encrypted or checked, where that applies.
    pub affected_records: Option<u64>,
    /// The key values move away from (id, never material).
    pub old_key: Option<KeyId>,
    /// The key values move to (id, never material).
    pub new_key: Option<KeyId>,
    /// The operator's notes (`--notes`).
    pub notes: Option<String>,
    /// What rekey says about the event.
    pub detail: String,
    /// The `rekey.jobs` row concerned, if any.
    pub job_id: Option<i64>,
    /// The `rekey.rotations` row concerned, if any.
    pub rotation_id: Option<i64>,
    /// The chain: the job's name.
    pub chain: String,
    /// The event's place in its chain, from 1.
    pub seq: i64,
    /// Where its JSON line was written: host and path.
    pub written_to: String,
    /// The hash of the event before it ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// The database it was recorded in (`rekey.identity`); absent from
    /// events recorded before databases had one, which hash as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

/// One audit event: its body and the hash that seals it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Everything hashed.
    #[serde(flatten)]
    pub body: Body,
    /// SHA-256 (hex) of the body's canonical form.
    pub hash: String,
}

impl Body {
    /// SHA-256 (hex) of the canonical form.
    pub fn digest(&self) -> String {
        // a struct of strings and integers always serializes
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &canonical))
    }

    /// The event sealed with its hash.
    pub fn sealed(self) -> Event {
        Event {
            hash: self.digest(),
            body: self,
        }
    }
}

impl Event {
    /// The JSON line written to the file.
    pub fn line(&self) -> Result<String, Error> {
        serde_json::to_string(self)
            .map_err(|e| Error::Runtime(format!("encoding an audit event: {e}")))
    }

    /// Whether the hash seals the body as it is.
    pub fn intact(&self) -> bool {
        self.body.digest() == self.hash
    }
}

/// The first event found broken, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Where it is: `rekey.audit (audit_id 12)`, or `<file> line 7`.
    pub place: String,
    /// Its place in the chain, when known.
    pub seq: Option<i64>,
    /// Its type, when known.
    pub event_type: Option<String>,
    /// What is wrong.
    pub why: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.place)?;
        if let Some(seq) = self.seq {
            write!(f, ", event {seq}")?;
        }
        if let Some(t) = &self.event_type {
            write!(f, " ({t})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// Checks one chain's events as stored, ordered by `seq`, each with where it
/// is stored (for the message); the number of events on success.
pub fn check_chain(events: &[(Event, String)]) -> Result<usize, Broken> {
    let mut prev: Option<&Event> = None;
    for (e, place) in events {
        let broken = |why: String| Broken {
            place: place.clone(),
            seq: Some(e.body.seq),
            event_type: Some(e.body.event_type.clone()),
            why,
        };
        if !e.intact() {
            return Err(broken(
                "its content does not match its hash: the event was edited".into(),
            ));
        }
        let expected = prev.map_or(1, |p| p.body.seq + 1);
        if e.body.seq > expected {
            let missing = if e.body.seq == expected + 1 {
                format!("event {expected} is missing")
            } else {
                format!("events {expected} to {} are missing", e.body.seq - 1)
            };
            return Err(broken(format!("{missing} before it: deleted")));
        }
        if e.body.seq < expected {
            return Err(broken(format!(
                "it comes after event {}: reordered",
                expected - 1
            )));
        }
        let link = prev.map_or(GENESIS, |p| p.hash.as_str());
        if e.body.prev_hash != link {
            return Err(broken(
                "its link does not match the hash of the event before it: an event before it was replaced".into(),
            ));
        }
        prev = Some(e);
    }
    Ok(events.len())
}

/// The start of every line rekey writes: what tells a line cut short by a
/// crash from any other text.
const LINE_START: &str = "{\"event_type\":";

/// Whether `line`, not JSON, is the start of a line rekey was writing when
/// it stopped (killed inside the write, or the machine lost power before
/// the sync): a line is appended whole or in part, never edited.
fn cut_short(line: &str) -> bool {
    line.starts_with(LINE_START) && serde_json::from_str::<serde_json::Value>(line).is_err()
}

/// An intent: the event a process was about to write, as committed in
/// `rekey.audit_intents` before its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The chain.
    pub chain: String,
    /// The event's place in it.
    pub seq: i64,
    /// The event's hash.
    pub hash: String,
    /// Where its line goes: host and path.
    pub written_to: String,
}

/// The line of the JSON lines file `text` that holds the event `intent`
/// names, when it is the one rekey wrote and the next event of chain
/// `intent.chain` in database `database` past the table's last event
/// `head` (`seq`, `hash`; `None` for an empty chain): as rekey writes it,
/// sealed by its hash, linked to `head`. A process stopped after syncing
/// it and before its commit left it out of the table. Any other line, a
/// well-chained one included, is not rekey's to record.
pub fn intended(
    text: &str,
    intent: &Intent,
    database: Option<&str>,
    head: Option<(i64, &str)>,
) -> Option<Event> {
    let (seq, hash) = head.unwrap_or((0, GENESIS));
    if intent.seq != seq + 1 {
        // its place was taken: it never committed, and never will
        return None;
    }
    text.lines()
        .filter(|l| l.contains(intent.hash.as_str()))
        .filter_map(|l| serde_json::from_str::<Event>(l).ok().map(|e| (l, e)))
        .find(|(line, e)| {
            let b = &e.body;
            e.hash == intent.hash
                && b.chain == intent.chain
                && b.seq == intent.seq
                && b.written_to == intent.written_to
                && b.prev_hash == hash
                && b.database.as_deref() == database
                && e.intact()
                && e.line().ok().as_deref() == Some(*line)
        })
        .map(|(_, e)| e)
}

/// What a JSON lines file holds of one chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileChecked {
    /// Chained events of the chain checked.
    pub events: usize,
    /// Lines cut short by a crash inside their write ([`cut_short`]): never
    /// committed, not checked.
    pub cut_short: usize,
    /// Lines written before the chain existed (no hash), not checked.
    pub unchained: usize,
    /// Lines of other chains (another job sharing the file), not checked.
    pub other_chains: usize,
    /// Lines of this chain recorded in another database (the file serves
    /// several), not checked.
    pub other_databases: usize,
}

/// Checks the lines of a JSON audit file for chain `chain` against the
/// events of the table (`table`, already checked by [`check_chain`]) of
/// database `database`: every line as rekey wrote it and sealed by its
/// hash, in the chain's order, the same event as the table's at its place,
/// and no event of the table that was written to this file (`written_to`,
/// or the destination of any line compared) missing from it. Lines another
/// database recorded are counted and left out, and so are lines cut short
/// by a crash. `intents`: the chain's intents not yet settled, which tell
/// a line a stopped rekey left from one appended by someone else.
pub fn check_file(
    name: &str,
    text: &str,
    chain: &str,
    table: &[Event],
    database: Option<&str>,
    written_to: &str,
    intents: &[Intent],
) -> Result<FileChecked, Broken> {
    let by_seq: BTreeMap<i64, &Event> = table.iter().map(|e| (e.body.seq, e)).collect();
    let mut seen = FileChecked::default();
    // a line retagged as another database's must not take its event out of the check
    let mut destinations = BTreeSet::from([written_to.to_string()]);
    let mut in_file = BTreeSet::new();
    let mut last: Option<i64> = None;
    // where the table ends: a line past it linked to it may have been
    // written by a process stopped before its commit, and so may one
    // linked to that line
    let tip = table
        .last()
        .map_or((0, GENESIS.to_string()), |e| (e.body.seq, e.hash.clone()));
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let place = format!("{name} line {}", n + 1);
        let broken = |seq: Option<i64>, t: Option<&str>, why: &str| Broken {
            place: place.clone(),
            seq,
            event_type: t.map(str::to_string),
            why: why.to_string(),
        };
        if cut_short(line) {
            seen.cut_short += 1;
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|_| broken(None, None, "not a JSON object: the line was edited"))?;
        if value.get("hash").is_none() && value.get("seq").is_none() {
            seen.unchained += 1;
            continue;
        }
        let event: Event = serde_json::from_value(value).map_err(|e| {
            broken(
                None,
                None,
                &format!("not an audit event ({e}): the line was edited"),
            )
        })?;
        let (seq, t) = (Some(event.body.seq), Some(event.body.event_type.as_str()));
        if event.body.chain != chain {
            seen.other_chains += 1;
            continue;
        }
        if event.line().ok().as_deref() != Some(line) || !event.intact() {
            return Err(broken(
                seq,
                t,
                "its content does not match its hash: the line was edited",
            ));
        }
        if event.body.database.is_some() && event.body.database.as_deref() != database {
            // sealed as recorded: the table it matches is another database's
            seen.other_databases += 1;
            continue;
        }
        if last.is_some_and(|l| event.body.seq <= l) {
            return Err(broken(
                seq,
                t,
                "it comes after a later event: the lines were reordered",
            ));
        }
        match by_seq.get(&event.body.seq) {
            None if event.body.seq == tip.0 + 1
                && event.body.prev_hash == tip.1
                && intents
                    .iter()
                    .any(|i| i.seq == event.body.seq && i.hash == event.hash) =>
            {
                return Err(broken(
                    seq,
                    t,
                    "rekey.audit has no event at this place, and the line links to its last event: rekey stopped \
                     between writing this line and committing the event (its intent is recorded: the next rekey \
                     command of this job records it; check again then), or the event was deleted from the table",
                ))
            }
            None if event.body.seq == tip.0 + 1
                && event.body.prev_hash == tip.1
                && destinations.contains(&event.body.written_to) =>
            {
                return Err(broken(
                    seq,
                    t,
                    "rekey.audit has no event at this place, and no intent of rekey's names this line, though it \
                     links to the table's last event: it was appended to the file by someone other than rekey (rekey \
                     never records such a line), or the event was deleted from the table",
                ))
            }
            None => {
                return Err(broken(
                    seq,
                    t,
                    "rekey.audit has no event at this place: it was deleted from the table",
                ))
            }
            Some(row) if row.hash != event.hash && row.body.prev_hash == event.body.prev_hash => {
                return Err(broken(
                    seq,
                    t,
                    if event.body.database.is_none() {
                        "rekey.audit holds another event at this place, after the same event before it: one of them \
                         was replaced, or this line is another database's, recorded before events named their database \
                         (a file that served several databases then cannot be checked line by line against one: \
                         keep it as it is and give each database an audit log of its own from now, with --audit-log)"
                    } else {
                        "rekey.audit holds another event at this place, after the same event before it: one of them \
                         was replaced, or this file also serves a copy of this database (a backup restored, a snapshot: \
                         a copy keeps the database's audit identity); give each copy an audit log of its own (--audit-log)"
                    },
                ))
            }
            Some(row) if row.hash != event.hash => {
                return Err(broken(
                    seq,
                    t,
                    "rekey.audit holds another event at this place: one of them was replaced",
                ))
            }
            Some(_) => {}
        }
        last = Some(event.body.seq);
        destinations.insert(event.body.written_to.clone());
        in_file.insert(event.body.seq);
        seen.events += 1;
    }
    if let Some(missing) = table
        .iter()
        .find(|e| destinations.contains(&e.body.written_to) && !in_file.contains(&e.body.seq))
    {
        return Err(Broken {
            place: name.to_string(),
            seq: Some(missing.body.seq),
            event_type: Some(missing.body.event_type.clone()),
            why: "rekey.audit records it as written to this file, but the file does not hold it: deleted from the file".into(),
        });
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(n: i64) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for seq in 1..=n {
            let body = Body {
                event_type: format!("step_{seq}"),
                timestamp: "2026-12-03T10:00:00.000000Z".into(),
                secret_id: "file:k.toml#2".into(),
                operator: "alice".into(),
                reason: "scheduled_annual".into(),
                incident_id: None,
                verification_status: "passed".into(),
                affected_records: Some(seq as u64),
                old_key: Some(1),
                new_key: Some(2),
                notes: Some("Annual rotation per policy".into()),
                detail: String::new(),
                job_id: None,
                rotation_id: Some(1),
                chain: "patients".into(),
                seq,
                written_to: "h:/a.jsonl".into(),
                prev_hash: out.last().map_or(GENESIS.into(), |e| e.hash.clone()),
                database: None,
            };
            out.push(body.sealed());
        }
        out
    }

    fn placed(events: &[Event]) -> Vec<(Event, String)> {
        events
            .iter()
            .map(|e| (e.clone(), format!("row {}", e.body.seq)))
            .collect()
    }

    fn file_of(events: &[Event]) -> String {
        events.iter().map(|e| e.line().unwrap() + "\n").collect()
    }

    #[test]
    fn an_intact_chain_checks() {
        let c = chain_of(4);
        assert_eq!(check_chain(&placed(&c)), Ok(4));
        let checked = check_file(
            "f",
            &format!("{{\"event_type\":\"old\"}}\n{}", file_of(&c)),
            "patients",
            &c,
            None,
            "",
            &[],
        )
        .unwrap();
        assert_eq!((checked.events, checked.unchained), (4, 1));
    }

    #[test]
    fn an_edit_a_deletion_and_a_swap_are_each_named() {
        let c = chain_of(4);
        let mut edited = c.clone();
        edited[1].body.affected_records = Some(99);
        assert_eq!(check_chain(&placed(&edited)).unwrap_err().seq, Some(2));
        let mut deleted = c.clone();
        deleted.remove(2);
        let err = check_chain(&placed(&deleted)).unwrap_err();
        assert_eq!(err.seq, Some(4));
        assert!(err.why.contains("event 3 is missing"), "{err}");
        let mut swapped = c.clone();
        swapped.swap(1, 2);
        assert!(check_chain(&placed(&swapped)).is_err());
        // resealed after an edit: the next link names it
        let mut resealed = c.clone();
        resealed[1].body.operator = "mallory".into();
        resealed[1] = resealed[1].body.clone().sealed();
        assert_eq!(check_chain(&placed(&resealed)).unwrap_err().seq, Some(3));
    }

    #[test]
    fn an_event_without_a_database_hashes_as_events_did_before_databases_had_one() {
        let c = chain_of(1);
        let line = c[0].line().unwrap();
        // the canonical form, field for field, as events were hashed before
        let canonical = format!(
            "{{\"event_type\":\"step_1\",\"timestamp\":\"2026-12-03T10:00:00.000000Z\",\"secret_id\":\"file:k.toml#2\",\
             \"operator\":\"alice\",\"reason\":\"scheduled_annual\",\"incident_id\":null,\"verification_status\":\"passed\",\
             \"affected_records\":1,\"old_key\":1,\"new_key\":2,\"notes\":\"Annual rotation per policy\",\"detail\":\"\",\
             \"job_id\":null,\"rotation_id\":1,\"chain\":\"patients\",\"seq\":1,\"written_to\":\"h:/a.jsonl\",\
             \"prev_hash\":\"{GENESIS}\"}}"
        );
        assert_eq!(serde_json::to_string(&c[0].body).unwrap(), canonical);
        assert!(!line.contains("database"), "{line}");
        let mut named = c[0].body.clone();
        named.database = Some("db-a".into());
        assert_ne!(
            named.digest(),
            c[0].hash,
            "the database is sealed with the event"
        );
    }

    #[test]
    fn another_databases_lines_are_counted_not_compared_and_a_fork_is_named() {
        let ours = chain_of(2);
        let mut theirs = chain_of(2);
        // resealed in order, each linking to the one before
        let mut prev = GENESIS.to_string();
        for e in theirs.iter_mut() {
            e.body.database = Some("db-b".into());
            e.body.operator = "bob".into();
            e.body.prev_hash = prev.clone();
            *e = e.body.clone().sealed();
            prev = e.hash.clone();
        }
        let mut ours_named = ours.clone();
        let mut prev = GENESIS.to_string();
        for e in ours_named.iter_mut() {
            e.body.database = Some("db-a".into());
            e.body.prev_hash = prev.clone();
            *e = e.body.clone().sealed();
            prev = e.hash.clone();
        }
        let text = format!("{}{}", file_of(&theirs), file_of(&ours_named));
        let checked = check_file(
            "f",
            &text,
            "patients",
            &ours_named,
            Some("db-a"),
            "h:/a.jsonl",
            &[],
        )
        .unwrap();
        assert_eq!((checked.events, checked.other_databases), (2, 2));
        // the same lines against a copy of db-a that kept its identity and
        // went its own way: a fork, named as such
        let copy: Vec<Event> = theirs
            .iter()
            .map(|e| {
                let mut b = e.body.clone();
                b.database = Some("db-a".into());
                b.sealed()
            })
            .collect();
        let err = check_file(
            "f",
            &text,
            "patients",
            &copy,
            Some("db-a"),
            "h:/a.jsonl",
            &[],
        )
        .unwrap_err();
        assert!(err.why.contains("a copy of this database"), "{err}");
        // a line of ours retagged as another database's and resealed: its event is missing
        let mut retagged = ours_named[1].body.clone();
        retagged.database = Some("db-z".into());
        let forged = format!(
            "{}{}{}",
            file_of(&theirs),
            file_of(&ours_named[..1]),
            file_of(&[retagged.sealed()])
        );
        let err = check_file(
            "f",
            &forged,
            "patients",
            &ours_named,
            Some("db-a"),
            "h:/a.jsonl",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.seq, Some(2), "{err}");
        assert!(err.why.contains("deleted from the file"), "{err}");
    }

    #[test]
    fn the_file_must_hold_the_tables_events_in_order() {
        let c = chain_of(3);
        let text = file_of(&c);
        let edited = text.replacen("\"affected_records\":2", "\"affected_records\":3", 1);
        assert_eq!(
            check_file("f", &edited, "patients", &c, None, "", &[])
                .unwrap_err()
                .seq,
            Some(2)
        );
        let lines: Vec<&str> = text.lines().collect();
        let dropped = format!("{}\n{}\n", lines[0], lines[2]);
        let err = check_file("f", &dropped, "patients", &c, None, "", &[]).unwrap_err();
        assert_eq!(err.seq, Some(2), "{err}");
        let swapped = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[1]);
        assert!(check_file("f", &swapped, "patients", &c, None, "", &[]).is_err());
        let err = check_file("f", &text, "patients", &c[..2], None, "", &[]).unwrap_err();
        assert_eq!(err.seq, Some(3), "{err}");
    }

    fn intent_of(e: &Event) -> Intent {
        Intent {
            chain: e.body.chain.clone(),
            seq: e.body.seq,
            hash: e.hash.clone(),
            written_to: e.body.written_to.clone(),
        }
    }

    #[test]
    fn a_line_past_the_table_is_recorded_only_where_an_intent_names_it() {
        let c = chain_of(3);
        let text = file_of(&c);
        let to = "h:/a.jsonl";
        // the table stopped at event 2: event 3 never committed
        let head = Some((2, c[1].hash.as_str()));
        let intent = intent_of(&c[2]);
        assert_eq!(intended(&text, &intent, None, head), Some(c[2].clone()));
        // the check cannot tell it from the table's newest event deleted: it names both
        let err = check_file(
            "f",
            &text,
            "patients",
            &c[..2],
            None,
            to,
            std::slice::from_ref(&intent),
        )
        .unwrap_err();
        assert_eq!(err.seq, Some(3), "{err}");
        assert!(
            err.why.contains("rekey stopped") && err.why.contains("deleted from the table"),
            "{err}"
        );
        // an empty chain: its first event
        assert_eq!(
            intended(&file_of(&c[..1]), &intent_of(&c[0]), None, None),
            Some(c[0].clone())
        );
        // no line: the event never happened
        assert_eq!(intended(&file_of(&c[..2]), &intent, None, head), None);
        // not of another database, nor once its place is taken
        assert_eq!(intended(&text, &intent, Some("db-a"), head), None);
        assert_eq!(intended(&text, &intent, None, Some((3, &c[2].hash))), None);
        // a line chained to the head as well as rekey chains, but that no
        // intent names (anyone may append to the file): never recorded,
        // and the check names it as no crash of rekey's
        let mut forged = c[2].body.clone();
        forged.event_type = "key_retired".into();
        let forged = forged.sealed();
        let text = format!(
            "{}{}",
            file_of(&c[..2]),
            file_of(std::slice::from_ref(&forged))
        );
        assert_eq!(intended(&text, &intent, None, head), None);
        let err = check_file(
            "f",
            &text,
            "patients",
            &c[..2],
            None,
            to,
            std::slice::from_ref(&intent),
        )
        .unwrap_err();
        assert!(
            err.why
                .contains("appended to the file by someone other than rekey")
                && !err.why.contains("rekey stopped"),
            "{err}"
        );
        // ... nor before the line the intent names
        let both = format!("{}{}", text, file_of(&c[2..]));
        assert_eq!(intended(&both, &intent, None, head), Some(c[2].clone()));
        // not an edited line resealed, nor one rewritten in another form
        let edited = file_of(&c).replacen("\"affected_records\":3", "\"affected_records\":9", 1);
        assert_eq!(intended(&edited, &intent, None, head), None);
        let spaced = file_of(&c).replacen("\"seq\":3", "\"seq\": 3", 1);
        assert_eq!(intended(&spaced, &intent, None, head), None);
        // a line linked to something else
        let mut relinked = c[2].body.clone();
        relinked.prev_hash = c[0].hash.clone();
        let relinked = relinked.sealed();
        let text = format!(
            "{}{}",
            file_of(&c[..2]),
            file_of(std::slice::from_ref(&relinked))
        );
        assert_eq!(intended(&text, &intent_of(&relinked), None, head), None);
        let err = check_file("f", &text, "patients", &c[..2], None, to, &[]).unwrap_err();
        assert!(
            err.why.contains("deleted from the table") && !err.why.contains("rekey stopped"),
            "{err}"
        );
        // the table's last event deleted from the file is still named
        let err =
            check_file("f", &file_of(&c[..1]), "patients", &c[..2], None, to, &[]).unwrap_err();
        assert!(err.why.contains("deleted from the file"), "{err}");
    }

    #[test]
    fn a_line_cut_short_is_counted_and_the_event_it_held_is_still_missing() {
        let c = chain_of(3);
        let to = "h:/a.jsonl";
        let whole = c[2].line().unwrap();
        // cut short, then the next line on a line of its own
        let text = format!(
            "{}{}\n{}",
            file_of(&c[..2]),
            &whole[..whole.len() / 2],
            file_of(&c[2..])
        );
        let checked = check_file("f", &text, "patients", &c, None, to, &[]).unwrap();
        assert_eq!((checked.events, checked.cut_short), (3, 1));
        assert_eq!(
            intended(
                &text,
                &intent_of(&c[2]),
                None,
                Some((2, c[1].hash.as_str()))
            ),
            Some(c[2].clone())
        );
        // an event of the table cut down to a fragment: deleted from the file
        let cut = format!("{}{}\n", file_of(&c[..2]), &whole[..whole.len() / 2]);
        let err = check_file("f", &cut, "patients", &c, None, to, &[]).unwrap_err();
        assert_eq!(err.seq, Some(3), "{err}");
        assert!(err.why.contains("deleted from the file"), "{err}");
        // text that is not the start of a line rekey writes is an edit
        let junk = format!("{}not json\n", file_of(&c));
        assert!(check_file("f", &junk, "patients", &c, None, to, &[]).is_err());
    }
}
