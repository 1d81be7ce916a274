//! Cryptography with no I/O: the ciphertext formats ([`codec`]), keys and
//! keyrings ([`keyring`]), the lifecycle states of a store's keys
//! ([`keytable`]) and the nonce generator. Uses nothing else of rekey's.

pub mod codec;
pub mod keyring;
pub mod keytable;
pub mod nonce;
pub mod stored;
