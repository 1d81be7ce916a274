//! Where a Secrets Manager keyring records the databases whose values its
//! keys encrypt ([`crate::secrets::uses`]): a secret of its own beside it,
//! `<name>.rekey-uses`, created by rekey, holding the records' JSON (no key
//! material). Not the keyring secret's value: applications parse that
//! (the layouts rekey keeps), and a field more could break them. Not its
//! tags: a tag's value holds 256 characters of a narrow alphabet, 50 tags
//! at most are shared with the user's, and TagResource replaces a tag with
//! no way to refuse a write over another database's, which would lose the
//! record that holds a retire back.
//!
//! Two databases' runs may update the record at once. As a keyring
//! secret's transition does, an update writes a new version labelled
//! AWSPENDING and moves AWSCURRENT onto it from the version it read, which
//! Secrets Manager refuses once another update moved the label since: the
//! update then reads the records again and applies its change to them.
//! (AWSPENDING itself may move to another update's version meanwhile: the
//! label is only what keeps a version written from being current before
//! its move.)

use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
use aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput;
use aws_sdk_secretsmanager::Client;

use super::errors::{aws_err, not_found, ops};
use super::{drop_pending_label, move_current_from, put, token};
use crate::secrets::file::json_problem;
use crate::secrets::spec::USES_SECRET_SUFFIX;
use crate::secrets::uses::{Document, StoreUse};
use crate::secrets::KeysSpec;
use crate::Error;

/// How many times an update reads the records again after another
/// process's update moved AWSCURRENT between its read and its write.
const ATTEMPTS: usize = 8;

/// How many more times a read asks for the record whose AWSCURRENT label
/// is missing (another update moving it) before calling it damaged.
const LABEL_TRIES: usize = 5;

/// Why the record secret could not be used (beside the service's own
/// errors, [`aws_err`]). Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum UsesSecretError {
    /// Its current version is not a record rekey wrote.
    #[error("secret {secret:?}, the record of the databases whose values the keys of secret {of:?} encrypt, is damaged: {problem}. Nothing was changed. Move AWSCURRENT back onto a version rekey wrote (`aws secretsmanager list-secret-version-ids --secret-id {secret}`, then `update-secret-version-stage`); delete it only where no other database uses {of:?} (a retire would no longer know of their values, and each database's next run records it again)")]
    Damaged {
        /// The record's secret.
        secret: String,
        /// The keyring secret.
        of: String,
        /// What is wrong, never quoting the value.
        problem: String,
    },
    /// Created where the keyring secret is not (another account or region
    /// than the caller's): the retires reading the record beside the
    /// keyring secret would not find it.
    #[error("secret {created}, rekey's record of the databases using secret {of:?}, is not beside it (expected {expected}): the caller's account or region is not the keyring secret's. Where rekey has just created it, it deleted it again (unless a warning above says otherwise); otherwise delete it (an earlier run made it there). Nothing else was written. Create {expected} in the keyring secret's account and region with the value {{\"format\":\"rekey-keyring-uses/1\",\"uses\":[]}} (or run rekey with credentials of that account)")]
    Elsewhere {
        /// The ARN of the secret created.
        created: String,
        /// Where it should be.
        expected: String,
        /// The keyring secret.
        of: String,
    },
    /// The keyring secret is in another account than the caller's (read
    /// by ARN under its resource policy): CreateSecret would make the
    /// record in the caller's account, where no retire reads it.
    #[error("secret {of:?} is in AWS account {owner}, and rekey runs as account {caller}: rekey keeps the record of the databases using a keyring beside it, in its account, and a secret it created would be in account {caller}, where no retire reads it. Create the record once in account {owner} (with that account's credentials: `aws secretsmanager create-secret --name {name} --secret-string '{{\"format\":\"rekey-keyring-uses/1\",\"uses\":[]}}'`, under the keyring secret's KMS key), and let account {caller} read and write it (GetSecretValue, PutSecretValue, UpdateSecretVersionStage in its resource policy) as it does the keyring secret; then run again")]
    OtherAccount {
        /// The keyring secret.
        of: String,
        /// The record's name.
        name: String,
        /// The keyring secret's account.
        owner: String,
        /// The caller's account.
        caller: String,
    },
    /// Other updates kept moving AWSCURRENT between this one's read and its write.
    #[error("secret {secret:?}: other databases' runs updated this record {ATTEMPTS} times while rekey was updating it; nothing of this update was kept: run again")]
    Busy {
        /// The record's secret.
        secret: String,
    },
}

impl From<UsesSecretError> for Error {
    fn from(e: UsesSecretError) -> Self {
        match e {
            UsesSecretError::Busy { .. } => Error::Runtime(e.to_string()),
            UsesSecretError::Damaged { .. }
            | UsesSecretError::Elsewhere { .. }
            | UsesSecretError::OtherAccount { .. } => Error::Config(e.to_string()),
        }
    }
}

/// The record's secret of one keyring secret.
#[derive(Debug, Clone)]
pub struct UsesSecret {
    /// How calls name it: a partial ARN in the keyring secret's account and
    /// region, else (a service that gave no ARN) its name.
    id: String,
    /// Its name, as created.
    name: String,
    /// The keyring secret, for messages.
    of: String,
    /// The KMS key the keyring secret is encrypted under: the record's too.
    kms_key_id: Option<String>,
}

impl UsesSecret {
    /// The record's secret of the keyring secret `secret_id`, as described.
    pub fn beside(secret_id: &str, described: &DescribeSecretOutput) -> Self {
        let name = format!(
            "{}{USES_SECRET_SUFFIX}",
            described.name().unwrap_or(secret_id)
        );
        let id = described
            .arn()
            .and_then(|arn| arn.split_once(":secret:"))
            .map_or_else(|| name.clone(), |(head, _)| format!("{head}:secret:{name}"));
        UsesSecret {
            id,
            name,
            of: secret_id.to_string(),
            kms_key_id: described.kms_key_id().map(str::to_string),
        }
    }

    /// The records, and the version holding them (`None`: no record yet).
    pub async fn read(&self, client: &Client) -> Result<(Vec<StoreUse>, Option<String>), Error> {
        let damaged = |problem| UsesSecretError::Damaged {
            secret: self.name.clone(),
            of: self.of.clone(),
            problem,
        };
        // a label moved by another database's update may be missing for a
        // moment: asked again a few times before the record is called damaged
        let mut tries = 0;
        let out = loop {
            let req = client
                .get_secret_value()
                .secret_id(&self.id)
                .version_stage("AWSCURRENT");
            match req.send().await {
                Ok(out) => break out,
                // the secret missing (no record yet), or only its current version
                Err(e) if not_found(&e) => {
                    match client.describe_secret().secret_id(&self.id).send().await {
                        Err(e) if not_found(&e) => return Ok((Vec::new(), None)),
                        Err(e) => return Err(aws_err(ops::DESCRIBE, &self.name, e)),
                        Ok(_) if tries < LABEL_TRIES => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Ok(_) => {
                            return Err(
                                damaged("no version of it is labelled AWSCURRENT".into()).into()
                            )
                        }
                    }
                }
                Err(e) => return Err(aws_err(ops::READ, &self.name, e)),
            }
        };
        let doc: Document = serde_json::from_str(out.secret_string().unwrap_or_default())
            .map_err(|e| damaged(json_problem(&e)))?;
        let uses = doc.into_uses().map_err(damaged)?;
        let version = out.version_id().map(str::to_string).ok_or_else(|| {
            Error::Runtime(format!(
                "AWS Secrets Manager returned secret {:?} with no version id",
                self.name
            ))
        })?;
        Ok((uses, Some(version)))
    }

    /// Applies `change` to the records, read again until an update lands
    /// on the version it read, and writes them where `change` says they
    /// changed; true where they did.
    pub async fn update(
        &self,
        client: &Client,
        keys: &KeysSpec,
        change: &mut (dyn FnMut(&mut Vec<StoreUse>) -> bool + Send),
    ) -> Result<bool, Error> {
        for _ in 0..ATTEMPTS {
            let (mut uses, version) = self.read(client).await?;
            if !change(&mut uses) {
                return Ok(false);
            }
            let text = serde_json::to_string(&Document::of(&uses))
                .map_err(|e| Error::Runtime(format!("the record could not be written: {e}")))?;
            let landed = match version {
                None => self.create(client, keys, &text).await?,
                Some(read) => self.replace(client, &text, &read).await?,
            };
            if landed {
                return Ok(true);
            }
        }
        Err(UsesSecretError::Busy {
            secret: self.name.clone(),
        }
        .into())
    }

    /// Creates the secret holding `text`; false where another process
    /// created it since this one found none. Refused before anything is
    /// created where the keyring secret's account is not the caller's.
    async fn create(&self, client: &Client, keys: &KeysSpec, text: &str) -> Result<bool, Error> {
        if let Some(owner) = account_of(&self.id) {
            if let Some(caller) = caller_account(keys).await {
                if caller != owner {
                    return Err(UsesSecretError::OtherAccount {
                        of: self.of.clone(),
                        name: self.name.clone(),
                        owner: owner.to_string(),
                        caller,
                    }
                    .into());
                }
            }
        }
        let mut req = client
            .create_secret()
            .name(&self.name)
            .client_request_token(token())
            .description(format!(
                "rekey: the databases whose values the keys of secret {} encrypt (no key material); a retire reads it",
                self.of
            ))
            .secret_string(text);
        if let Some(k) = &self.kms_key_id {
            req = req.kms_key_id(k);
        }
        let created = match req.send().await {
            Ok(out) => out,
            Err(e) if e.code() == Some("ResourceExistsException") => {
                return self.made_elsewhere(client).await.map(|()| false)
            }
            Err(e) => return Err(aws_err(ops::CREATE, &self.name, e)),
        };
        match created.arn() {
            Some(arn) if self.id.starts_with("arn:") && !arn.starts_with(&self.id) => {
                // made by this call a moment ago, read by no one: not left behind
                let deleted = client
                    .delete_secret()
                    .secret_id(arn)
                    .force_delete_without_recovery(true)
                    .send()
                    .await;
                if let Err(e) = deleted {
                    tracing::warn!(
                        "{}; delete it by hand",
                        aws_err(ops::DELETE, arn, e).chain()
                    );
                }
                Err(UsesSecretError::Elsewhere {
                    created: arn.to_string(),
                    expected: self.id.clone(),
                    of: self.of.clone(),
                }
                .into())
            }
            _ => Ok(true),
        }
    }

    /// Refuses a record of the same name found in the caller's account
    /// where the keyring secret is in another (an earlier run's, made before
    /// rekey compared the accounts, or left by a clean-up that failed): the
    /// name exists, but not beside the keyring secret.
    async fn made_elsewhere(&self, client: &Client) -> Result<(), Error> {
        if !self.id.starts_with("arn:") {
            return Ok(());
        }
        let described = match client.describe_secret().secret_id(&self.name).send().await {
            Ok(d) => d,
            // not the caller's to describe, or gone since: the read tells
            Err(_) => return Ok(()),
        };
        match described.arn() {
            Some(arn) if !arn.starts_with(&self.id) => Err(UsesSecretError::Elsewhere {
                created: arn.to_string(),
                expected: self.id.clone(),
                of: self.of.clone(),
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// A new version holding `text`, made current from `read`, the version
    /// read; false where another update moved AWSCURRENT since.
    async fn replace(&self, client: &Client, text: &str, read: &str) -> Result<bool, Error> {
        let version = put(client, &self.id, text, Some("AWSPENDING")).await?;
        if let Err(e) = move_current_from(client, &self.id, &version, read).await {
            // Told by reading the label again, not by the refusal's error
            // code (which the service does not document for this case): on
            // this version, the move landed and only its answer was lost (a
            // retry then found the label gone from `read`); on another, an
            // update landed first; still on `read`, the move failed
            return match self.read(client).await?.1.as_deref() {
                Some(now) if now == version => Ok(true),
                Some(now) if now != read => Ok(false),
                _ => Err(aws_err(ops::LABEL, &self.name, e)),
            };
        }
        // the update landed. Another update's new version may hold
        // AWSPENDING now (then it is not this one's to drop), and a label
        // left on a version no longer current says nothing to anyone
        if let Err(e) = drop_pending_label(client, &self.id, &version).await {
            if e.code() != Some("InvalidParameterException") {
                tracing::debug!(
                    "{} (left on the version just made current: the next update's new version takes it)",
                    aws_err(ops::LABEL, &self.name, e).chain()
                );
            }
        }
        Ok(true)
    }
}

/// The account of an ARN (`arn:partition:service:region:account:...`).
fn account_of(arn: &str) -> Option<&str> {
    let mut parts = arn.strip_prefix("arn:")?.split(':');
    let account = parts.nth(3)?;
    (!account.is_empty()).then_some(account)
}

/// How long the caller's identity may take before the check is left to
/// the created secret's ARN.
const STS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The account rekey calls AWS as (STS GetCallerIdentity, which needs no
/// permission), if STS answers: where it does not, the created secret's
/// ARN still tells ([`UsesSecretError::Elsewhere`]).
async fn caller_account(keys: &KeysSpec) -> Option<String> {
    let ask = async {
        let config = super::sdk_config(keys).await;
        let out = aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send()
            .await;
        match out {
            Ok(out) => out.account().map(str::to_string),
            Err(e) => {
                tracing::debug!("STS GetCallerIdentity: {}", e.code().unwrap_or("failed"));
                None
            }
        }
    };
    tokio::time::timeout(STS_WAIT, ask).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(name: &str, arn: Option<&str>) -> DescribeSecretOutput {
        let mut d = DescribeSecretOutput::builder().name(name);
        if let Some(arn) = arn {
            d = d.arn(arn);
        }
        d.build()
    }

    #[test]
    fn the_record_is_named_after_the_keyring_secret_in_its_account_and_region() {
        let u = UsesSecret::beside(
            "arn:aws:secretsmanager:eu-west-1:111122223333:secret:prod/app/keyring-AbCdEf",
            &described(
                "prod/app/keyring",
                Some(
                    "arn:aws:secretsmanager:eu-west-1:111122223333:secret:prod/app/keyring-AbCdEf",
                ),
            ),
        );
        assert_eq!(u.name, "prod/app/keyring.rekey-uses");
        assert_eq!(
            u.id,
            "arn:aws:secretsmanager:eu-west-1:111122223333:secret:prod/app/keyring.rekey-uses"
        );
        let bare = UsesSecret::beside("prod/app/keyring", &described("prod/app/keyring", None));
        assert_eq!(bare.id, "prod/app/keyring.rekey-uses");
    }

    #[test]
    fn the_keyring_secret_s_account_is_read_off_its_arn() {
        assert_eq!(
            account_of("arn:aws:secretsmanager:eu-west-1:111122223333:secret:prod/app/keyring"),
            Some("111122223333")
        );
        assert_eq!(account_of("prod/app/keyring"), None);
        assert_eq!(
            account_of("arn:aws:secretsmanager:eu-west-1::secret:k"),
            None
        );
    }

    #[test]
    fn a_record_in_another_account_is_refused_naming_both_accounts_and_the_secret_to_create() {
        let said = UsesSecretError::OtherAccount {
            of: "arn:aws:secretsmanager:eu-west-1:111122223333:secret:k-AbCdEf".into(),
            name: "k.rekey-uses".into(),
            owner: "111122223333".into(),
            caller: "444455556666".into(),
        }
        .to_string();
        assert!(
            said.contains("in AWS account 111122223333, and rekey runs as account 444455556666")
                && said.contains("--name k.rekey-uses"),
            "{said}"
        );
    }

    #[test]
    fn a_damaged_record_names_both_secrets_and_what_to_do() {
        let e = UsesSecretError::Damaged {
            secret: "k.rekey-uses".into(),
            of: "k".into(),
            problem: "invalid JSON at line 1 column 2".into(),
        };
        let said = e.to_string();
        assert!(
            said.contains("\"k.rekey-uses\"") && said.contains("is damaged"),
            "{said}"
        );
        assert!(matches!(Error::from(e), Error::Config(_)));
    }
}
