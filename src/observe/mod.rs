//! What a run tells the operator: counters, metrics and log lines (one
//! struct per event), and the progress line. Uses nothing else of rekey's
//! but the error type.

pub mod counts;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod progress;
