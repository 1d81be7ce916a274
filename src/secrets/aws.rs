//! AWS Secrets Manager as a key store: one secret holds the keyring as JSON,
//! and its versions move through the staging labels exactly as a rotation
//! Lambda moves them.
//!
//! - stage (createSecret): a new version labelled `AWSPENDING`, holding the
//!   keyring as it will be once promoted (new key current, old key previous);
//! - run + verify (setSecret / testSecret): rekey reads the pending version
//!   and writes under the new key;
//! - promote (finishSecret): `AWSCURRENT` moves to the pending version (and
//!   Secrets Manager moves `AWSPREVIOUS` to the old one); `AWSPENDING` is
//!   removed;
//! - rollback and retire: a new `AWSCURRENT` version with the changed keyring.
//!
//! Endpoint and region are configurable, so any compatible service works.

use aws_sdk_secretsmanager::Client;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::spec::KeysSpec;
use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{Entry, KeyState, KeyTable, StoredKey};
use crate::Error;

/// Format tag of the secret's JSON.
const FORMAT: &str = "rekey-keyring/1";

/// The secret's JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// Always [`FORMAT`].
    format: String,
    /// The keys; `material` is the key as 64 hex characters.
    keys: Vec<StoredKey>,
}

/// A secret's versions by label, and its keys.
pub struct SecretsManagerStore {
    /// The SDK client.
    client: Client,
    /// Secret name or ARN.
    secret_id: String,
    /// Version labelled AWSCURRENT.
    current_version: Option<String>,
    /// Version labelled AWSPENDING (when different from AWSCURRENT).
    pending_version: Option<String>,
    /// The keys as loaded.
    before: KeyTable,
    /// The keys after the transitions applied so far.
    pub table: KeyTable,
}

impl std::fmt::Debug for SecretsManagerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsManagerStore")
            .field("secret_id", &self.secret_id)
            .field("table", &self.table)
            .finish()
    }
}

fn aws_err(what: &str, secret: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!(
        "AWS Secrets Manager, {what} of secret {secret:?}: {e}"
    ))
}

/// AWS SDK settings for the `[keys]` section's region and endpoint (else the
/// AWS defaults), with the SDK's HTTPS client on rustls with ring, rekey's one
/// TLS stack (the SDK's default client would build aws-lc beside it). Secrets
/// Manager, KMS and the credential providers all use this client.
pub async fn sdk_config(keys: &KeysSpec) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(https);
    if let Some(region) = &keys.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &keys.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// A Secrets Manager client for the `[keys]` section.
pub async fn client(keys: &KeysSpec) -> Client {
    Client::new(&sdk_config(keys).await)
}

fn parse(secret: &str, text: &str) -> Result<KeyTable, Error> {
    let doc: Document = serde_json::from_str(text).map_err(|e| {
        Error::Config(format!(
            "secret {secret:?} is not a rekey keyring (invalid JSON at line {} column {})",
            e.line(),
            e.column()
        ))
    })?;
    if doc.format != FORMAT {
        return Err(Error::Config(format!(
            "secret {secret:?} has format {:?}, expected {FORMAT:?}",
            doc.format
        )));
    }
    let mut table = KeyTable::default();
    for k in doc.keys {
        let key = match &k.material {
            None => None,
            Some(hex) => Some(
                Key::parse(k.id, hex)
                    .map_err(|e| Error::Config(format!("secret {secret:?}, key {}: {e}", k.id)))?,
            ),
        };
        table.entries.push(k.into_entry(key));
    }
    Ok(table)
}

fn render(table: &KeyTable) -> Result<Zeroizing<String>, Error> {
    let keys = table
        .entries
        .iter()
        .map(|e| StoredKey::from_entry(e, |k| Ok::<_, Error>(hex::encode(k.material()))))
        .collect::<Result<_, _>>()?;
    let doc = Document {
        format: FORMAT.into(),
        keys,
    };
    serde_json::to_string(&doc)
        .map(Zeroizing::new)
        .map_err(|e| Error::Runtime(format!("the keyring could not be written as JSON: {e}")))
}

/// A fresh idempotency token for a new version.
fn token() -> String {
    let mut bytes = [0u8; 16];
    crate::crypto::nonce::fill(&mut bytes);
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl SecretsManagerStore {
    /// Reads the secret's labelled versions.
    pub async fn open(keys: &KeysSpec) -> Result<Self, Error> {
        let secret_id = keys.secret_id.clone().ok_or_else(|| {
            Error::Config(
                "keys source \"aws-secrets-manager\" needs secret_id = \"name or ARN\"".into(),
            )
        })?;
        let client = client(keys).await;
        let versions = client
            .list_secret_version_ids()
            .secret_id(&secret_id)
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "listing versions",
                    &secret_id,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        let mut current_version = None;
        let mut pending_version = None;
        for v in versions.versions() {
            let stages = v.version_stages();
            if stages.iter().any(|s| s == "AWSCURRENT") {
                current_version = v.version_id().map(str::to_owned);
            } else if stages.iter().any(|s| s == "AWSPENDING") {
                pending_version = v.version_id().map(str::to_owned);
            }
        }
        let get = |version: String| {
            let client = client.clone();
            let secret_id = secret_id.clone();
            async move {
                let out = client
                    .get_secret_value()
                    .secret_id(&secret_id)
                    .version_id(version)
                    .send()
                    .await
                    .map_err(|e| {
                        aws_err(
                            "reading",
                            &secret_id,
                            aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                        )
                    })?;
                let text = Zeroizing::new(out.secret_string().unwrap_or_default().to_string());
                parse(&secret_id, &text)
            }
        };
        let current_id = current_version.clone().ok_or_else(|| Error::Config(format!("secret {secret_id:?} has no AWSCURRENT version: create it with `rekey secrets init`")))?;
        let mut table = get(current_id).await?;
        if let Some(p) = &pending_version {
            // The pending version holds the keyring as it will be once promoted:
            // show its new current key as pending, beside today's current.
            let pending = get(p.clone()).await?;
            if let Some(new) = pending.entries.iter().find(|e| {
                e.state == KeyState::Current && !table.entries.iter().any(|t| t.id == e.id)
            }) {
                table.entries.push(Entry {
                    state: KeyState::Pending,
                    ..new.clone()
                });
            }
        }
        Ok(SecretsManagerStore {
            client,
            secret_id,
            current_version,
            pending_version,
            before: table.clone(),
            table,
        })
    }

    /// Creates the secret with `table` as its first AWSCURRENT version.
    pub async fn create(keys: &KeysSpec, table: &KeyTable) -> Result<(), Error> {
        let secret_id = keys.secret_id.clone().ok_or_else(|| {
            Error::Config("keys source \"aws-secrets-manager\" needs secret_id".into())
        })?;
        let client = client(keys).await;
        let text = render(table)?;
        client
            .create_secret()
            .name(&secret_id)
            .client_request_token(token())
            .secret_string(text.as_str())
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "creating",
                    &secret_id,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }

    /// Names the store for the audit trail.
    pub fn secret_id(&self) -> String {
        format!("aws-secrets-manager:{}", self.secret_id)
    }

    /// The material of key `id` from the secret's former versions (Secrets
    /// Manager keeps them: they are this store's archive of retired keys),
    /// newest first.
    pub async fn archived_key(&self, id: KeyId) -> Result<Option<Key>, Error> {
        let sid = &self.secret_id;
        let listed = self
            .client
            .list_secret_version_ids()
            .secret_id(sid)
            .include_deprecated(true)
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "listing versions",
                    sid,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        let mut versions: Vec<_> = listed
            .versions()
            .iter()
            .filter_map(|v| Some((v.created_date()?.secs(), v.version_id()?.to_string())))
            .collect();
        versions.sort_by(|a, b| b.cmp(a));
        for (_, version) in versions {
            let out = self
                .client
                .get_secret_value()
                .secret_id(sid)
                .version_id(&version)
                .send()
                .await
                .map_err(|e| {
                    aws_err(
                        "reading a former version",
                        sid,
                        aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                    )
                })?;
            let text = Zeroizing::new(out.secret_string().unwrap_or_default().to_string());
            if let Some(key) = parse(sid, &text)?
                .entries
                .into_iter()
                .find(|e| e.id == id)
                .and_then(|e| e.key)
            {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// A new version holding the table, made current as finishSecret does:
    /// labelled AWSPENDING, then AWSCURRENT moved onto it.
    async fn write_current(&mut self) -> Result<(), Error> {
        let sid = self.secret_id.clone();
        let Some(current) = self.current_version.clone() else {
            return Err(Error::Runtime(format!(
                "secret {sid:?}: no AWSCURRENT version"
            )));
        };
        let version = token();
        self.client
            .put_secret_value()
            .secret_id(&self.secret_id)
            .client_request_token(&version)
            .secret_string(render(&self.table)?.as_str())
            .version_stages("AWSPENDING")
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "writing a new version",
                    &sid,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        self.move_current(&version, &current).await
    }

    /// finishSecret: moves AWSCURRENT from `current` to `version` (Secrets
    /// Manager moves AWSPREVIOUS to `current`) and removes AWSPENDING from it.
    async fn move_current(&mut self, version: &str, current: &str) -> Result<(), Error> {
        let sid = self.secret_id.clone();
        self.client
            .update_secret_version_stage()
            .secret_id(&self.secret_id)
            .version_stage("AWSCURRENT")
            .move_to_version_id(version)
            .remove_from_version_id(current)
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "promoting",
                    &sid,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        self.client
            .update_secret_version_stage()
            .secret_id(&self.secret_id)
            .version_stage("AWSPENDING")
            .remove_from_version_id(version)
            .send()
            .await
            .map_err(|e| {
                aws_err(
                    "clearing AWSPENDING",
                    &sid,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                )
            })?;
        self.current_version = Some(version.to_string());
        Ok(())
    }

    /// Writes the transitions applied to the table since it was loaded.
    pub async fn save(&mut self) -> Result<(), Error> {
        let was_pending = self.before.id_in(KeyState::Pending);
        let now_pending = self.table.id_in(KeyState::Pending);
        let now_current = self.table.id_in(KeyState::Current);
        let sid = self.secret_id.clone();
        match (was_pending, now_pending) {
            // createSecret: the keyring as it will be once promoted, labelled AWSPENDING
            (None, Some(_)) => {
                let mut promoted = self.table.clone();
                let _ = promoted.promote(crate::crypto::keytable::now());
                let version = token();
                self.client
                    .put_secret_value()
                    .secret_id(&self.secret_id)
                    .client_request_token(&version)
                    .secret_string(render(&promoted)?.as_str())
                    .version_stages("AWSPENDING")
                    .send()
                    .await
                    .map_err(|e| {
                        aws_err(
                            "staging a version",
                            &sid,
                            aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                        )
                    })?;
                self.pending_version = Some(version);
            }
            // finishSecret: AWSCURRENT moves to the pending version, AWSPENDING goes
            (Some(p), None) if now_current == Some(p) => {
                let (Some(pending), Some(current)) =
                    (self.pending_version.clone(), self.current_version.clone())
                else {
                    return Err(Error::Runtime(format!(
                        "secret {:?}: no AWSPENDING version to promote",
                        self.secret_id
                    )));
                };
                self.move_current(&pending, &current).await?;
                self.pending_version = None;
            }
            // rollback before promotion: the staged version loses its label,
            // and a new current version keeps the staged key as previous
            (Some(_), None) => {
                if let Some(pending) = self.pending_version.take() {
                    self.client
                        .update_secret_version_stage()
                        .secret_id(&self.secret_id)
                        .version_stage("AWSPENDING")
                        .remove_from_version_id(&pending)
                        .send()
                        .await
                        .map_err(|e| {
                            aws_err(
                                "dropping the staged version",
                                &sid,
                                aws_sdk_secretsmanager::error::DisplayErrorContext(e),
                            )
                        })?;
                }
                self.write_current().await?;
            }
            // rollback after promotion, retire
            _ => self.write_current().await?,
        }
        self.before = self.table.clone();
        Ok(())
    }
}
