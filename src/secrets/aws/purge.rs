//! Destroying a key's material in Secrets Manager. A secret keeps its former
//! versions (the archive of retired keys) and no API deletes one version's
//! content: a deprecated version only loses its labels. The one call that
//! removes version content is DeleteSecret, so a purge deletes the secret
//! without recovery and creates it again under the same name with the same
//! description, KMS key, tags and resource policy, holding only the current
//! content as AWSCURRENT.
//!
//! Before the delete, the current content is copied into a backup secret
//! (`<name>.rekey-purge-backup`, same KMS key), deleted only once the
//! recreated secret reads back the same: a purge killed between the delete
//! and the create loses nothing, and the next `open` puts the secret back
//! from the backup ([`SecretsManagerStore::restore_from_backup`]).
//!
//! Caveats, said in every refusal: between the delete and the create (a
//! second or two, while the name frees up) applications reading the secret
//! get ResourceNotFound; every former version goes, so every archived key
//! with it; and replication or rotation configuration cannot be carried
//! over: a secret with either is refused, naming what to remove first.

use std::time::Duration;

use aws_sdk_secretsmanager::types::Tag;
use zeroize::Zeroizing;

use super::errors::{aws_err, ops};
use super::{read, versions, SecretsManagerStore};
use crate::crypto::keyring::KeyId;
use crate::Error;

/// How long to wait for a deleted secret's name to be free again.
const NAME_FREE_TIMEOUT: Duration = Duration::from_secs(120);

impl SecretsManagerStore {
    /// Recreates the secret with only its current content, so no version
    /// holds the material of `ids` any more.
    pub(super) async fn purge_former_versions(&mut self, ids: &[KeyId]) -> Result<(), Error> {
        let sid = self.secret_id.clone();
        let refuse = |why: String| {
            Error::Config(format!(
                "cannot destroy the material of keys {ids:?} in secret {sid:?}: {why}; \
                 Secrets Manager removes a former version's content only by deleting the secret, which rekey then recreates"
            ))
        };
        let d = self
            .client
            .describe_secret()
            .secret_id(&sid)
            .send()
            .await
            .map_err(|e| aws_err(ops::DESCRIBE, &sid, e))?;
        if d.rotation_enabled() == Some(true) {
            return Err(refuse("it has rotation configured (a Lambda); cancel it (aws secretsmanager cancel-rotate-secret), purge, then configure rotation again".into()));
        }
        if !d.replication_status().is_empty() || d.primary_region().is_some_and(|r| !r.is_empty()) {
            return Err(refuse("it is replicated to other regions; stop replication (remove-regions-from-replication), purge, then replicate again".into()));
        }
        if self.pending_version.is_some() {
            return Err(refuse(
                "a version is staged (AWSPENDING); promote or roll back first".into(),
            ));
        }
        let current = self
            .current_version
            .clone()
            .ok_or_else(|| refuse("it has no AWSCURRENT version".into()))?;
        let text: Zeroizing<String> = read(&self.client, &sid, &current).await?;
        let policy = self
            .client
            .get_resource_policy()
            .secret_id(&sid)
            .send()
            .await
            .map_err(|e| aws_err(ops::DESCRIBE, &sid, e))?
            .resource_policy()
            .map(str::to_owned);
        let tags: Vec<Tag> = d.tags().to_vec();
        let description = d.description().map(str::to_owned);
        let kms = d.kms_key_id().map(str::to_owned);
        let name = d.name().unwrap_or(&sid).to_string();

        self.write_backup(&name, &text, kms.as_deref(), &tags)
            .await?;
        tracing::warn!(
            secret = %sid,
            "destroying keys {ids:?}: deleting the secret without recovery and recreating it with its current content only (applications get ResourceNotFound for a moment)"
        );
        self.client
            .delete_secret()
            .secret_id(&sid)
            .force_delete_without_recovery(true)
            .send()
            .await
            .map_err(|e| aws_err(ops::DELETE, &sid, e))?;
        let version = super::token();
        create_when_name_free(&name, || {
            let req = self
                .client
                .create_secret()
                .name(&name)
                .client_request_token(&version)
                .secret_string(text.as_str())
                .set_tags(Some(tags.clone()))
                .set_description(description.clone());
            match &kms {
                Some(k) => req.kms_key_id(k),
                None => req,
            }
        })
        .await
        .map_err(|e| {
            Error::Runtime(format!(
                "{e} (secret {sid:?} was deleted to destroy keys {ids:?}; its content is kept in {:?}, and the next rekey command recreates it from there)",
                backup_name(&name)
            ))
        })?;
        if let Some(p) = policy {
            self.client
                .put_resource_policy()
                .secret_id(&name)
                .resource_policy(p)
                .send()
                .await
                .map_err(|e| aws_err(ops::TAG, &name, e))?;
        }
        let now = versions(&self.client, &name, true).await?;
        self.current_version = now
            .into_iter()
            .find(|v| v.stages.iter().any(|s| s == "AWSCURRENT"))
            .map(|v| v.id);
        // the backup goes only once the secret reads back what it held
        if let Some(v) = &self.current_version {
            let back: Zeroizing<String> = read(&self.client, &name, v).await?;
            if *back == *text {
                self.delete_backup(&name).await?;
            }
        }
        Ok(())
    }

    /// Copies the current content into the purge backup secret (replacing a
    /// stale one a finished purge left behind).
    async fn write_backup(
        &self,
        name: &str,
        text: &str,
        kms: Option<&str>,
        tags: &[Tag],
    ) -> Result<(), Error> {
        let backup = backup_name(name);
        self.delete_backup(name).await?;
        create_when_name_free(&backup, || {
            let req = self
                .client
                .create_secret()
                .name(&backup)
                .secret_string(text)
                .set_tags(Some(tags.to_vec()))
                .description(format!("rekey: the content of {name:?} while a purge recreates it; deleted when it is done"));
            match kms {
                Some(k) => req.kms_key_id(k),
                None => req,
            }
        })
        .await
    }

    async fn delete_backup(&self, name: &str) -> Result<(), Error> {
        let backup = backup_name(name);
        match self
            .client
            .delete_secret()
            .secret_id(&backup)
            .force_delete_without_recovery(true)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if super::errors::not_found(&e) => Ok(()),
            Err(e) => Err(aws_err(ops::DELETE, &backup, e)),
        }
    }

    /// Puts secret `name` back from its purge backup when a purge was killed
    /// between deleting and recreating it; true when it did.
    pub(super) async fn restore_from_backup(
        client: &aws_sdk_secretsmanager::Client,
        name: &str,
    ) -> Result<bool, Error> {
        let backup = backup_name(name);
        let Ok(found) = client.get_secret_value().secret_id(&backup).send().await else {
            return Ok(false);
        };
        let Some(text) = found.secret_string().map(|t| Zeroizing::new(t.to_string())) else {
            return Ok(false);
        };
        let described = client
            .describe_secret()
            .secret_id(&backup)
            .send()
            .await
            .ok();
        let kms = described
            .as_ref()
            .and_then(|d| d.kms_key_id().map(str::to_owned));
        let tags = described.map(|d| d.tags().to_vec()).unwrap_or_default();
        tracing::warn!(
            secret = %name,
            "the secret is missing and its purge backup exists (a purge was stopped between deleting and recreating it): recreating it from the backup"
        );
        let mut req = client
            .create_secret()
            .name(name)
            .secret_string(text.as_str())
            .set_tags(Some(tags));
        if let Some(k) = kms {
            req = req.kms_key_id(k);
        }
        req.send()
            .await
            .map_err(|e| aws_err(ops::CREATE, name, e))?;
        client
            .delete_secret()
            .secret_id(&backup)
            .force_delete_without_recovery(true)
            .send()
            .await
            .map_err(|e| aws_err(ops::DELETE, &backup, e))?;
        Ok(true)
    }
}

/// Sends the CreateSecret request `make` builds until it succeeds, while
/// the name is still being freed by a deletion (up to [`NAME_FREE_TIMEOUT`]).
async fn create_when_name_free(
    name: &str,
    make: impl Fn() -> aws_sdk_secretsmanager::operation::create_secret::builders::CreateSecretFluentBuilder,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + NAME_FREE_TIMEOUT;
    let mut pause = Duration::from_millis(100);
    loop {
        match make().send().await {
            Ok(_) => return Ok(()),
            // the name is still being freed
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_invalid_request_exception() || s.is_resource_exists_exception()
                }) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(aws_err(ops::CREATE, name, e)),
        }
    }
}

/// The purge backup's name for secret `name`.
pub(super) fn backup_name(name: &str) -> String {
    format!("{name}.rekey-purge-backup")
}
