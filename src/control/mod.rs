//! What a run obeys between batches: live control (pause, resume, stop),
//! the rows/s pace, the hold, the adaptive batch size, replica lag, the
//! WAL rate and archive lag, and the SQL gate. Holds no transaction while a
//! run waits.

pub mod archive;
pub mod monitor;
pub mod signals;
pub mod stop;
pub mod throttle;
pub mod wal;
