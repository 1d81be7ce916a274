//! `layout = "rekey"`: the secret holds rekey's keyring JSON, every key with
//! its state, hex material and dates. A secret in another shape is named for
//! what it is (a plain value, a flat environment JSON) with the layout that
//! reads it, instead of a JSON parser's line and column.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::keyring::Key;
use crate::crypto::keytable::{KeyTable, StoredKey};
use crate::Error;

/// Format tag of the secret's JSON.
pub const FORMAT: &str = "rekey-keyring/1";

/// The secret's JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// Always [`FORMAT`].
    format: String,
    /// The keys; `material` is the key as 64 hex characters.
    keys: Vec<StoredKey>,
}

/// What a secret string that is not a rekey keyring looks like, and the
/// layout that reads it.
pub fn diagnose(secret: &str, text: &str) -> String {
    let t = text.trim();
    if !t.starts_with('{') {
        return format!(
            "secret {secret:?} is a plain value, not a rekey keyring: set layout = \"value\" in [keys] if it is the key itself"
        );
    }
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t) {
        Ok(map) if !map.contains_key("format") => {
            let names: Vec<&str> = map.keys().map(String::as_str).take(4).collect();
            format!(
                "secret {secret:?} is a flat JSON object of environment names ({}{}), not a rekey keyring: set layout = \"env-json\" in [keys] (and prefix, if its keys are not ENCRYPTION_KEY_V<n> or ENCRYPTION_KEY)",
                names.join(", "),
                if map.len() > names.len() { ", ..." } else { "" }
            )
        }
        Ok(_) => format!("secret {secret:?} is not a valid rekey keyring (a field is missing or unknown)"),
        Err(e) => format!(
            "secret {secret:?} is not valid JSON (line {} column {}): fix the secret, or set layout = \"value\" if it is the key itself",
            e.line(),
            e.column()
        ),
    }
}

/// The keys of a rekey keyring secret.
pub fn parse(secret: &str, text: &str) -> Result<KeyTable, Error> {
    let doc: Document =
        serde_json::from_str(text).map_err(|_| Error::Config(diagnose(secret, text)))?;
    if doc.format != FORMAT {
        return Err(Error::Config(format!(
            "secret {secret:?} has format {:?}, expected {FORMAT:?}",
            doc.format
        )));
    }
    let mut table = KeyTable::default();
    for k in doc.keys {
        let key = match &k.material {
            None => None,
            Some(hex) => Some(
                Key::parse(k.id, hex)
                    .map_err(|e| Error::Config(format!("secret {secret:?}, key {}: {e}", k.id)))?,
            ),
        };
        table.entries.push(k.into_entry(key));
    }
    Ok(table)
}

/// The keyring JSON of `table` (material of live keys only, hex).
pub fn render(table: &KeyTable) -> Result<Zeroizing<String>, Error> {
    let keys = table
        .entries
        .iter()
        .map(|e| StoredKey::from_entry(e, |k| Ok::<_, Error>(hex::encode(k.material()))))
        .collect::<Result<_, _>>()?;
    let doc = Document {
        format: FORMAT.into(),
        keys,
    };
    serde_json::to_string(&doc)
        .map(Zeroizing::new)
        .map_err(|e| Error::Runtime(format!("the keyring could not be written as JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compromised_marker_round_trips_and_defaults_to_false_in_older_keyrings() {
        use crate::crypto::keytable::{Entry, KeyState};
        let mut t = KeyTable::default();
        for (id, compromised) in [(1, true), (2, false)] {
            t.entries.push(Entry {
                id,
                state: if id == 2 {
                    KeyState::Current
                } else {
                    KeyState::Previous
                },
                created_at: 1_700_000_000,
                changed_at: 1_700_000_000,
                key: Some(Key::new(id, [id as u8; 32])),
                compromised,
            });
        }
        let text = render(&t).unwrap();
        let back = parse("s", &text).unwrap();
        assert_eq!(
            back.entries
                .iter()
                .map(|e| e.compromised)
                .collect::<Vec<_>>(),
            [true, false]
        );
        let older = text.replace(",\"compromised\":true", "");
        assert!(!older.contains("compromised"));
        assert!(parse("s", &older)
            .unwrap()
            .entries
            .iter()
            .all(|e| !e.compromised));
    }

    #[test]
    fn a_secret_of_another_shape_is_named_with_the_layout_that_reads_it() {
        let plain = diagnose("s", "gAAAAAkey-urlsafe_base64=");
        assert!(
            plain.contains("plain value") && plain.contains("layout = \"value\""),
            "{plain}"
        );
        let env = diagnose(
            "s",
            "{\"ENCRYPTION_KEY_V1\": \"aa\", \"ENCRYPTION_CURRENT_VERSION\": \"1\"}",
        );
        assert!(
            env.contains("layout = \"env-json\"") && !env.contains("\"aa\""),
            "{env}"
        );
        assert!(!env.contains("line 1 column"), "{env}");
    }
}
