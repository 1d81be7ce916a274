//! Layout round trips: content -> table -> transition -> content, with ids
//! and states surviving a fresh read (as a new process would make it).

use super::*;
use crate::crypto::keyring::KEY_LEN;

const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn fernet(b: u8) -> String {
    encode_key(&[b; KEY_LEN], KeyEncoding::Fernet).to_string()
}

/// Reads a dual env-json object the way the AWS store does.
fn read(doc: &FlatDoc, meta: &str) -> KeyTable {
    let (slots, _) = env_json_slots("ENCRYPTION", doc, 0).unwrap();
    assemble(slots, &Meta::parse(meta))
}

#[test]
fn encodings_are_detected_from_the_key_text() {
    assert_eq!(detect_encoding(K1, true), KeyEncoding::Hex);
    assert_eq!(detect_encoding("ab-_", false), KeyEncoding::Fernet);
    assert_eq!(detect_encoding("ab+/", true), KeyEncoding::Base64);
    assert_eq!(detect_encoding("abcd", true), KeyEncoding::Fernet);
    assert_eq!(detect_encoding("abcd", false), KeyEncoding::Base64);
}

#[test]
fn the_dual_convention_keeps_its_ids_through_stage_promote_and_retire() {
    let mut doc = FlatDoc::parse(&format!(
        "{{\"ENCRYPTION_KEY\": \"{}\", \"OTHER\": 1}}",
        fernet(1)
    ))
    .unwrap();
    let mut t = read(&doc, "");
    assert_eq!(t.id_in(KeyState::Current), Some(1));
    t.stage(Key::new(2, [2; KEY_LEN]), 5).unwrap();
    render_env_json("ENCRYPTION", &mut doc, &t, KeyEncoding::Fernet);
    let meta = Meta::of(&t);
    let mut t = read(&doc, &meta);
    assert_eq!(
        (t.id_in(KeyState::Current), t.id_in(KeyState::Pending)),
        (Some(1), Some(2))
    );
    assert_eq!(doc.get("ENCRYPTION_KEY_NEW").as_deref(), Some(&fernet(2)));
    t.promote(6).unwrap();
    render_env_json("ENCRYPTION", &mut doc, &t, KeyEncoding::Fernet);
    let meta = Meta::of(&t);
    let mut t = read(&doc, &meta);
    assert_eq!(
        (t.id_in(KeyState::Current), t.previous_ids()),
        (Some(2), vec![1])
    );
    assert_eq!(doc.get("ENCRYPTION_KEY").as_deref(), Some(&fernet(2)));
    assert!(doc.get("ENCRYPTION_KEY_NEW").is_none());
    assert!(doc.text().ends_with("\"OTHER\": 1}"), "{}", doc.text());
    t.retire(1, 7).unwrap();
    let t = read(&doc, &Meta::of(&t));
    assert_eq!(t.entries[0].state, KeyState::Retired);
    assert_eq!(
        t.entries[1].created_at, 5,
        "the staged key keeps its creation time"
    );
}

#[test]
fn the_versioned_convention_stages_with_a_pending_version_and_retires_by_removal() {
    let mut doc = FlatDoc::parse(&format!(
        "{{\"A\":\"x\",\"ENCRYPTION_KEY_V1\":\"{K1}\",\"ENCRYPTION_CURRENT_VERSION\":\"1\"}}"
    ))
    .unwrap();
    let mut t = read(&doc, "");
    assert_eq!(t.entries[0].created_at, 0, "unknown, not 1970");
    t.stage(Key::new(2, [2; KEY_LEN]), 5).unwrap();
    render_env_json("ENCRYPTION", &mut doc, &t, KeyEncoding::Hex);
    assert_eq!(
        doc.get("ENCRYPTION_PENDING_VERSION")
            .as_deref()
            .map(String::as_str),
        Some("2")
    );
    let mut t = read(&doc, &Meta::of(&t));
    t.promote(6).unwrap();
    t.retire(1, 7).unwrap();
    render_env_json("ENCRYPTION", &mut doc, &t, KeyEncoding::Hex);
    assert!(
        doc.get("ENCRYPTION_KEY_V1").is_none() && doc.get("ENCRYPTION_PENDING_VERSION").is_none()
    );
    assert_eq!(
        doc.get("ENCRYPTION_CURRENT_VERSION")
            .as_deref()
            .map(String::as_str),
        Some("2")
    );
    assert_eq!(
        doc.get("ENCRYPTION_KEY_V2").as_deref(),
        Some(&hex::encode([2u8; 32]))
    );
    let t = read(&doc, &Meta::of(&t));
    assert_eq!(
        (t.entries[0].id, t.entries[0].state),
        (1, KeyState::Retired)
    );
}

#[test]
fn the_meta_line_round_trips_and_stays_short() {
    let mut t = KeyTable::default();
    for id in 1..=20 {
        t.entries.push(Entry {
            id,
            state: if id == 20 {
                KeyState::Current
            } else {
                KeyState::Retired
            },
            created_at: 1_700_000_000 + u64::from(id),
            changed_at: 0,
            key: Some(Key::new(id, [id as u8; KEY_LEN])),
            compromised: id == 19,
        });
    }
    let line = Meta::of(&t);
    assert!(line.len() <= META_MAX);
    let m = Meta::parse(&line);
    let last = m.keys.last().unwrap();
    assert_eq!(
        (last.id, last.state, last.created_at),
        (20, KeyState::Current, 1_700_000_020)
    );
    assert!(m.keys.iter().any(|k| k.id == 19 && k.compromised));
}

#[test]
fn a_value_secret_holding_json_says_which_layout_fits() {
    let err = value_key("{\"ENCRYPTION_KEY_V1\": \"x\"}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("layout = \"env-json\""), "{err}");
    let err = value_key("not a key").unwrap_err().to_string();
    assert!(!err.contains("not a key"), "{err}");
}

#[test]
fn a_pending_copy_of_the_current_key_is_not_a_new_key() {
    // a promote stopped after the secret took the new key, before the pending copy went
    let key = Key::new(2, [7; 32]);
    let slots = vec![
        Slot {
            id: None,
            state: KeyState::Current,
            key: key.clone(),
            written_at: 10,
        },
        Slot {
            id: None,
            state: KeyState::Pending,
            key,
            written_at: 5,
        },
    ];
    let t = assemble(slots, &Meta::default());
    assert_eq!(
        t.entries.len(),
        1,
        "{:?}",
        t.entries
            .iter()
            .map(|e| (e.id, e.state))
            .collect::<Vec<_>>()
    );
    assert_eq!(t.id_in(KeyState::Pending), None);
}
