//! The engine's own state: schema `rekey` in the target database. Jobs and
//! their live control, per-range progress and leases, conflicts to re-read,
//! how much each key has encrypted, and the key ids recorded for a store.
//! Uses the job and lower layers.

pub mod conflicts;
pub mod jobs;
pub mod key_ids;
pub mod key_usage;
pub mod leases;
pub mod locks;
pub mod progress;
pub mod rotated;
pub mod rotations;
pub mod schema;
pub mod status;

pub use conflicts::pending_conflicts;
pub use jobs::{
    finish_job, job_control, job_totals, last_job_keys, open_job, set_control, Control, JobRecord,
    JobState,
};
pub use key_usage::{count_encryptions, encryptions_so_far, Count, CountStatements, NONCE_BUDGET};
pub use leases::{ask_for_split, claim_range, heartbeat, release_ranges, split_range, Claim};
pub use locks::{advisory_lock, lock_job, lock_lifecycle, share_job_lock};
pub use progress::{
    disown_transaction, record_batch, record_retry, KeyRange, Lease, RangeState, Reached,
    RETRY_RANGE,
};
pub use schema::{ensure_schema, schema_exists};
pub use status::{job_status, JobStatus};
