//! A key table as a key store (`[keys] source = "table"`): data keys kept
//! the way the key hierarchy procedure keeps them, one row each in a table
//! of the target database (`encryption_keys`: `version`, `purpose`,
//! `algorithm`, `encryptedKey`, `status`, `createdAt`, `expiresAt`), each
//! wrapped by a KMS master key (`GenerateDataKey`) and unwrapped only in
//! memory ([`store`]), written back in one transaction (`write`).
//!
//! The table's `status` says what applications do with a key: they encrypt
//! with the one `ACTIVE` key and decrypt with any key by its version.
//! rekey's lifecycle has more states; they map onto the table so that an
//! application never writes with a key before it is promoted:
//!
//! | rekey state | row `status` | rekey's marker (`rekey.key_table_keys`) |
//! |---|---|---|
//! | current | `ACTIVE` | current |
//! | current, compromised by the application (no `ACTIVE` row) | `COMPROMISED`, left so | current, compromised |
//! | pending (staged) | `INACTIVE` (readable, never written with) | pending |
//! | previous | `INACTIVE` | previous |
//! | previous, compromised | `COMPROMISED` | previous, compromised |
//! | retired | row deleted (wrapped key kept in the marker until purged) | retired |
//!
//! A current key rekey marks compromised stays `ACTIVE` until the promotion:
//! the table always has one key applications can write with. A promotion
//! sets the old key `INACTIVE` (or `COMPROMISED`) and the new one `ACTIVE`
//! in one transaction. Rows rekey finds without a marker are read from
//! their status alone (`ACTIVE` current, others previous), except that a
//! purpose without an `ACTIVE` row (the procedure's emergency rotation
//! marks the old key `COMPROMISED` first) has its newest `COMPROMISED` row
//! that rekey did not stage or retire as its current key, compromised: a
//! compromise rotation then moves every value off it and destroys it.
//! rekey never writes a `COMPROMISED` row back to `ACTIVE`. A purpose with
//! neither is refused, naming the fix.
//!
//! Versions are unique across the whole table, every purpose together (the
//! procedure's `getNextKeyVersion`): applications may look a key up by
//! version alone, so a new key's version is above every row's and every
//! retired marker's of the table.

#[cfg(feature = "aws")]
pub mod store;
#[cfg(feature = "aws")]
mod write;

use serde::{Deserialize, Serialize};

use crate::crypto::keytable::{Entry, KeyState};

#[cfg(not(feature = "aws"))]
pub use crate::secrets::without_aws::KeyTableStore;
#[cfg(feature = "aws")]
pub use store::KeyTableStore;

/// The key table when the job names none: the procedure's.
pub const DEFAULT_TABLE: &str = "encryption_keys";
/// The purpose when the job names none.
pub const DEFAULT_PURPOSE: &str = "PHI";
/// A new data key's lifetime when the job says nothing: the procedure's 90 days.
pub const DEFAULT_EXPIRES_IN_DAYS: u32 = 90;
/// The algorithm written for a new key when no existing row says otherwise.
pub const DEFAULT_ALGORITHM: &str = "AES-256-GCM";

/// The key table's column names (`[keys.columns]`); each defaults to the
/// procedure's `encryption_keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyColumns {
    /// The key's version: rekey's key id (an integer; `version`).
    pub version: String,
    /// What the key is for (`purpose`).
    pub purpose: String,
    /// The cipher (`algorithm`).
    pub algorithm: String,
    /// The wrapped data key, `bytea` (`encryptedKey`).
    pub encrypted_key: String,
    /// ACTIVE / INACTIVE / COMPROMISED (`status`).
    pub status: String,
    /// Creation time (`createdAt`).
    pub created_at: String,
    /// Expiry time (`expiresAt`).
    pub expires_at: String,
}

impl Default for KeyColumns {
    fn default() -> Self {
        KeyColumns {
            version: "version".into(),
            purpose: "purpose".into(),
            algorithm: "algorithm".into(),
            encrypted_key: "encryptedKey".into(),
            status: "status".into(),
            created_at: "createdAt".into(),
            expires_at: "expiresAt".into(),
        }
    }
}

/// A row's `status`, as the procedure names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Applications encrypt with it.
    Active,
    /// Applications only decrypt with it.
    Inactive,
    /// Known compromised: applications only decrypt with it.
    Compromised,
}

impl Status {
    /// The word in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Inactive => "INACTIVE",
            Status::Compromised => "COMPROMISED",
        }
    }

    /// Reads the word in the table; `None` for any other.
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ACTIVE" => Some(Status::Active),
            "INACTIVE" => Some(Status::Inactive),
            "COMPROMISED" => Some(Status::Compromised),
            _ => None,
        }
    }

    /// The status a key in rekey's table has in the key table (a retired
    /// key has no row).
    pub fn of(e: &Entry) -> Status {
        match (e.state, e.compromised) {
            (KeyState::Current, _) => Status::Active,
            (_, true) => Status::Compromised,
            _ => Status::Inactive,
        }
    }

    /// The status written for `e`, whose row was read `COMPROMISED` when
    /// `row_compromised`: a current key standing in for a purpose without
    /// an `ACTIVE` row keeps `COMPROMISED`, never made `ACTIVE` again.
    pub fn written(e: &Entry, row_compromised: bool) -> Status {
        match Status::of(e) {
            Status::Active if row_compromised => Status::Compromised,
            s => s,
        }
    }

    /// rekey's state of a row with this status and rekey's `marker`.
    pub fn state(self, marker: Option<KeyState>) -> KeyState {
        match (self, marker) {
            (Status::Active, _) => KeyState::Current,
            (_, Some(KeyState::Pending)) => KeyState::Pending,
            _ => KeyState::Previous,
        }
    }
}

/// Parses a lifecycle marker's state word.
pub fn marker_state(s: &str) -> Option<KeyState> {
    match s {
        "pending" => Some(KeyState::Pending),
        "current" => Some(KeyState::Current),
        "previous" => Some(KeyState::Previous),
        "retired" => Some(KeyState::Retired),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: KeyState, compromised: bool) -> Entry {
        Entry {
            id: 1,
            state,
            created_at: 0,
            changed_at: 0,
            key: None,
            compromised,
        }
    }

    #[test]
    fn only_the_current_key_is_active_so_applications_never_write_with_a_staged_key() {
        assert_eq!(Status::of(&entry(KeyState::Current, false)), Status::Active);
        assert_eq!(Status::of(&entry(KeyState::Current, true)), Status::Active);
        assert_eq!(
            Status::of(&entry(KeyState::Pending, false)),
            Status::Inactive
        );
        assert_eq!(
            Status::of(&entry(KeyState::Previous, false)),
            Status::Inactive
        );
        assert_eq!(
            Status::of(&entry(KeyState::Previous, true)),
            Status::Compromised
        );
    }

    #[test]
    fn a_current_key_read_from_a_compromised_row_is_written_back_compromised() {
        let current = entry(KeyState::Current, true);
        assert_eq!(Status::written(&current, true), Status::Compromised);
        assert_eq!(Status::written(&current, false), Status::Active);
        let previous = entry(KeyState::Previous, false);
        assert_eq!(Status::written(&previous, true), Status::Inactive);
    }

    #[test]
    fn columns_default_to_the_procedures_table_and_a_job_names_only_those_that_differ() {
        let keys: crate::secrets::KeysSpec = toml::from_str(
            "source = \"table\"\nkms_key_id = \"alias/phi-master-key\"\n[columns]\nstatus = \"key_status\"\n",
        )
        .unwrap();
        let columns = keys.columns.unwrap();
        assert_eq!(columns.status, "key_status");
        assert_eq!(columns.encrypted_key, "encryptedKey");
        assert_eq!(columns.expires_at, "expiresAt");
        let typo = toml::from_str::<crate::secrets::KeysSpec>(
            "source = \"table\"\n[columns]\nencrypted = \"k\"\n",
        );
        assert!(typo.is_err(), "a misspelt column field is an error");
    }

    #[test]
    fn a_row_reads_back_as_the_state_it_was_written_from() {
        for (state, compromised) in [
            (KeyState::Current, false),
            (KeyState::Pending, false),
            (KeyState::Previous, false),
            (KeyState::Previous, true),
        ] {
            let status = Status::of(&entry(state, compromised));
            assert_eq!(status.state(Some(state)), state);
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::Inactive.state(None), KeyState::Previous);
        assert_eq!(
            Status::Active.state(Some(KeyState::Pending)),
            KeyState::Current,
            "promoted by hand: the table wins"
        );
        assert_eq!(Status::parse("active"), None);
    }
}
