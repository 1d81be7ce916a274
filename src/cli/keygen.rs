//! `rekey keygen`: a new random key, printed in the encoding asked for.

use crate::cli::args::KeygenArgs;
use crate::crypto::keyring;
use crate::Error;

/// `rekey keygen`.
pub fn keygen(args: &KeygenArgs) -> Result<u8, Error> {
    let material = keyring::generate_material();
    println!("{}", keyring::encode_key(&material, args.format).as_str());
    Ok(0)
}
