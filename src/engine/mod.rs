//! The engine: source -> transform -> sink, joined by bounded channels, and
//! what plans and checks its work. [`pipeline`] wires the stages and is the
//! only place that spawns. Uses the state, control, job and lower layers.

pub mod behind;
mod conflicts;
pub mod held;
pub mod left;
pub mod named_keys;
mod others;
mod pacing;
pub mod pipeline;
pub mod plan;
pub mod rehash;
mod retry;
pub mod rewrite;
pub mod sink;
pub mod source;
mod split;
pub mod sql;
mod stages;
pub mod transform;
pub mod uses;
pub mod verify;
mod watch;
mod work;
