//! `rekey keygen`: a new random key, printed in the encoding asked for.
//!
//! Unlike every other command's output, the key must reach stdout: a key
//! the operator believes saved but that was lost is data lost once it
//! encrypts anything. So a write that fails (a closed pipe, a full disk)
//! is an error, and so is a stdout that is `/dev/null` (where a closed
//! stdout points), refused before any key is made.

use crate::cli::args::KeygenArgs;
use crate::cli::out;
use crate::crypto::keyring;
use crate::Error;

/// `rekey keygen`.
pub fn keygen(args: &KeygenArgs) -> Result<u8, Error> {
    if stdout_is_dev_null() {
        return Err(Error::Config(
            "the key was not written: stdout is /dev/null (or was closed), where it would be lost; \
             give keygen a stdout that keeps it (a file, a pipe, or `$(rekey keygen)`)"
                .into(),
        ));
    }
    let material = keyring::generate_material();
    let key = keyring::encode_key(&material, args.format);
    out::line(format_args!("{}", key.as_str())).map_err(|e| {
        Error::Runtime(format!(
            "the key was not written to stdout ({e}) and is lost: run `rekey keygen` again where its output is kept"
        ))
    })?;
    Ok(0)
}

/// Whether stdout is `/dev/null`, which it is when it was closed: the
/// runtime opens a closed stdout there before `main`.
#[cfg(unix)]
fn stdout_is_dev_null() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    match (
        std::fs::File::from(fd).metadata(),
        std::fs::metadata("/dev/null"),
    ) {
        (Ok(out), Ok(null)) => out.file_type().is_char_device() && out.rdev() == null.rdev(),
        _ => false,
    }
}

/// See the Unix version; elsewhere nothing is refused up front.
#[cfg(not(unix))]
fn stdout_is_dev_null() -> bool {
    false
}
