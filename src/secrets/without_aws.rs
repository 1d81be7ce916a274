//! The AWS key stores in a binary built without the `aws` feature: the same
//! names as `aws` and `kms`, so the key-source dispatch compiles unchanged,
//! and every way in (opening or creating a store) is a configuration error
//! saying how to get AWS support. No value of these types can exist.

use std::convert::Infallible;

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::KeyTable;
use crate::secrets::file::FileKeyringError;
use crate::secrets::uses::StoreUse;
use crate::secrets::KeysSpec;
use crate::Error;

/// Why `source` cannot be used here, and how to get a binary that can.
fn without_aws(source: &str) -> Error {
    Error::Config(format!(
        "keys source \"{source}\" needs AWS support, and this rekey was built without it (--no-default-features); \
         build it with the `aws` feature (on by default): cargo build --release, or add --features aws"
    ))
}

/// Stands in for `secrets::aws` (AWS Secrets Manager).
pub mod aws {
    use super::*;

    /// Never constructed: [`SecretsManagerStore::open`] always fails.
    #[derive(Debug)]
    pub struct SecretsManagerStore {
        /// As in the real store.
        pub table: KeyTable,
        /// Makes the type uninhabited.
        never: Infallible,
    }

    impl SecretsManagerStore {
        /// Fails: no AWS support in this build.
        pub async fn open(_keys: &KeysSpec) -> Result<Self, Error> {
            Err(without_aws("aws-secrets-manager"))
        }

        /// Fails: no AWS support in this build.
        pub async fn open_as(_keys: &KeysSpec, _restore: bool) -> Result<Self, Error> {
            Err(without_aws("aws-secrets-manager"))
        }

        /// Fails: no AWS support in this build.
        pub async fn create(_keys: &KeysSpec, _table: &KeyTable) -> Result<(), Error> {
            Err(without_aws("aws-secrets-manager"))
        }

        /// Unreachable: no value exists.
        pub fn secret_id(&self) -> String {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn hold_archived(&mut self, _key: &Key) {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn holds_unstaged_keys(&self) -> bool {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn promote_unfinished(&self) -> bool {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn new_key_place(&self) -> String {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn describe_layout(&self) -> String {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub async fn save(&mut self) -> Result<(), Error> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub async fn archived_key(&self, _id: KeyId) -> Result<Option<Key>, Error> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub async fn uses_now(&self) -> Result<Vec<StoreUse>, Error> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub async fn update_uses(
            &self,
            _change: &mut (dyn FnMut(&mut Vec<StoreUse>) -> bool + Send),
        ) -> Result<bool, Error> {
            match self.never {}
        }
    }
}

/// Stands in for `secrets::kms` (keys wrapped by AWS KMS).
pub mod kms {
    use super::*;

    /// Never constructed: [`KmsKeyring::open`] always fails.
    #[derive(Debug)]
    pub struct KmsKeyring {
        /// As in the real store.
        pub table: KeyTable,
        /// Makes the type uninhabited.
        never: Infallible,
    }

    impl KmsKeyring {
        /// Fails: no AWS support in this build.
        pub async fn open(_keys: &KeysSpec) -> Result<Self, Error> {
            Err(without_aws("aws-kms"))
        }

        /// Fails: no AWS support in this build.
        pub async fn open_with(_keys: &KeysSpec, _any_master: bool) -> Result<Self, Error> {
            Err(without_aws("aws-kms"))
        }

        /// Fails: no AWS support in this build.
        pub async fn create(_keys: &KeysSpec, _table: KeyTable) -> Result<(), Error> {
            Err(without_aws("aws-kms"))
        }

        /// Unreachable: no value exists.
        pub async fn new_key(&mut self, _id: KeyId) -> Result<Key, Error> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn secret_id(&self) -> String {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn describe_layout(&self) -> String {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn backup(&self) -> std::path::PathBuf {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn uses_now(&self) -> Result<Vec<StoreUse>, FileKeyringError> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub fn update_uses(
            &mut self,
            _change: impl FnOnce(&mut Vec<StoreUse>) -> bool,
        ) -> Result<bool, FileKeyringError> {
            match self.never {}
        }

        /// Unreachable: no value exists.
        pub async fn save(&mut self) -> Result<(), Error> {
            match self.never {}
        }
    }
}

/// Stands in for `secrets::table::store` (data keys wrapped by AWS KMS in a table).
#[derive(Debug)]
pub struct KeyTableStore {
    /// As in the real store.
    pub table: KeyTable,
    /// Makes the type uninhabited.
    never: Infallible,
}

impl KeyTableStore {
    /// Fails: no AWS support in this build.
    pub async fn open(_keys: &KeysSpec, _pinned: bool) -> Result<Self, Error> {
        Err(without_aws("table"))
    }

    /// Unreachable: no value exists.
    pub async fn new_key(&mut self, _id: KeyId) -> Result<Key, Error> {
        match self.never {}
    }

    /// Unreachable: no value exists.
    pub fn next_id(&self) -> Result<KeyId, Error> {
        match self.never {}
    }

    /// Unreachable: no value exists.
    pub fn secret_id(&self) -> String {
        match self.never {}
    }

    /// Unreachable: no value exists.
    pub async fn save(&mut self) -> Result<(), Error> {
        match self.never {}
    }
}

/// Stands in for `secrets::rewrap` (master key rotation through AWS KMS).
pub mod rewrap {
    use super::*;
    use crate::secrets::Store;

    /// What a rewrap did (never, in this build).
    #[derive(Debug, Clone, Default)]
    pub struct Rewrapped {
        /// The new master key's ARN.
        pub target: String,
        /// Wrapped data keys in the store.
        pub total: usize,
        /// Re-wrapped by this invocation.
        pub rewrapped: usize,
        /// Already under the new master key.
        pub already: usize,
        /// The master keys they were wrapped under before.
        pub from: std::collections::BTreeSet<String>,
        /// Keys of the same store the rewrap did not cover.
        pub elsewhere: Vec<String>,
        /// Keys of the same store KMS would not say the master key of.
        pub unchecked: Vec<String>,
    }

    /// Fails: no AWS support in this build.
    pub async fn open(_keys: &KeysSpec) -> Result<Store, Error> {
        Err(without_aws("aws-kms"))
    }

    /// Fails: no AWS support in this build.
    pub async fn rewrap(
        _store: &mut Store,
        _to: &str,
        _done: impl FnMut(KeyId),
    ) -> Result<Rewrapped, Error> {
        Err(without_aws("aws-kms"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aws_sources_are_a_configuration_error_that_says_how_to_get_them() {
        let err = super::without_aws("aws-kms");
        assert!(matches!(err, crate::Error::Config(_)));
        let text = err.to_string();
        assert!(
            text.contains("\"aws-kms\" needs AWS support") && text.contains("--features aws"),
            "{text}"
        );
    }
}
