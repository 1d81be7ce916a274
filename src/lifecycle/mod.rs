//! The rotation around a run: stage a key, re-encrypt, verify, promote,
//! retire, each step recorded and audited, and the evidence of it: the
//! hash-chained audit trail and the report built from it. Uses the engine,
//! the state and the secret stores; nothing below imports from here.

pub mod abort;
pub mod audit;
pub mod catch_up;
pub mod chain;
pub mod evidence;
pub mod forward;
pub mod preview;
pub mod promotion;
pub mod reencrypt;
mod replayed;
pub mod retire;
pub mod rotation;
pub mod steps;
