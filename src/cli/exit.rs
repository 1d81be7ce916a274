//! The exit codes rekey promises (README, "Exit codes"). 0 means every value
//! in scope is on the target key; anything else says why not.

/// Exit code: done, but some values were quarantined.
pub const EXIT_QUARANTINED: u8 = 3;
/// Exit code: values are left on an old key (or undecryptable): verify found
/// them, or a run finished without rotating them (the database refused or
/// undid the write, or rows kept changing under it).
pub const EXIT_LEFT_ON_OLD_KEYS: u8 = 4;

/// Exit code: stopped on request (SIGINT/SIGTERM) before finishing; resumable.
pub const EXIT_STOPPED: u8 = 130;
/// Exit code: stopped at the end of its `--run-time` window; resumable.
pub const EXIT_WINDOW_ENDED: u8 = 5;
/// Exit code: `rotate` stopped for an operator step (redeploy, make the
/// environment changes printed) or for the grace period; run it again.
pub const EXIT_WAITING: u8 = 6;
/// Exit code: `report --check` found the evidence broken: an audit event
/// edited, deleted or reordered (in `rekey.audit` or the JSON file).
pub const EXIT_EVIDENCE_BROKEN: u8 = 7;
