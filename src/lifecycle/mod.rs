//! The rotation around a run: stage a key, re-encrypt, verify, promote,
//! retire, each step recorded and audited. Uses the engine, the state and
//! the secret stores; nothing below imports from here.

pub mod abort;
pub mod audit;
pub mod forward;
pub mod preview;
pub mod retire;
pub mod rotation;
pub mod steps;
