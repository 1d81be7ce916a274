//! A flat JSON object of environment names, edited in place: the quarterly
//! procedure keeps a whole application environment in one secret, and rekey
//! may touch only its own key fields. Every other member keeps its exact
//! bytes (spacing, escapes, number spelling, nested values) and its place:
//! edits are splices into the original text, never a re-serialisation.
//!
//! The text is validated by serde_json first; the scanner below then only
//! finds member spans in text known to be valid JSON.

use zeroize::Zeroizing;

/// Why a secret string is not a flat JSON object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlatError {
    /// Not JSON at all (or not an object). Never carries the text.
    #[error("is not a JSON object of environment names")]
    NotObject,
    /// A name appears twice (which of the two would the application read?).
    #[error("names {0} twice: keep one")]
    Duplicate(String),
}

/// `(name, value)` pairs of a flat object; the values (key material among
/// them) are wiped on drop.
pub struct Vars(pub Vec<(String, String)>);

impl Drop for Vars {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for (_, v) in &mut self.0 {
            v.zeroize();
        }
    }
}

/// One member: its decoded name and the byte spans of its raw parts.
#[derive(Debug, Clone)]
struct Member {
    /// The decoded name.
    name: String,
    /// Start of the member (its name's opening quote).
    start: usize,
    /// Start of the value.
    value_start: usize,
    /// End of the value (exclusive).
    end: usize,
}

/// A flat JSON object, held as its text (which may hold key material: wiped on drop).
pub struct FlatDoc {
    /// The text as it is now.
    text: Zeroizing<String>,
}

impl std::fmt::Debug for FlatDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatDoc")
            .field("names", &self.names())
            .finish()
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the JSON string starting at `i` (a quote).
fn string_end(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// End (exclusive) of the JSON value starting at `i`.
fn value_end(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => string_end(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            j
        }
    }
}

/// A JSON string literal for `s` (which may be key material: wiped on drop).
fn quoted(s: &str) -> Zeroizing<String> {
    // writing a &str as JSON cannot fail
    Zeroizing::new(serde_json::to_string(s).unwrap_or_default())
}

impl FlatDoc {
    /// Takes `text` if it is a JSON object whose names are unique.
    pub fn parse(text: &str) -> Result<FlatDoc, FlatError> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(FlatError::NotObject),
        }
        let doc = FlatDoc {
            text: Zeroizing::new(text.to_string()),
        };
        let members = doc.members();
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|o| o.name == m.name) {
                return Err(FlatError::Duplicate(m.name.clone()));
            }
        }
        Ok(doc)
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn members(&self) -> Vec<Member> {
        let b = self.text.as_bytes();
        let mut out = Vec::new();
        let mut i = skip_ws(b, 0) + 1; // past '{'
        loop {
            i = skip_ws(b, i);
            if b.get(i) != Some(&b'"') {
                return out;
            }
            let start = i;
            let name_end = string_end(b, i);
            let name = serde_json::from_slice::<String>(&b[start..name_end]).unwrap_or_default();
            i = skip_ws(b, name_end) + 1; // past ':'
            let value_start = skip_ws(b, i);
            let end = value_end(b, value_start);
            out.push(Member {
                name,
                start,
                value_start,
                end,
            });
            i = skip_ws(b, end);
            if b.get(i) == Some(&b',') {
                i += 1;
            } else {
                return out;
            }
        }
    }

    /// Every name, in order.
    pub fn names(&self) -> Vec<String> {
        self.members().into_iter().map(|m| m.name).collect()
    }

    /// The value of `name` as text: a string's contents, or a number's
    /// spelling; `None` when absent or of another type.
    pub fn get(&self, name: &str) -> Option<Zeroizing<String>> {
        let m = self.members().into_iter().find(|m| m.name == name)?;
        let raw = &self.text[m.value_start..m.end];
        match serde_json::from_str::<serde_json::Value>(raw).ok()? {
            serde_json::Value::String(s) => Some(Zeroizing::new(s)),
            serde_json::Value::Number(n) => Some(Zeroizing::new(n.to_string())),
            _ => None,
        }
    }

    /// The `(name, value)` pairs whose values are strings or numbers, for the
    /// environment conventions (values wiped on drop).
    pub fn vars(&self) -> Vars {
        Vars(
            self.names()
                .into_iter()
                .filter_map(|n| {
                    let v = self.get(&n)?;
                    Some((n, v.to_string()))
                })
                .collect(),
        )
    }

    /// Sets `name` to the string `value` (a number stays a number when
    /// `value` is one): in place when present, else appended as the last
    /// member in the spacing of the first.
    pub fn set(&mut self, name: &str, value: &str) {
        let members = self.members();
        let mut text = Zeroizing::new(String::with_capacity(self.text.len() + value.len() + 32));
        if let Some(m) = members.iter().find(|m| m.name == name) {
            let was_number = self.text.as_bytes().get(m.value_start) != Some(&b'"');
            let new = if was_number && value.parse::<u64>().is_ok() {
                Zeroizing::new(value.to_string())
            } else {
                quoted(value)
            };
            text.push_str(&self.text[..m.value_start]);
            text.push_str(&new);
            text.push_str(&self.text[m.end..]);
        } else {
            let colon = members.first().map_or(":", |m| {
                let between = &self.text[string_end(self.text.as_bytes(), m.start)..m.value_start];
                if between.ends_with(' ') {
                    ": "
                } else {
                    ":"
                }
            });
            let member = Zeroizing::new(format!("{}{colon}{}", *quoted(name), *quoted(value)));
            match members.last() {
                Some(last) => {
                    text.push_str(&self.text[..last.end]);
                    // the separator between the last two members, else a bare comma
                    let gap = match members.len() {
                        n if n >= 2 => &self.text[members[n - 2].end..last.start],
                        _ => ",",
                    };
                    text.push_str(gap);
                    text.push_str(&member);
                    text.push_str(&self.text[last.end..]);
                }
                None => {
                    let open = self.text.find('{').unwrap_or(0) + 1;
                    text.push_str(&self.text[..open]);
                    text.push_str(&member);
                    text.push_str(&self.text[open..]);
                }
            }
        }
        self.text = text;
    }

    /// Removes `name` (and one comma beside it); nothing when absent.
    pub fn remove(&mut self, name: &str) {
        let members = self.members();
        let Some(i) = members.iter().position(|m| m.name == name) else {
            return;
        };
        let (cut_from, cut_to) = if let Some(next) = members.get(i + 1) {
            (members[i].start, next.start)
        } else if i > 0 {
            (members[i - 1].end, members[i].end)
        } else {
            (members[i].start, members[i].end)
        };
        let mut text = Zeroizing::new(String::with_capacity(self.text.len()));
        text.push_str(&self.text[..cut_from]);
        text.push_str(&self.text[cut_to..]);
        self.text = text;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ODD: &str = "{ \"DATABASE_URL\" :\"postgres://x\",\n  \"RATIO\": 1.0e3, \"NAME\": \"caf\\u00e9 \\\"q\\\"\",\t\"NESTED\": {\"a\": [1, {\"b\": \"}\"}]},\n  \"ENCRYPTION_KEY_V1\": \"k1\", \"ENCRYPTION_CURRENT_VERSION\": \"1\",\"LAST\":null }";

    #[test]
    fn reads_strings_and_numbers_only() {
        let d = FlatDoc::parse(ODD).unwrap();
        assert_eq!(
            d.get("RATIO").as_deref().map(String::as_str),
            Some("1000.0")
        );
        assert_eq!(
            d.get("NAME").as_deref().map(String::as_str),
            Some("café \"q\"")
        );
        assert!(d.get("NESTED").is_none() && d.get("LAST").is_none());
        assert_eq!(d.names().len(), 7);
    }

    #[test]
    fn edits_leave_every_other_member_byte_for_byte() {
        let mut d = FlatDoc::parse(ODD).unwrap();
        d.set("ENCRYPTION_KEY_V2", "k2");
        d.set("ENCRYPTION_PENDING_VERSION", "2");
        d.set("ENCRYPTION_CURRENT_VERSION", "2");
        d.remove("ENCRYPTION_PENDING_VERSION");
        d.remove("ENCRYPTION_KEY_V1");
        let v: serde_json::Value = serde_json::from_str(d.text()).unwrap();
        assert_eq!(v["ENCRYPTION_KEY_V2"], "k2");
        assert_eq!(v["ENCRYPTION_CURRENT_VERSION"], "2");
        assert!(v.get("ENCRYPTION_KEY_V1").is_none());
        for raw in [
            "\"DATABASE_URL\" :\"postgres://x\"",
            "\"RATIO\": 1.0e3",
            "\"NAME\": \"caf\\u00e9 \\\"q\\\"\"",
            "\"NESTED\": {\"a\": [1, {\"b\": \"}\"}]}",
            "\"LAST\":null",
        ] {
            assert!(d.text().contains(raw), "{raw} in {}", d.text());
        }
        let order: Vec<_> = d.names();
        assert_eq!(order[..4], ["DATABASE_URL", "RATIO", "NAME", "NESTED"]);
    }

    #[test]
    fn removing_the_first_last_and_only_member_keeps_valid_json() {
        for name in ["A", "B", "C"] {
            let mut d = FlatDoc::parse("{\"A\":\"1\", \"B\":\"2\", \"C\":\"3\"}").unwrap();
            d.remove(name);
            let v: serde_json::Value = serde_json::from_str(d.text()).unwrap();
            assert!(v.get(name).is_none() && v.as_object().unwrap().len() == 2);
        }
        let mut d = FlatDoc::parse("{\"A\":\"1\"}").unwrap();
        d.remove("A");
        d.set("B", "x");
        assert_eq!(d.text(), "{\"B\":\"x\"}");
    }

    #[test]
    fn a_number_stays_a_number() {
        let mut d = FlatDoc::parse("{\"V\": 1}").unwrap();
        d.set("V", "2");
        assert_eq!(d.text(), "{\"V\": 2}");
    }

    #[test]
    fn refuses_non_objects_and_duplicates() {
        assert_eq!(FlatDoc::parse("abc").unwrap_err(), FlatError::NotObject);
        assert_eq!(FlatDoc::parse("[1]").unwrap_err(), FlatError::NotObject);
        assert_eq!(
            FlatDoc::parse("{\"A\":\"1\",\"A\":\"2\"}").unwrap_err(),
            FlatError::Duplicate("A".into())
        );
    }
}
