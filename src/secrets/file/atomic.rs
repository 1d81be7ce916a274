//! Replacing a store file without ever leaving it unreadable (write beside
//! it, sync, back up, rename, sync the directory), and keeping its archive
//! of retired keys, and the backups of both, in step with it.
//!
//! Every name beside a file is its whole name with a suffix appended
//! (`keyring.json.bak`, `keyring.json.tmp-<pid>`, `keyring.json.archive`),
//! so two files of one stem (`prod.json`, `prod.toml`) never share one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::crypto::keytable::StoredKey;

use super::{io, FileKeyringError};

/// Saves a store file (`save_main`) and its archive of retired keys in the
/// order that never loses material: the archive first gains what is being
/// archived (keeping what it held), then the file is saved, then the archive
/// drops what was restored or purged (removed when empty).
pub fn save_with_archive(
    path: &Path,
    archived: Vec<StoredKey>,
    on_disk: &[StoredKey],
    render: impl Fn(&[StoredKey]) -> Result<Vec<u8>, serde_json::Error>,
    save_main: impl FnOnce() -> Result<(), FileKeyringError>,
) -> Result<(), FileKeyringError> {
    let ids = |keys: &[StoredKey]| {
        keys.iter()
            .map(|k| k.id)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut superset = archived.clone();
    superset.extend(
        on_disk
            .iter()
            .filter(|k| !ids(&archived).contains(&k.id))
            .cloned(),
    );
    if ids(&superset) != ids(on_disk) {
        write_archive(path, &superset, &render, Backup::Previous)?;
    }
    save_main()?;
    if ids(&archived) != ids(&superset) {
        write_archive(path, &archived, &render, Backup::Scrubbed)?;
    }
    Ok(())
}

/// What a replaced file's backup becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backup {
    /// The version being replaced (none when there was none).
    Previous,
    /// The new version: material the file drops must not live on in it.
    Scrubbed,
}

/// Replaces `path`'s archive with `keys`, or removes it (and its backup)
/// when there are none. Its backup, `<file>.archive.bak`, never holds a
/// key the archive does not: it is the previous archive while keys are
/// only added (a new archive's own copy, since retired keys are nowhere
/// else), the new one once keys leave (restored or purged).
pub(super) fn write_archive(
    path: &Path,
    keys: &[StoredKey],
    render: &impl Fn(&[StoredKey]) -> Result<Vec<u8>, serde_json::Error>,
    backup: Backup,
) -> Result<(), FileKeyringError> {
    let archive = archive_path(path);
    if keys.is_empty() {
        // the backup first: at no instant does it outlive the archive
        for file in [backup_path(&archive), archive.clone()] {
            match fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&file)(e)),
                _ => sync_dir(&file)?,
            }
        }
        remove_abandoned_pending(&archive);
        return Ok(());
    }
    let json = render(keys).map_err(|e| FileKeyringError::Malformed {
        path: archive.clone(),
        problem: e.to_string(),
        backup: None,
    })?;
    let tmp = write_pending(&archive, &json)?;
    let backup = if archive.exists() {
        backup
    } else {
        Backup::Scrubbed
    };
    replace(&archive, &tmp, backup)
}

/// Where the store file named `path` is: `path` itself, or, where `path`
/// is a symbolic link, the file its chain of links ends at (which need not
/// exist yet). A save replaces that file, so a link stays a link, and what
/// reads the file by any of its names reads the new version; the files
/// beside it (backup, archive, lock, temporary copies) are beside that file.
pub fn resolve(path: &Path) -> Result<PathBuf, FileKeyringError> {
    let mut at = path.to_path_buf();
    // as many links in a chain as Linux follows
    for _ in 0..40 {
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let to = fs::read_link(&at).map_err(io(&at))?;
                // a relative target is relative to the link's directory
                at = match at.parent() {
                    Some(dir) => dir.join(to),
                    None => to,
                };
            }
            _ => return Ok(at),
        }
    }
    Err(io(path)(std::io::Error::other(
        "too many levels of symbolic links",
    )))
}

/// Where a store file keeps its retired keys: `<file>.archive`.
pub fn archive_path(path: &Path) -> PathBuf {
    beside(path, ".archive")
}

/// Where a store file keeps the version before its last save: `<file>.bak`.
pub fn backup_path(path: &Path) -> PathBuf {
    beside(path, ".bak")
}

/// `path`'s whole name with `suffix` appended.
pub(super) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Syncs the directory holding `path`, so a rename in it is durable.
pub(super) fn sync_dir(path: &Path) -> Result<(), FileKeyringError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Writes `bytes` beside `path` (`<file>.tmp-<pid>`, owner-only, synced);
/// returns the temporary path.
pub fn write_pending(path: &Path, bytes: &[u8]) -> Result<PathBuf, FileKeyringError> {
    let tmp = beside(path, &format!(".tmp-{}", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp).map_err(io(&tmp))?;
    // a file left by an earlier process of the same id keeps its mode
    restrict(&f).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    Ok(tmp)
}

/// Backs up `path` to `<file>.bak`, renames `tmp` over it and syncs the
/// directory; with `scrub_backup`, the backup becomes the new version
/// instead (a retired key must not live on in it). A backup an earlier
/// rekey named `<stem>.bak` is removed once it is recognised as this
/// file's ([`same_keyring`]).
pub fn commit(path: &Path, tmp: &Path, scrub_backup: bool) -> Result<(), FileKeyringError> {
    replace(
        path,
        tmp,
        if scrub_backup {
            Backup::Scrubbed
        } else {
            Backup::Previous
        },
    )?;
    if scrub_backup {
        // a compromised key is destroyed without a save of the archive
        remove_abandoned_pending(&archive_path(path));
    }
    retire_legacy_backup(path, scrub_backup)
}

/// Copies `from` to `path`'s backup and syncs it.
fn back_up(path: &Path, from: &Path) -> Result<(), FileKeyringError> {
    let bak = backup_path(path);
    fs::copy(from, &bak).map_err(io(&bak))?;
    File::open(&bak)
        .and_then(|f| f.sync_all())
        .map_err(io(&bak))
}

/// Renames `tmp` over `path` with its backup written first: the previous
/// version, or, scrubbed, the new one, so that at no instant does the
/// backup hold material both versions lack.
fn replace(path: &Path, tmp: &Path, backup: Backup) -> Result<(), FileKeyringError> {
    match backup {
        Backup::Previous if path.exists() => back_up(path, path)?,
        Backup::Previous => {}
        Backup::Scrubbed => back_up(path, tmp)?,
    }
    fs::rename(tmp, path).map_err(io(path))?;
    sync_dir(path)?;
    if backup == Backup::Scrubbed {
        remove_abandoned_pending(path);
    }
    Ok(())
}

/// Removes what saves that never finished left beside `path`
/// (`<file>.tmp-<pid>` of another process: killed between writing and
/// renaming), once material has left the file: such a file may still hold
/// a retired key's material, sealed as the file is. A save of another
/// process in flight at this instant loses its temporary file and fails
/// with an error, leaving the file as it was; nothing is lost. Called after
/// the save itself is done, so what it cannot remove is a warning, not a
/// failed save.
fn remove_abandoned_pending(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut prefix = name.as_encoded_bytes().to_vec();
    prefix.extend_from_slice(b".tmp-");
    let ours = std::process::id().to_string();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(
                "could not look for copies unfinished saves left beside {} ({e}): any such `.tmp-<pid>` file may still hold a retired key's material, and should be deleted",
                path.display()
            );
            return;
        }
    };
    let mut removed = false;
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.as_encoded_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        if pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) || pid == ours.as_bytes() {
            continue;
        }
        let left = entry.path();
        match fs::remove_file(&left) {
            Ok(()) => {
                tracing::warn!(
                    "removed {}, left by a save that never finished: it could hold a retired key's material",
                    left.display()
                );
                removed = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "could not remove {}, left by a save that never finished ({e}): it may still hold a retired key's material, and should be deleted",
                left.display()
            ),
        }
    }
    if removed {
        if let Err(e) = sync_dir(path) {
            tracing::warn!("{e}");
        }
    }
}

/// The name an earlier rekey gave `path`'s backup (`keyring.bak` for
/// `keyring.json`), when that is neither the file nor its backup today.
fn legacy_backup(path: &Path) -> Option<PathBuf> {
    let legacy = path.with_extension("bak");
    (legacy != path && legacy != backup_path(path)).then_some(legacy)
}

/// Removes `path`'s backup under the name an earlier rekey gave it, once
/// it is recognised as this file's ([`same_keyring`]): `<file>.bak` now
/// holds a later version, and with `retired` keys the old one may still
/// hold their material. A file of that name that is not recognised may be
/// another keyring's backup (`prod.toml`'s beside `prod.json`): it is left,
/// and, when keys were retired, named in a warning.
fn retire_legacy_backup(path: &Path, retired: bool) -> Result<(), FileKeyringError> {
    let Some(legacy) = legacy_backup(path) else {
        return Ok(());
    };
    let Ok(old) = fs::read(&legacy) else {
        return Ok(());
    };
    let new = fs::read(path).map_err(io(path))?;
    if same_keyring(&old, &new) {
        fs::remove_file(&legacy).map_err(io(&legacy))?;
        return sync_dir(&legacy);
    }
    if retired {
        tracing::warn!(
            "{} is not recognised as a backup of keyring file {} (an earlier rekey named backups so; {} is its backup now), so it was left as it is: if it is one after all, it may still hold a retired key's material, and should be deleted",
            legacy.display(),
            path.display(),
            backup_path(path).display()
        );
    }
    Ok(())
}

/// Whether `old` is an earlier version of the keyring file `new`: the
/// same format and key derivation (a passphrase file's random salt is
/// kept across saves), no key of `old` that `new` lacks or holds with
/// another fingerprint, and at least one key they share by fingerprint.
/// Neither file is quoted anywhere.
fn same_keyring(old: &[u8], new: &[u8]) -> bool {
    let (Ok(old), Ok(new)) = (
        serde_json::from_slice::<serde_json::Value>(old),
        serde_json::from_slice::<serde_json::Value>(new),
    ) else {
        return false;
    };
    let keys = |doc: &serde_json::Value| -> Option<Vec<(u64, String)>> {
        doc.get("keys")?
            .as_array()?
            .iter()
            .map(|k| {
                let fingerprint = k.get("fingerprint").and_then(|f| f.as_str());
                Some((
                    k.get("id")?.as_u64()?,
                    fingerprint.unwrap_or("").to_string(),
                ))
            })
            .collect()
    };
    let (Some(old_keys), Some(new_keys)) = (keys(&old), keys(&new)) else {
        return false;
    };
    let mut shared = false;
    for (id, fingerprint) in &old_keys {
        let Some((_, now)) = new_keys.iter().find(|(n, _)| n == id) else {
            return false;
        };
        match (fingerprint.is_empty(), now.is_empty()) {
            (false, false) if fingerprint != now => return false,
            (false, false) => shared = true,
            _ => {}
        }
    }
    old.get("format").is_some()
        && old.get("format") == new.get("format")
        && old.get("kdf") == new.get("kdf")
        && shared
}

/// Owner-only permissions for files holding sealed keys (Unix): opening
/// refuses any other ([`super::KeyringFile::open`]).
fn restrict(f: &File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = f;
    Ok(())
}
