//! A `[keys]` section of a job file: which store a job's keys come from and
//! how to reach it.

use serde::{Deserialize, Serialize};

/// A `[keys]` section: one key source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSpec {
    /// Which key source to read.
    pub source: KeySource,
    /// Environment variable prefix for the `env` source (default `ENCRYPTION`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The keyset file (`tink-keyset`) or keyring file (`file`).
    pub path: Option<std::path::PathBuf>,
    /// For `file`: the environment variable holding the passphrase (default `REKEY_KEYRING_PASSPHRASE`).
    pub passphrase_env: Option<String>,
    /// For `aws-secrets-manager`: the secret's name or ARN.
    pub secret_id: Option<String>,
    /// AWS region (else the SDK's default chain: AWS_REGION, profile, ...).
    pub region: Option<String>,
    /// Endpoint URL of a compatible service (else AWS's, or AWS_ENDPOINT_URL).
    pub endpoint: Option<String>,
    /// For `aws-kms`: the master key (id, ARN or alias) data keys are wrapped under.
    pub kms_key_id: Option<String>,
}

impl KeysSpec {
    /// Where key `id` of this source would be, for messages.
    pub fn where_key(&self, id: u32) -> String {
        let path = || {
            self.path
                .as_ref()
                .map_or_else(|| "(no path)".into(), |p| p.display().to_string())
        };
        match self.source {
            KeySource::Env => format!("{}_KEY_V{id} in the environment", self.prefix),
            KeySource::TinkKeyset => format!("key {id} of the Tink keyset {}", path()),
            KeySource::File => format!("key {id} of the keyring file {}", path()),
            KeySource::AwsSecretsManager => format!(
                "key {id} of secret {}",
                self.secret_id.as_deref().unwrap_or("(no secret_id)")
            ),
            KeySource::AwsKms => format!("key {id} of the KMS-wrapped keyring {}", path()),
        }
    }

    /// Keys from the environment under `prefix` (`{prefix}_KEY_V1`, ...).
    pub fn env(prefix: &str) -> KeysSpec {
        KeysSpec {
            source: KeySource::Env,
            prefix: prefix.into(),
            path: None,
            passphrase_env: None,
            secret_id: None,
            region: None,
            endpoint: None,
            kms_key_id: None,
        }
    }

    /// The variable a keyring file's passphrase is read from.
    pub fn passphrase_var(&self) -> &str {
        self.passphrase_env
            .as_deref()
            .unwrap_or("REKEY_KEYRING_PASSPHRASE")
    }
}

fn default_prefix() -> String {
    "ENCRYPTION".into()
}

/// The key sources rekey reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// `ENCRYPTION_KEY_V<n>` + `ENCRYPTION_CURRENT_VERSION`, or `ENCRYPTION_KEY` + `ENCRYPTION_KEY_NEW`.
    Env,
    /// A Tink cleartext JSON keyset (`path`); its primary key is the target.
    TinkKeyset,
    /// A rekey keyring file (`path`), sealed with a passphrase (`passphrase_env`).
    File,
    /// One AWS Secrets Manager secret (`secret_id`) holding the keyring, versions moved by staging labels.
    AwsSecretsManager,
    /// Data keys generated and wrapped by an AWS KMS master key (`kms_key_id`), kept wrapped in a file (`path`).
    AwsKms,
}
