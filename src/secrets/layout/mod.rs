//! Secret layouts: the shapes in which applications already read their keys,
//! turned into a [`KeyTable`] and back.
//!
//! - `env-json` ([`flat`]): a flat JSON object of environment names, in the
//!   versioned convention (`<P>_KEY_V<n>`, `<P>_CURRENT_VERSION`,
//!   `<P>_PENDING_VERSION` while staged) or the dual one (`<P>_KEY`,
//!   `<P>_KEY_NEW`); rekey touches only those members.
//! - `value`: the secret string is the key itself, the pending key in a
//!   second secret or the AWSPENDING version.
//!
//! Neither layout has room for what the lifecycle needs beside the keys (ids
//! for the dual and value layouts, creation times, states of keys no longer
//! in the content, the compromised marker): that is kept apart from what
//! applications read as [`Meta`], one short line the store keeps next to the
//! secret (a Secrets Manager tag). The content is the truth for which keys
//! applications read; the meta line only names and dates them, matched by
//! fingerprint, so a crash between writing the two loses nothing.
//! Pure: no I/O.

pub mod flat;

use crate::crypto::keyring::{encode_key, env, Key, KeyEncoding, KeyId};
use crate::crypto::keytable::{Entry, KeyState, KeyTable};
use flat::FlatDoc;
use zeroize::Zeroizing;

/// Why a secret's content does not fit its layout. Never carries material.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// `env-json` content that is not a flat JSON object.
    #[error("{0}")]
    Flat(#[from] flat::FlatError),
    /// A key or version member is wrong (named, never shown).
    #[error("{0}")]
    Env(#[from] env::EnvKeyError),
    /// `value` content that is not a key.
    #[error("{0}")]
    Value(String),
}

/// The encoding of a key as it is written: 64 hex characters are hex;
/// base64 with `-` or `_` is Fernet's urlsafe alphabet, with `+` or `/` the
/// standard one; base64 with neither (both decode it alike) is taken as
/// Fernet's for a Fernet job (what `Fernet.generate_key()` writes) and as
/// standard base64 otherwise, the alphabet every base64 decoder accepts.
pub fn detect_encoding(text: &str, fernet_job: bool) -> KeyEncoding {
    let t = text.trim();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        KeyEncoding::Hex
    } else if t.contains(['-', '_']) {
        KeyEncoding::Fernet
    } else if t.contains(['+', '/']) || !fernet_job {
        KeyEncoding::Base64
    } else {
        KeyEncoding::Fernet
    }
}

/// What rekey remembers of one key beside a layout's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaKey {
    /// The key's id.
    pub id: KeyId,
    /// Its state when last saved.
    pub state: KeyState,
    /// Fingerprint of its material.
    pub fingerprint: String,
    /// Created (Unix seconds; 0: unknown).
    pub created_at: u64,
    /// Marked compromised.
    pub compromised: bool,
}

/// The meta line: `id:state:fingerprint:created[:c]`, space-separated
/// (characters a Secrets Manager tag value allows), at most [`META_MAX`] long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// One per key, by id.
    pub keys: Vec<MetaKey>,
}

/// The longest meta line (a tag value's limit).
pub const META_MAX: usize = 256;

fn state_name(s: KeyState) -> &'static str {
    match s {
        KeyState::Pending => "pending",
        KeyState::Current => "current",
        KeyState::Previous => "previous",
        KeyState::Retired => "retired",
    }
}

impl Meta {
    /// Reads a meta line; parts that do not parse are skipped (the content stays the truth).
    pub fn parse(line: &str) -> Meta {
        let keys = line
            .split_whitespace()
            .filter_map(|item| {
                let mut p = item.split(':');
                let id = p.next()?.parse().ok()?;
                let state = match p.next()? {
                    "pending" => KeyState::Pending,
                    "current" => KeyState::Current,
                    "previous" => KeyState::Previous,
                    "retired" => KeyState::Retired,
                    _ => return None,
                };
                let fingerprint = p.next()?.to_string();
                let created_at = p.next()?.parse().ok()?;
                let compromised = p.next() == Some("c");
                Some(MetaKey {
                    id,
                    state,
                    fingerprint,
                    created_at,
                    compromised,
                })
            })
            .collect();
        Meta { keys }
    }

    /// The line for `table`, dropping the oldest retired keys while too long.
    pub fn of(table: &KeyTable) -> String {
        Self::of_known(table, &Meta { keys: Vec::new() })
    }

    /// As [`Meta::of`], keeping the fingerprints `known` recorded for keys
    /// whose material the table does not hold (an old key after promotion
    /// lives only in former versions: its fingerprint finds it there).
    pub fn of_known(table: &KeyTable, known: &Meta) -> String {
        let mut items: Vec<(bool, String)> = table
            .entries
            .iter()
            .map(|e| {
                let fp = e.key.as_ref().map(Key::fingerprint).unwrap_or_else(|| {
                    known
                        .keys
                        .iter()
                        .find(|m| m.id == e.id)
                        .map_or_else(|| "-".into(), |m| m.fingerprint.clone())
                });
                let c = if e.compromised { ":c" } else { "" };
                (
                    e.state == KeyState::Retired,
                    format!("{}:{}:{fp}:{}{c}", e.id, state_name(e.state), e.created_at),
                )
            })
            .collect();
        loop {
            let line = items
                .iter()
                .map(|(_, s)| s.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            if line.len() <= META_MAX {
                return line;
            }
            match items.iter().position(|(retired, _)| *retired) {
                Some(i) => drop(items.remove(i)),
                None => drop(items.remove(0)),
            }
        }
    }

    fn by_fingerprint(&self, key: &Key) -> Option<&MetaKey> {
        let fp = key.fingerprint();
        self.keys.iter().find(|m| m.fingerprint == fp)
    }
}

/// One key as a layout's content holds it.
pub struct Slot {
    /// The id the content gives it (versioned names), if any.
    pub id: Option<KeyId>,
    /// Current, pending, or (versioned) previous.
    pub state: KeyState,
    /// The key (its id is replaced by the one assembled).
    pub key: Key,
    /// When the store says it was written (Unix seconds; 0: unknown).
    pub written_at: u64,
}

/// The table of a layout's content, named and dated by `meta`: ids from the
/// content, else from the meta line by fingerprint, else 1 for the current
/// key and the next free id for a pending one. Keys the meta line knows but
/// the content no longer holds keep their ids, without material: previous
/// (or retired, as recorded).
pub fn assemble(slots: Vec<Slot>, meta: &Meta) -> KeyTable {
    let mut entries: Vec<Entry> = Vec::new();
    let mut order: Vec<&Slot> = slots.iter().collect();
    // the current key first, so a pending key without an id comes after it
    order.sort_by_key(|s| (s.state != KeyState::Current, s.state == KeyState::Pending));
    for s in order {
        // a pending key that is already the current one: a promote stopped
        // before it removed the pending copy; it is the same key, not a new one
        let again = entries.iter().any(|e| {
            e.key
                .as_ref()
                .is_some_and(|k| k.material() == s.key.material())
        });
        if again && s.state == KeyState::Pending {
            tracing::warn!(
                "the new key's place still holds the key that is now current (a promote was stopped before removing it); \
                 remove it, or let the next rotation replace it"
            );
            continue;
        }
        let m = meta.by_fingerprint(&s.key);
        let taken = |id: KeyId, entries: &Vec<Entry>| entries.iter().any(|e| e.id == id);
        let id =
            s.id.or_else(|| m.map(|m| m.id).filter(|id| !taken(*id, &entries)))
                .unwrap_or_else(|| {
                    let used = entries
                        .iter()
                        .map(|e| e.id)
                        .chain(meta.keys.iter().map(|m| m.id));
                    match (s.state, used.max()) {
                        (KeyState::Current, _) if !taken(1, &entries) && meta.keys.is_empty() => 1,
                        (_, max) => max.unwrap_or(0) % 255 + 1,
                    }
                });
        let created_at = m
            .map(|m| m.created_at)
            .filter(|t| *t != 0)
            .unwrap_or(s.written_at);
        entries.push(Entry {
            id,
            state: s.state,
            created_at,
            changed_at: created_at,
            key: Some(Key::new(id, *s.key.material())),
            compromised: m.is_some_and(|m| m.compromised),
        });
    }
    for m in &meta.keys {
        if entries.iter().any(|e| {
            e.id == m.id
                || e.key
                    .as_ref()
                    .is_some_and(|k| k.fingerprint() == m.fingerprint)
        }) {
            continue;
        }
        let state = match m.state {
            KeyState::Retired => KeyState::Retired,
            _ => KeyState::Previous,
        };
        entries.push(Entry {
            id: m.id,
            state,
            created_at: m.created_at,
            changed_at: m.created_at,
            key: None,
            compromised: m.compromised,
        });
    }
    entries.sort_by_key(|e| e.id);
    KeyTable { entries }
}

/// Whether an env-json object uses the versioned convention.
pub fn versioned(prefix: &str, names: &[String]) -> bool {
    let p = format!("{prefix}_KEY_V");
    names.iter().any(|n| {
        n.strip_prefix(&p)
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The keys of an env-json object, with the raw text of its current key (for
/// the encoding). `written_at` dates keys the meta line does not know.
pub fn env_json_slots(
    prefix: &str,
    doc: &FlatDoc,
    written_at: u64,
) -> Result<(Vec<Slot>, Option<Zeroizing<String>>), LayoutError> {
    let vars = doc.vars();
    let ring = env::from_vars(prefix, &vars.0)?;
    let is_versioned = versioned(prefix, &doc.names());
    let slots = ring
        .keys()
        .map(|k| {
            let state = if k.id() == ring.current_id() {
                KeyState::Current
            } else if Some(k.id()) == ring.pending_id() {
                KeyState::Pending
            } else {
                KeyState::Previous
            };
            // dual ids come from `<P>_KEY_VERSION` only when the object has it
            let explicit = is_versioned
                || (state == KeyState::Current
                    && doc.get(&format!("{prefix}_KEY_VERSION")).is_some())
                || (state == KeyState::Pending
                    && doc.get(&format!("{prefix}_KEY_NEW_VERSION")).is_some());
            Slot {
                id: explicit.then_some(k.id()),
                state,
                key: k.clone(),
                written_at: if is_versioned { 0 } else { written_at },
            }
        })
        .collect();
    let current_name = if is_versioned {
        format!("{prefix}_KEY_V{}", ring.current_id())
    } else {
        format!("{prefix}_KEY")
    };
    Ok((slots, doc.get(&current_name)))
}

/// Writes `table` into an env-json object: only the key and version members
/// change; a key already there keeps its text.
pub fn render_env_json(prefix: &str, doc: &mut FlatDoc, table: &KeyTable, enc: KeyEncoding) {
    let text = |e: &Entry| e.key.as_ref().map(|k| encode_key(k.material(), enc));
    let same = |doc: &FlatDoc, name: &str, e: &Entry| {
        let held = doc.get(name).and_then(|t| Key::parse(0, &t).ok());
        matches!((held, &e.key), (Some(h), Some(k)) if h.material() == k.material())
    };
    if versioned(prefix, &doc.names()) || doc.names().is_empty() {
        for e in &table.entries {
            let name = format!("{prefix}_KEY_V{}", e.id);
            match (e.state, text(e)) {
                (KeyState::Retired, _) | (_, None) => doc.remove(&name),
                (_, Some(t)) if !same(doc, &name, e) => doc.set(&name, &t),
                _ => {}
            }
        }
        if let Some(c) = table.id_in(KeyState::Current) {
            doc.set(&format!("{prefix}_CURRENT_VERSION"), &c.to_string());
        }
        match table.id_in(KeyState::Pending) {
            Some(p) => doc.set(&format!("{prefix}_PENDING_VERSION"), &p.to_string()),
            None => doc.remove(&format!("{prefix}_PENDING_VERSION")),
        }
        return;
    }
    let key_name = format!("{prefix}_KEY");
    let new_name = format!("{prefix}_KEY_NEW");
    if let Some(cur) = table.entries.iter().find(|e| e.state == KeyState::Current) {
        if let Some(t) = text(cur).filter(|_| !same(doc, &key_name, cur)) {
            doc.set(&key_name, &t);
        }
        let v = format!("{prefix}_KEY_VERSION");
        if doc.get(&v).is_some() {
            doc.set(&v, &cur.id.to_string());
        }
    }
    let nv = format!("{prefix}_KEY_NEW_VERSION");
    match table.entries.iter().find(|e| e.state == KeyState::Pending) {
        Some(p) => {
            if let Some(t) = text(p).filter(|_| !same(doc, &new_name, p)) {
                doc.set(&new_name, &t);
            }
            if doc.get(&nv).is_some() {
                doc.set(&nv, &p.id.to_string());
            }
        }
        None => {
            doc.remove(&new_name);
            doc.remove(&nv);
        }
    }
}

/// The key a `value` secret holds, or why it is not one.
pub fn value_key(text: &str) -> Result<Key, LayoutError> {
    let t = text.trim();
    if t.starts_with('{') {
        return Err(LayoutError::Value(
            "holds a JSON object, not a plain key: set layout = \"env-json\" (a flat JSON of environment names) or \"rekey\" (rekey's keyring)".into(),
        ));
    }
    Key::parse(0, t).map_err(|e| LayoutError::Value(format!("holds a value that {e}")))
}

#[cfg(test)]
mod tests;
