//! The engine: source -> transform -> sink, joined by bounded channels, and
//! what plans and checks its work. [`pipeline`] wires the stages and is the
//! only place that spawns. Uses the state, control, job and lower layers.

pub mod pipeline;
mod conflicts;
pub mod plan;
pub mod rewrite;
pub mod sink;
pub mod source;
pub mod sql;
pub mod transform;
pub mod verify;
mod retry;
mod stages;
mod watch;
mod work;
