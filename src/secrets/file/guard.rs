//! One save of a store file at a time, and never over what another process
//! wrote since this one read the file. Two rekey jobs sharing a keyring
//! file each stage "the next key"; without this guard the second save
//! replaced the first's key, and the first job's values ended under a key
//! that no file (nor backup) held.
//!
//! A save takes an exclusive advisory lock (`flock`) on `<file>.lock` beside
//! the file, compares the file and its archive with the bytes this process
//! read (SHA-256 of each), writes only when neither changed, and releases
//! the lock once the file, its backup and its archive are written. The
//! operating system releases the lock when the process ends, however it
//! ends. The lock file holds nothing and is never removed: removing it would
//! let two processes lock two different files of one name.

use std::fs::{self, File, OpenOptions};
use std::path::Path;

use ring::digest::{digest, SHA256};

use super::atomic::{archive_path, beside};
use super::{io, FileKeyringError};

/// The SHA-256 of a file's bytes.
pub type Digest = [u8; 32];

/// What this process last read (or wrote) of a store file and its archive:
/// the digest of each one's bytes, `None` where there was no such file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AsRead {
    /// The file's.
    file: Option<Digest>,
    /// Its archive's.
    archive: Option<Digest>,
}

impl AsRead {
    /// The file as read from `file`'s bytes, its archive from `archive`'s
    /// (`None`: there was none).
    pub fn new(file: Option<Digest>, archive: Option<Digest>) -> Self {
        AsRead { file, archive }
    }

    /// A file about to be created at `path`: there is none, and its archive
    /// is as it is now (a save of another process creating the file
    /// meanwhile is a change).
    pub fn before_create(path: &Path) -> Result<Self, FileKeyringError> {
        Ok(AsRead {
            file: None,
            archive: digest_on_disk(&archive_path(path))?,
        })
    }

    /// The file at `path` and its archive as they are on disk now.
    fn on_disk(path: &Path) -> Result<Self, FileKeyringError> {
        Ok(AsRead {
            file: digest_on_disk(path)?,
            archive: digest_on_disk(&archive_path(path))?,
        })
    }
}

/// The digest of `bytes`.
pub fn digest_of(bytes: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The digest of the file at `path`, `None` when there is none.
fn digest_on_disk(path: &Path) -> Result<Option<Digest>, FileKeyringError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(digest_of(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Runs `save` (which writes the store file at `path`, its backup and its
/// archive) holding the lock beside the file, once the file and its archive
/// are found as `as_read` says this process read them; then records what
/// the save left on disk in `as_read`, so the process can save again.
/// Refused with [`FileKeyringError::Changed`], nothing written, when
/// another process wrote either since.
pub fn save_unless_changed(
    path: &Path,
    as_read: &mut AsRead,
    save: impl FnOnce() -> Result<(), FileKeyringError>,
) -> Result<(), FileKeyringError> {
    let _lock = lock(path)?;
    if AsRead::on_disk(path)? != *as_read {
        return Err(FileKeyringError::Changed {
            path: path.to_path_buf(),
        });
    }
    save()?;
    *as_read = AsRead::on_disk(path)?;
    Ok(())
}

/// Takes the exclusive lock on `<file>.lock` (created owner-only when
/// missing), waiting while another process holds it: a save holds it for
/// the few writes and syncs of one save. Released when the file returned
/// is dropped.
pub(super) fn lock(path: &Path) -> Result<File, FileKeyringError> {
    let at = beside(path, ".lock");
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&at).map_err(io(&at))?;
    file.lock().map_err(io(&at))?;
    Ok(file)
}
