//! Replacing a store file without ever leaving it unreadable (write beside
//! it, sync, back up, rename, sync the directory), and keeping its archive
//! of retired keys in step with it.

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
        write_archive(path, &superset, &render)?;
    }
    save_main()?;
    if ids(&archived) != ids(&superset) {
        write_archive(path, &archived, &render)?;
    }
    Ok(())
}

/// Replaces `path`'s archive with `keys`, or removes it when there are none.
pub(super) fn write_archive(
    path: &Path,
    keys: &[StoredKey],
    render: &impl Fn(&[StoredKey]) -> Result<Vec<u8>, serde_json::Error>,
) -> Result<(), FileKeyringError> {
    let archive = archive_path(path);
    if keys.is_empty() {
        return match fs::remove_file(&archive) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&archive)(e)),
            _ => sync_dir(&archive),
        };
    }
    let json = render(keys).map_err(|e| FileKeyringError::Malformed {
        path: archive.clone(),
        problem: e.to_string(),
    })?;
    let tmp = write_pending(&archive, &json)?;
    fs::rename(&tmp, &archive).map_err(io(&archive))?;
    sync_dir(&archive)
}

/// Where a store file keeps its retired keys: `<file>.archive`.
pub fn archive_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".archive");
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

/// Writes `bytes` beside `path` (owner-only, synced); returns the temporary path.
pub fn write_pending(path: &Path, bytes: &[u8]) -> Result<PathBuf, FileKeyringError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
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

/// Backs up `path` to `<path>.bak`, renames `tmp` over it and syncs the
/// directory; with `scrub_backup`, the backup becomes the new version too
/// (a retired key must not live on in it).
pub fn commit(path: &Path, tmp: &Path, scrub_backup: bool) -> Result<(), FileKeyringError> {
    let bak = path.with_extension("bak");
    let backup = |from: &Path| -> Result<(), FileKeyringError> {
        fs::copy(from, &bak).map_err(io(&bak))?;
        File::open(&bak)
            .and_then(|f| f.sync_all())
            .map_err(io(&bak))
    };
    if path.exists() {
        backup(path)?;
    }
    fs::rename(tmp, path).map_err(io(path))?;
    if scrub_backup {
        backup(path)?;
    }
    sync_dir(path)
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
