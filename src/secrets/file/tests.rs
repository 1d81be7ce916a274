//! The keyring file: saving and opening, wrong passphrases, damaged files, crashes mid-save, the archive.
use super::*;
use crate::crypto::keytable::Entry;
use proptest::prelude::*;
use seal::MAX_M_COST;
use std::fs::OpenOptions;

fn table() -> KeyTable {
    KeyTable {
        entries: vec![Entry {
            id: 1,
            state: KeyState::Current,
            created_at: 100,
            changed_at: 100,
            key: Some(Key::new(1, [7; 32])),
            compromised: false,
        }],
    }
}

/// Writes `bytes` as a keyring file, its owner's alone, as rekey writes one.
fn write_owner_only(path: &Path, bytes: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn saves_and_reopens_with_the_same_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"correct horse", table()).unwrap();
    let opened = KeyringFile::open(&path, b"correct horse", "P").unwrap();
    assert_eq!(
        opened.table.keyring().unwrap().get(1).unwrap().material(),
        &[7; 32]
    );
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&hex::encode([7u8; 32])) && !text.contains(&B64.encode([7u8; 32])));
}

#[test]
fn wrong_passphrase_names_the_variable_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"right", table()).unwrap();
    let before = fs::read(&path).unwrap();
    let err = KeyringFile::open(&path, b"wrong", "REKEY_KEYRING_PASSPHRASE").unwrap_err();
    assert!(
        err.to_string().contains("REKEY_KEYRING_PASSPHRASE"),
        "{err}"
    );
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn damaged_material_is_malformed_not_a_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"pw", table()).unwrap();
    let good = fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&good).unwrap();
    let sealed = doc["keys"][0]["material"].as_str().unwrap().to_string();
    for (damaged, problem) in [
        ("%%%".to_string(), "key 1: material is not base64"),
        (
            B64.encode([0u8; 20]),
            "key 1: material is not a sealed 32-byte key",
        ),
    ] {
        fs::write(&path, good.replace(&sealed, &damaged)).unwrap();
        let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
        assert!(
            matches!(err, FileKeyringError::Malformed { .. }) && err.to_string().contains(problem),
            "{err}"
        );
    }
}

#[test]
fn a_crash_before_the_rename_leaves_the_old_version_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = KeyringFile::create(&path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    let tmp = file.write_pending().unwrap();
    // the process dies here, with the new version half-written
    let len = fs::metadata(&tmp).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let reopened = KeyringFile::open(&path, b"pw", "P").unwrap();
    assert_eq!(reopened.table.entries.len(), 1);
}

#[test]
fn saving_keeps_a_backup_of_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = KeyringFile::create(&path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.save().unwrap();
    let backup = KeyringFile::open(&backup_path(&path), b"pw", "P").unwrap();
    assert_eq!(backup.table.entries.len(), 1);
    assert_eq!(
        KeyringFile::open(&path, b"pw", "P")
            .unwrap()
            .table
            .entries
            .len(),
        2
    );
}

#[test]
fn the_backup_is_named_by_the_whole_file_name_with_bak_appended() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = KeyringFile::create(&path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.save().unwrap();
    assert!(dir.path().join("keys.json.bak").exists());
    assert!(!dir.path().join("keys.bak").exists());
}

#[test]
fn the_temporary_file_is_named_by_the_whole_file_name_with_tmp_appended() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let file = KeyringFile::create(&path, b"pw", table()).unwrap();
    let tmp = file.write_pending().unwrap();
    assert_eq!(
        tmp,
        dir.path()
            .join(format!("keys.json.tmp-{}", std::process::id()))
    );
}

#[test]
fn two_keyring_files_of_one_stem_keep_a_backup_each() {
    let dir = tempfile::tempdir().unwrap();
    let (json, toml) = (dir.path().join("prod.json"), dir.path().join("prod.toml"));
    let mut first = KeyringFile::create(&json, b"one", table()).unwrap();
    let mut second = KeyringFile::create(&toml, b"two", table()).unwrap();
    first.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    first.save().unwrap();
    second.table.stage(Key::new(2, [9; 32]), 200).unwrap();
    second.save().unwrap();
    assert!(KeyringFile::open(&backup_path(&json), b"one", "P").is_ok());
    assert!(KeyringFile::open(&backup_path(&toml), b"two", "P").is_ok());
}

/// Key 1 current, key 2 staged and saved, then promoted and saved: the
/// steps before key 1 may be retired.
fn promoted(path: &Path) -> KeyringFile {
    let mut file = KeyringFile::create(path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.save().unwrap();
    file.table.promote(300).unwrap();
    file.save().unwrap();
    file
}

/// Whether the keyring file at `path` holds key `id`'s material, sealed.
fn holds_material(path: &Path, id: u64) -> bool {
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == id && k["material"].is_string())
}

#[test]
fn a_save_replaces_this_keyring_s_backup_named_by_an_earlier_rekey() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = promoted(&path);
    // an earlier rekey backed keys.json up to keys.bak
    let legacy = dir.path().join("keys.bak");
    write_owner_only(&legacy, fs::read(&path).unwrap());
    file.table.stage(Key::new(3, [9; 32]), 400).unwrap();
    file.save().unwrap();
    assert!(!legacy.exists(), "keys.json.bak is its backup now");
    assert!(KeyringFile::open(&backup_path(&path), b"pw", "P").is_ok());
}

#[test]
fn retiring_a_key_leaves_its_material_in_no_backup_an_earlier_rekey_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = promoted(&path);
    let legacy = dir.path().join("keys.bak");
    write_owner_only(&legacy, fs::read(&path).unwrap());
    assert!(holds_material(&legacy, 1));
    file.table.retire(1, 400).unwrap();
    file.save().unwrap();
    assert!(!legacy.exists() || !holds_material(&legacy, 1));
    assert!(!holds_material(&backup_path(&path), 1));
}

#[test]
fn retiring_a_key_removes_the_copy_an_unfinished_save_of_another_process_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = promoted(&path);
    // a save killed between writing and renaming left a copy holding key 1
    let left = dir.path().join(format!(
        "keys.json.tmp-{}",
        std::process::id().wrapping_add(1)
    ));
    write_owner_only(&left, fs::read(&path).unwrap());
    assert!(holds_material(&left, 1));
    let unrelated = dir.path().join("keys.json.tmp-notes");
    write_owner_only(&unrelated, b"not a pid");
    file.table.retire(1, 400).unwrap();
    file.save().unwrap();
    assert!(!left.exists(), "a copy of key 1's material is left");
    assert!(unrelated.exists(), "only names a save gives are removed");
}

#[test]
fn a_file_named_as_an_earlier_rekey_named_backups_is_left_when_it_is_another_keyring_s() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = promoted(&path);
    // keys.toml's backup, by an earlier rekey: another salt, other keys
    let legacy = dir.path().join("keys.bak");
    let other = dir.path().join("keys.toml");
    promoted(&other);
    let theirs = fs::read(&other).unwrap();
    write_owner_only(&legacy, &theirs);
    file.table.retire(1, 400).unwrap();
    file.save().unwrap();
    assert_eq!(fs::read(&legacy).unwrap(), theirs);
}

/// [`promoted`], with key 1 retired into the archive.
fn retired(path: &Path) -> KeyringFile {
    let mut file = promoted(path);
    file.table.retire(1, 400).unwrap();
    file.save().unwrap();
    file
}

/// [`retired`], with key 3 promoted and key 2 retired too.
fn two_retired(path: &Path) -> KeyringFile {
    let mut file = retired(path);
    file.table.stage(Key::new(3, [9; 32]), 500).unwrap();
    file.table.promote(600).unwrap();
    file.table.retire(2, 700).unwrap();
    file.save().unwrap();
    file
}

#[test]
fn retiring_a_key_keeps_a_copy_of_the_new_archive_as_its_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    retired(&path);
    let backup = backup_path(&archive_path(&path));
    assert_eq!(backup, dir.path().join("keys.json.archive.bak"));
    assert!(holds_material(&backup, 1));
}

#[test]
fn archiving_another_key_keeps_the_previous_archive_as_its_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    two_retired(&path);
    let backup = backup_path(&archive_path(&path));
    assert!(holds_material(&backup, 1) && !holds_material(&backup, 2));
    assert!(holds_material(&archive_path(&path), 2));
}

#[test]
fn a_purged_key_leaves_the_archive_s_backup_with_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = two_retired(&path);
    let backup = backup_path(&archive_path(&path));
    file.table.purge(1).unwrap();
    file.save().unwrap();
    assert!(!holds_material(&backup, 1) && holds_material(&backup, 2));
    file.table.purge(2).unwrap();
    file.save().unwrap();
    assert!(!archive_path(&path).exists() && !backup.exists());
}

#[test]
fn purging_the_last_archived_key_removes_the_copies_unfinished_saves_of_the_archive_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = retired(&path);
    let left = dir.path().join(format!(
        "keys.json.archive.tmp-{}",
        std::process::id().wrapping_add(1)
    ));
    write_owner_only(&left, fs::read(archive_path(&path)).unwrap());
    assert!(holds_material(&left, 1));
    file.table.purge(1).unwrap();
    file.save().unwrap();
    assert!(!archive_path(&path).exists());
    assert!(!left.exists(), "a copy of key 1's material is left");
}

/// Flips a bit of key `id`'s sealed material in the file at `path`: still
/// base64 of a sealed key's length, but not what was sealed.
fn alter_key(path: &Path, id: u64) {
    let text = fs::read_to_string(path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    let sealed = keys.iter().find(|k| k["id"] == id).unwrap()["material"]
        .as_str()
        .unwrap();
    let mut altered = B64.decode(sealed).unwrap();
    altered[20] ^= 1;
    fs::write(path, text.replace(sealed, &B64.encode(altered))).unwrap();
}

/// Key 1 current, then key 2 staged and saved: the backup holds key 1 alone.
fn staged(path: &Path) -> KeyringFile {
    let mut file = KeyringFile::create(path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.save().unwrap();
    file
}

#[test]
fn a_damaged_file_s_error_names_the_keys_its_backup_holds_and_the_keys_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    staged(&path);
    alter_key(&path, 2);
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    let FileKeyringError::Altered { backup, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        backup,
        &Some(InBackup::Keys {
            backup: backup_path(&path),
            holds: vec![(1, KeyState::Current)],
            lacks: Some(vec![2]),
        })
    );
    assert!(
        err.to_string().contains(&format!(
            "its backup {} holds key 1 (current) but not key 2, which the damaged file lists",
            backup_path(&path).display()
        )),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("restoring it alone would lose key 2"),
        "{err}"
    );
}

#[test]
fn a_damaged_file_whose_backup_holds_every_key_it_lists_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    staged(&path).save().unwrap();
    alter_key(&path, 2);
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "its backup {} holds keys 1 (current) and 2 (pending), every key whose material the damaged file lists: restore the file from it",
            backup_path(&path).display()
        )),
        "{err}"
    );
}

#[test]
fn a_file_too_damaged_to_list_its_keys_says_a_key_its_last_save_added_is_not_in_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    staged(&path);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        matches!(
            &err,
            FileKeyringError::Malformed {
                backup: Some(InBackup::Keys { lacks: None, .. }),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!(
            "its backup {} holds key 1 (current), as they were before the file's last save: a key that save added is not in it",
            backup_path(&path).display()
        )),
        "{err}"
    );
}

#[test]
fn a_damaged_file_without_a_backup_says_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"pw", table()).unwrap();
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "there is no backup {}: restore the file from a copy of your own",
            backup_path(&path).display()
        )),
        "{err}"
    );
}

#[test]
fn a_damaged_file_whose_backup_does_not_open_with_the_passphrase_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    staged(&path);
    let other = dir.path().join("other.json");
    KeyringFile::create(&other, b"another", table()).unwrap();
    fs::copy(&other, backup_path(&path)).unwrap();
    alter_key(&path, 2);
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "its backup {} is no use either (it does not open with the passphrase in P): restore the file from a copy of your own",
            backup_path(&path).display()
        )),
        "{err}"
    );
}

#[test]
fn a_damaged_archive_s_error_names_what_the_archive_s_backup_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    two_retired(&path);
    let archive = archive_path(&path);
    alter_key(&archive, 2);
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "its backup {} holds key 1 (retired) but not key 2",
            backup_path(&archive).display()
        )),
        "{err}"
    );
}

/// A keyring file whose Argon2id parameters ask for `m_cost` KiB.
fn document_asking_for(m_cost: u32, t_cost: u32, p_cost: u32) -> String {
    serde_json::json!({
        "format": FORMAT,
        "kdf": { "salt": B64.encode([0u8; 16]), "m_cost": m_cost, "t_cost": t_cost, "p_cost": p_cost },
        "keys": [],
    })
    .to_string()
}

#[test]
fn absurd_kdf_parameters_are_refused_before_any_memory_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    for (m, t, p) in [
        (u32::MAX, 1, 1),
        (MAX_M_COST + 1, 1, 1),
        (8, u32::MAX, 1),
        (8 * (1 << 20), 1, 1 << 20),
    ] {
        write_owner_only(&path, document_asking_for(m, t, p));
        let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
        assert!(matches!(err, FileKeyringError::Malformed { .. }), "{err:?}");
        assert!(
            err.to_string().contains("exceed what rekey accepts"),
            "{err}"
        );
    }
}

/// Values for one field of a keyring file: sensible, wrong, or absent.
fn field(choices: Vec<serde_json::Value>) -> impl Strategy<Value = Option<serde_json::Value>> {
    prop_oneof![4 => prop::sample::select(choices).prop_map(Some), 1 => Just(None)]
}

/// A keyring-file-shaped document: cheap Argon2id parameters (or absurd
/// ones), keys whose sealed material is random.
fn document() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let key = (
        field(vec![json!(1), json!(2), json!(-1), json!("1")]),
        field(vec![
            json!("current"),
            json!("pending"),
            json!("previous"),
            json!("retired"),
            json!("CURRENT"),
            json!(null),
        ]),
        field(vec![
            json!("2024-01-01T00:00:00Z"),
            json!("yesterday"),
            json!(0),
        ]),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| Some(json!(B64.encode(b)))),
            Just(Some(json!("not base64!"))),
            Just(Some(json!(null))),
            Just(None),
        ],
    )
        .prop_map(|(id, state, at, material)| {
            let mut k = serde_json::Map::new();
            for (name, v) in [
                ("id", id),
                ("state", state),
                ("created_at", at.clone()),
                ("changed_at", at),
                ("material", material),
            ] {
                if let Some(v) = v {
                    k.insert(name.into(), v);
                }
            }
            serde_json::Value::Object(k)
        });
    (
        field(vec![json!(FORMAT), json!("rekey-keyring/2"), json!(1)]),
        field(vec![
            json!(B64.encode([1u8; 16])),
            json!(B64.encode([1u8; 4])),
            json!("%%"),
        ]),
        field(vec![
            json!(8),
            json!(16),
            json!(0),
            json!(u32::MAX),
            json!(-1),
        ]),
        field(vec![json!(1), json!(0), json!(u32::MAX)]),
        field(vec![json!(1), json!(2), json!(0), json!(1 << 24)]),
        proptest::collection::vec(key, 0..3),
    )
        .prop_map(|(format, salt, m, t, p, keys)| {
            let mut kdf = serde_json::Map::new();
            for (name, v) in [("salt", salt), ("m_cost", m), ("t_cost", t), ("p_cost", p)] {
                if let Some(v) = v {
                    kdf.insert(name.into(), v);
                }
            }
            let mut doc = serde_json::Map::new();
            if let Some(f) = format {
                doc.insert("format".into(), f);
            }
            doc.insert("kdf".into(), serde_json::Value::Object(kdf));
            doc.insert("keys".into(), serde_json::Value::Array(keys));
            serde_json::Value::Object(doc)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_in_a_keyring_file_give_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        write_owner_only(&path, &bytes);
        let err = KeyringFile::open(&path, b"pw", "P").err();
        prop_assert!(matches!(err, Some(FileKeyringError::Io { .. } | FileKeyringError::Malformed { .. })), "{:?}", err);
    }

    #[test]
    fn keyring_shaped_documents_open_or_give_a_typed_error_without_material(doc in document()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        write_owner_only(&path, doc.to_string());
        match KeyringFile::open(&path, b"pw", "P") {
            // Random sealed material never opens; only documents without any can.
            Ok(file) => prop_assert!(file.table.entries.iter().all(|e| e.key.is_none())),
            Err(err) => {
                prop_assert!(matches!(err, FileKeyringError::Malformed { .. } | FileKeyringError::WrongPassphrase { .. }), "{:?}", err);
                let shown = format!("{err} {err:?}");
                let sealed = doc["keys"].as_array().into_iter().flatten().filter_map(|k| k["material"].as_str());
                for m in sealed.filter(|m| m.len() >= 8) {
                    prop_assert!(!shown.contains(m), "{} repeats sealed material", shown);
                }
            }
        }
    }
}

#[test]
fn an_archived_key_that_does_not_open_where_the_file_s_keys_do_is_damage_in_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut with_retired = table();
    with_retired.entries.push(Entry {
        id: 2,
        state: KeyState::Retired,
        created_at: 50,
        changed_at: 90,
        key: Some(Key::new(2, [8; 32])),
        compromised: false,
    });
    KeyringFile::create(&path, b"pw", with_retired).unwrap();
    let archive = archive_path(&path);
    let text = fs::read_to_string(&archive).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sealed = doc["keys"][0]["material"].as_str().unwrap();
    let mut altered = B64.decode(sealed).unwrap();
    altered[20] ^= 1;
    fs::write(&archive, text.replace(sealed, &B64.encode(altered))).unwrap();
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        matches!(&err, FileKeyringError::Altered { path, keys, opened: 1, .. } if *path == archive && keys == &[2]),
        "{err:?}"
    );
}

#[test]
fn a_keyring_file_group_or_others_may_read_or_write_is_refused_before_it_is_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"pw", table()).unwrap();
    for open in [0o640, 0o620, 0o604, 0o602, 0o660, 0o666] {
        fs::set_permissions(&path, fs::Permissions::from_mode(open)).unwrap();
        let err = KeyringFile::open(&path, b"wrong", "P").unwrap_err();
        assert!(
            matches!(err, FileKeyringError::OpenToOthers { mode, .. } if mode == open),
            "{open:o}: {err:?}"
        );
    }
    for owners in [0o600, 0o400] {
        fs::set_permissions(&path, fs::Permissions::from_mode(owners)).unwrap();
        assert!(KeyringFile::open(&path, b"pw", "P").is_ok(), "{owners:o}");
    }
}

#[test]
fn an_archive_group_or_others_may_read_is_refused_too() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut with_retired = table();
    with_retired.entries.push(Entry {
        id: 2,
        state: KeyState::Retired,
        created_at: 50,
        changed_at: 90,
        key: Some(Key::new(2, [8; 32])),
        compromised: false,
    });
    KeyringFile::create(&path, b"pw", with_retired).unwrap();
    let archive = archive_path(&path);
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o644)).unwrap();
    let err = KeyringFile::open(&path, b"pw", "P").unwrap_err();
    assert!(
        matches!(&err, FileKeyringError::OpenToOthers { path, .. } if *path == archive),
        "{err:?}"
    );
}

/// The material of key `id` in the keyring file at `path`.
fn material_of(path: &Path, id: KeyId) -> [u8; 32] {
    let file = KeyringFile::open(path, b"pw", "P").unwrap();
    let entry = file.table.entries.iter().find(|e| e.id == id).unwrap();
    *entry.key.as_ref().unwrap().material()
}

#[test]
fn a_save_never_replaces_a_file_changed_since_it_was_read() {
    // two jobs sharing one keyring file, each staging its own key 2
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"pw", table()).unwrap();
    let mut first = KeyringFile::open(&path, b"pw", "P").unwrap();
    let mut second = KeyringFile::open(&path, b"pw", "P").unwrap();
    first.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    first.save().unwrap();
    second.table.stage(Key::new(2, [9; 32]), 200).unwrap();
    let err = second
        .save()
        .expect_err("the second save replaced the first's key 2");
    assert!(
        err.to_string()
            .contains("changed since rekey read it (another rekey job sharing it?): nothing was written; run the command again"),
        "{err}"
    );
    assert_eq!(material_of(&path, 2), [8; 32]);
    assert_eq!(
        KeyringFile::open(&backup_path(&path), b"pw", "P")
            .unwrap()
            .table
            .entries
            .len(),
        1,
        "the backup is the version before the first save"
    );
    // run again, the second job reads the first's key 2 and stages nothing new
    let mut again = KeyringFile::open(&path, b"pw", "P").unwrap();
    assert_eq!(
        again.table.stage(Key::new(2, [9; 32]), 300).unwrap(),
        (2, false)
    );
}

#[test]
fn a_save_never_replaces_an_archive_changed_since_it_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    two_retired(&path);
    let mut file = KeyringFile::open(&path, b"pw", "P").unwrap();
    // another process puts the archive back as it was before key 2 left the file
    let archive = archive_path(&path);
    fs::copy(backup_path(&archive), &archive).unwrap();
    let restored = fs::read(&archive).unwrap();
    file.table.stage(Key::new(4, [10; 32]), 800).unwrap();
    let err = file
        .save()
        .expect_err("the save replaced an archive it had not read");
    assert!(
        err.to_string().contains("changed since rekey read it"),
        "{err}"
    );
    assert_eq!(fs::read(&archive).unwrap(), restored);
    assert_eq!(
        KeyringFile::open(&path, b"pw", "P")
            .unwrap()
            .table
            .id_in(KeyState::Pending),
        None
    );
}

#[test]
fn a_save_through_a_symbolic_link_replaces_the_file_it_points_to_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("real")).unwrap();
    let real = dir.path().join("real").join("keys.json");
    KeyringFile::create(&real, b"pw", table()).unwrap();
    let link = dir.path().join("keys.json");
    std::os::unix::fs::symlink("real/keys.json", &link).unwrap();
    let mut file = KeyringFile::open(&link, b"pw", "P").unwrap();
    assert_eq!(file.path(), link, "the store keeps the name the job gives");
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.save().unwrap();
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the save replaced the link with a file"
    );
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("real/keys.json"));
    assert_eq!(material_of(&real, 2), [8; 32]);
    assert!(backup_path(&real).exists(), "the backup is beside the file");
    file.table.promote(300).unwrap();
    file.table.retire(1, 400).unwrap();
    file.save().unwrap();
    assert!(holds_material(&archive_path(&real), 1));
    let reopened = KeyringFile::open(&link, b"pw", "P").unwrap();
    assert!(
        reopened.table.entries[0].key.is_some(),
        "the retired key is read from the archive beside the file"
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "only the link and its folder: {names:?}");
}

/// A keyring file holding key 1 current and key 2 previous, with key 2's
/// state then changed to `state` by hand.
fn with_key_2_marked(path: &Path, state: &str) {
    let mut two = table();
    two.entries.push(Entry {
        id: 2,
        state: KeyState::Previous,
        created_at: 200,
        changed_at: 200,
        key: Some(Key::new(2, [8; 32])),
        compromised: false,
    });
    KeyringFile::create(path, b"pw", two).unwrap();
    let text = fs::read_to_string(path).unwrap();
    assert_eq!(text.matches("\"previous\"").count(), 1);
    fs::write(path, text.replace("\"previous\"", &format!("{state:?}"))).unwrap();
}

#[test]
fn a_file_with_two_current_keys_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    with_key_2_marked(&path, "current");
    let err =
        KeyringFile::open(&path, b"pw", "P").expect_err("a file with two current keys was opened");
    let said = err.to_string();
    assert!(
        matches!(err, FileKeyringError::Malformed { .. })
            && said.contains("keys 1 and 2 are both current")
            && said.contains("\"previous\""),
        "{said}"
    );
}

#[test]
fn a_file_with_two_pending_keys_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = KeyringFile::create(&path, b"pw", table()).unwrap();
    file.table.stage(Key::new(2, [8; 32]), 200).unwrap();
    file.table.promote(300).unwrap();
    file.table.stage(Key::new(3, [9; 32]), 400).unwrap();
    file.save().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"previous\"", "\"pending\"")).unwrap();
    let err =
        KeyringFile::open(&path, b"pw", "P").expect_err("a file with two pending keys was opened");
    let said = err.to_string();
    assert!(
        matches!(err, FileKeyringError::Malformed { .. })
            && said.contains("keys 1 and 3 are both pending"),
        "{said}"
    );
}

#[test]
fn a_relative_path_that_does_not_exist_names_where_rekey_looked() {
    let name = "no-keyring-file-of-this-name.json";
    let err = KeyringFile::open(Path::new(name), b"pw", "P").unwrap_err();
    let looked = std::env::current_dir().unwrap().join(name);
    let said = err.to_string();
    assert!(
        said.contains(&looked.display().to_string())
            && said.contains("relative to the directory rekey runs in"),
        "{said}"
    );
}

#[test]
fn the_record_of_databases_is_written_owner_only_beside_the_file_and_read_back() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut file = KeyringFile::create(&path, b"correct horse", table()).unwrap();
    let user = crate::secrets::uses::User {
        database_id: "d".into(),
        database: "d on a server".into(),
        job: "j".into(),
    };
    let keyring_before = fs::read(&path).unwrap();
    assert!(file
        .update_uses(|u| crate::secrets::uses::widen(u, &user, &[1], 1))
        .unwrap());
    // the keyring file itself is not written
    assert_eq!(fs::read(&path).unwrap(), keyring_before);
    let at = uses_beside::path_of(&path);
    assert_eq!(
        fs::metadata(&at).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let opened = KeyringFile::open(&path, b"correct horse", "P").unwrap();
    assert_eq!(opened.uses.len(), 1);
    assert_eq!(opened.uses[0].keys, [1]);
}

#[test]
fn a_damaged_record_of_databases_is_named_for_what_it_is_and_not_taken_for_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    KeyringFile::create(&path, b"correct horse", table()).unwrap();
    let at = uses_beside::path_of(&path);
    write_owner_only(&at, b"{\"format\": \"rekey-keyring-uses/1\", \"uses\": [");
    let err = KeyringFile::open(&path, b"correct horse", "P").unwrap_err();
    assert!(
        matches!(&err, FileKeyringError::UsesDamaged { path, .. } if *path == at),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("remove it only where no other database uses the keyring file"));
}
