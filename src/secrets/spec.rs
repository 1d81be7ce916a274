//! A `[keys]` section of a job file: which store a job's keys come from and
//! how to reach it.

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::KeyEncoding;

/// A `[keys]` section: one key source. `Debug` leaves out the database
/// URL, which may carry a password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// How the secret holds the keys (`aws-secrets-manager`): rekey's keyring
    /// (the default), a flat JSON of environment names, or the key itself.
    /// (Left out of the job's spec hash while default, as the two fields
    /// below: a job started before layouts existed resumes after an upgrade.)
    #[serde(default, skip_serializing_if = "Layout::is_rekey")]
    pub layout: Layout,
    /// How key material is written where applications read it (`env-json`,
    /// `value`, the environment): default, the encoding of the keys already
    /// there (see `secrets::layout::detect_encoding`), else Fernet's for a
    /// Fernet job and hex otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_encoding: Option<KeyEncoding>,
    /// For `layout = "value"`: the secret the deployment reads
    /// `ENCRYPTION_KEY_NEW` from; default: the AWSPENDING version of `secret_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_secret_id: Option<String>,
    /// For `table`: the application's key table (may be schema-qualified;
    /// default `encryption_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// For `table`: the data keys of this `purpose` (default `PHI`); new keys get it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// For `table`: the key table's column names, where they differ from the
    /// key hierarchy procedure's `encryption_keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<crate::secrets::table::KeyColumns>,
    /// For `table`: a new data key's `expiresAt`, in days after its creation (default 90).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
    /// The database the job runs against (set when the command resolves it,
    /// not written in the job): where a `table` source's keys are.
    #[serde(skip)]
    pub database_url: Option<String>,
    /// Whether every target of the job is Fernet (set when the job file is
    /// loaded, not written in it): decides an ambiguous base64 key encoding.
    #[serde(skip)]
    pub fernet_job: bool,
}

impl std::fmt::Debug for KeysSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // destructured: a field added later must be placed here on purpose
        let KeysSpec {
            source,
            prefix,
            path,
            passphrase_env,
            secret_id,
            region,
            endpoint,
            kms_key_id,
            layout,
            key_encoding,
            pending_secret_id,
            table,
            purpose,
            columns,
            expires_in_days,
            database_url,
            fernet_job,
        } = self;
        f.debug_struct("KeysSpec")
            .field("source", source)
            .field("prefix", prefix)
            .field("path", path)
            .field("passphrase_env", passphrase_env)
            .field("secret_id", secret_id)
            .field("region", region)
            .field("endpoint", endpoint)
            .field("kms_key_id", kms_key_id)
            .field("layout", layout)
            .field("key_encoding", key_encoding)
            .field("pending_secret_id", pending_secret_id)
            .field("table", table)
            .field("purpose", purpose)
            .field("columns", columns)
            .field("expires_in_days", expires_in_days)
            .field("database_url", &database_url.as_ref().map(|_| "<redacted>"))
            .field("fernet_job", fernet_job)
            .finish()
    }
}

/// How a secret holds a job's keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// rekey's own keyring JSON (`{"format": "rekey-keyring/1", "keys": [...]}`).
    #[default]
    Rekey,
    /// A flat JSON object of environment names: `<PREFIX>_KEY_V<n>` +
    /// `<PREFIX>_CURRENT_VERSION`, or `<PREFIX>_KEY` + `<PREFIX>_KEY_NEW`;
    /// every other member is left byte for byte.
    EnvJson,
    /// The secret string is the key itself (healthprep's `ENCRYPTION_KEY`).
    Value,
}

impl Layout {
    /// The default layout.
    pub fn is_rekey(&self) -> bool {
        *self == Layout::Rekey
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Rekey => "rekey",
            Layout::EnvJson => "env-json",
            Layout::Value => "value",
        })
    }
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
            KeySource::Table => format!(
                "version {id} of the key table {}",
                self.table
                    .as_deref()
                    .unwrap_or(crate::secrets::table::DEFAULT_TABLE)
            ),
        }
    }

    /// Which store this is (`file:/etc/rekey/keyring.json`,
    /// `env:ENCRYPTION`): recorded with each run's targets, so that a
    /// retire can tell a table rotated under another store from one under
    /// its own. One store has one name however the job file spells it: a
    /// file by its canonical path (absolute where it does not exist), a
    /// secret by its name (an ARN's name without its random suffix). A KMS
    /// keyring is named by its file alone: a rewrap changes its master key.
    pub fn store_label(&self) -> String {
        let path = || {
            self.path.as_ref().map_or_else(String::new, |p| {
                std::fs::canonicalize(p)
                    .or_else(|_| std::path::absolute(p))
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            })
        };
        match self.source {
            KeySource::Env => format!("env:{}", self.prefix),
            KeySource::TinkKeyset => format!("tink-keyset:{}", path()),
            KeySource::File => format!("file:{}", path()),
            KeySource::AwsSecretsManager => format!(
                "aws-secrets-manager:{}",
                secret_name(self.secret_id.as_deref().unwrap_or_default())
            ),
            KeySource::AwsKms => format!("aws-kms:{}", path()),
            KeySource::Table => format!(
                "table:{}:{}",
                self.table
                    .as_deref()
                    .unwrap_or(crate::secrets::table::DEFAULT_TABLE),
                self.purpose
                    .as_deref()
                    .unwrap_or(crate::secrets::table::DEFAULT_PURPOSE)
            ),
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
            layout: Layout::Rekey,
            key_encoding: None,
            pending_secret_id: None,
            table: None,
            purpose: None,
            columns: None,
            expires_in_days: None,
            database_url: None,
            fernet_job: false,
        }
    }

    /// The variable a keyring file's passphrase is read from.
    pub fn passphrase_var(&self) -> &str {
        self.passphrase_env
            .as_deref()
            .unwrap_or("REKEY_KEYRING_PASSPHRASE")
    }
}

/// A Secrets Manager secret's name, given its name or its ARN
/// (`arn:aws:secretsmanager:<region>:<account>:secret:<name>-<6 characters>`).
/// The name of the secret where rekey records the databases whose values
/// the keys of secret `id` (a name or an ARN) encrypt
/// ([`crate::secrets::uses`]): its name with [`USES_SECRET_SUFFIX`].
pub fn uses_secret_name(id: &str) -> String {
    format!("{}{USES_SECRET_SUFFIX}", secret_name(id))
}

/// What a keyring secret's name takes to name its record's secret.
pub const USES_SECRET_SUFFIX: &str = ".rekey-uses";

fn secret_name(id: &str) -> &str {
    match id.split_once(":secret:") {
        Some((arn, rest)) if arn.starts_with("arn:") => rest
            .rsplit_once('-')
            .filter(|(_, suffix)| suffix.len() == 6)
            .map_or(rest, |(name, _)| name),
        _ => id,
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
    /// Data keys wrapped by an AWS KMS master key (`kms_key_id`), kept in a
    /// table of the target database (`table`), as the key hierarchy procedure keeps them.
    Table,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_named_by_its_arn_or_its_name_is_one_store() {
        assert_eq!(
            secret_name("arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/keys-a1B2c3"),
            "prod/keys"
        );
        assert_eq!(secret_name("prod/keys"), "prod/keys");
        assert_eq!(secret_name("prod-keys"), "prod-keys");
    }

    #[test]
    fn a_keyring_file_spelled_relative_or_absolute_is_one_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keyring.json");
        std::fs::write(&file, "{}").unwrap();
        let label = |path: std::path::PathBuf| {
            let mut keys = KeysSpec::env("ENCRYPTION");
            keys.source = KeySource::File;
            keys.path = Some(path);
            keys.store_label()
        };
        let dotted = dir.path().join(".").join("keyring.json");
        assert_eq!(label(file.clone()), label(dotted));
        assert_eq!(
            label(file.clone()),
            format!("file:{}", std::fs::canonicalize(&file).unwrap().display())
        );
    }

    #[test]
    fn debug_never_shows_the_database_url_which_may_carry_a_password() {
        let mut keys = KeysSpec::env("ENCRYPTION");
        keys.source = KeySource::Table;
        keys.database_url = Some("postgres://rekey:s3cr3t-pw@db.internal/app".into());
        let shown = format!("{keys:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(!shown.contains("db.internal"), "{shown}");
        assert!(
            shown.contains("database_url: Some(\"<redacted>\")"),
            "{shown}"
        );
        assert!(shown.contains("source: Table"), "{shown}");
    }
}
