//! Cryptography with no I/O: the ciphertext formats ([`codec`]), keys and
//! keyrings ([`keyring`]), the lifecycle states of a store's keys
//! ([`keytable`]), the nonce generator and the search hashes
//! ([`search_hash`]). Uses nothing else of rekey's.

pub mod codec;
pub mod keyring;
pub mod keytable;
pub mod nonce;
pub mod search_hash;
pub mod stored;
