//! AWS Secrets Manager as a key store, in the layout applications read
//! (`[keys] layout`), with versions moved as a rotation Lambda moves them.
//!
//! `layout = "rekey"` ([`keyring`]): one secret holds rekey's keyring JSON.
//! - stage (createSecret): a new version labelled `AWSPENDING`, holding the
//!   keyring as it will be once promoted (new key current, old key previous);
//! - run + verify (setSecret / testSecret): rekey reads the pending version
//!   and writes under the new key;
//! - promote (finishSecret): `AWSCURRENT` moves to the pending version (and
//!   Secrets Manager moves `AWSPREVIOUS` to the old one); `AWSPENDING` is
//!   removed;
//! - rollback and retire: a new `AWSCURRENT` version with the changed keyring.
//!
//! `layout = "env-json"` and `"value"` ([`layouts`]): the secret holds what the
//! application reads, and rekey's own bookkeeping lives in the tag
//! [`META_TAG`]. Former versions are the archive of retired keys, as
//! Secrets Manager keeps them; [`purge`] removes them when a key's material
//! must be destroyed.
//!
//! The databases whose values the keys encrypt are recorded in a secret
//! beside the keyring ([`uses_secret`]), never in what applications read.
//!
//! Endpoint and region are configurable, so any compatible service works.

pub mod errors;
mod keyring;
mod layouts;
mod purge;
pub mod uses_secret;

use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::error::SdkError;
use aws_sdk_secretsmanager::operation::update_secret_version_stage::UpdateSecretVersionStageError;
use aws_sdk_secretsmanager::Client;
use zeroize::Zeroizing;

use super::layout::{flat::FlatDoc, Meta};
use super::spec::{KeysSpec, Layout};
use crate::crypto::keyring::{Key, KeyEncoding, KeyId};
use crate::crypto::keytable::{Entry, KeyState, KeyTable};
use crate::secrets::uses::StoreUse;
use crate::Error;
use errors::{aws_err, ops};

/// The tag holding rekey's notes on a layout's keys (ids, states,
/// fingerprints, creation times; never material): see `secrets::layout::Meta`.
pub const META_TAG: &str = "rekey:keys";

/// A secret's versions by label, and its keys.
pub struct SecretsManagerStore {
    /// The SDK client.
    client: Client,
    /// Secret name or ARN.
    secret_id: String,
    /// The `[keys]` section (layout, prefix, pending secret).
    spec: KeysSpec,
    /// Version labelled AWSCURRENT.
    current_version: Option<String>,
    /// Version labelled AWSPENDING (when different from AWSCURRENT).
    pending_version: Option<String>,
    /// What a promote stopped part way left in the new key's place.
    left_pending: Option<LeftPending>,
    /// `env-json`: the object as AWSCURRENT holds it.
    doc: Option<FlatDoc>,
    /// How new keys are written (`env-json`, `value`).
    encoding: KeyEncoding,
    /// The meta tag as read.
    meta: Meta,
    /// The keys as loaded.
    before: KeyTable,
    /// The keys after the transitions applied so far.
    pub table: KeyTable,
    /// Where the databases using the secret are recorded.
    uses: uses_secret::UsesSecret,
}

/// The new key's place still holding the key that is now current: a
/// promote was stopped (killed, or a call failed) after it made the key
/// current and before it took the key away from where applications read the
/// new one. The next save finishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LeftPending {
    /// The pending secret (`pending_secret_id`) still exists.
    Secret(String),
    /// The AWSCURRENT version still carries the AWSPENDING label.
    Label(String),
}

impl std::fmt::Debug for SecretsManagerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsManagerStore")
            .field("secret_id", &self.secret_id)
            .field("layout", &self.spec.layout)
            .field("table", &self.table)
            .finish()
    }
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

/// One version of a secret.
#[derive(Debug, Clone)]
struct Version {
    /// Its id.
    id: String,
    /// Its staging labels.
    stages: Vec<String>,
    /// Created (Unix seconds; 0 when not said).
    created: u64,
}

/// Every version of `sid` (with deprecated ones when `all`), newest first.
async fn versions(client: &Client, sid: &str, all: bool) -> Result<Vec<Version>, Error> {
    let out = client
        .list_secret_version_ids()
        .secret_id(sid)
        .include_deprecated(all)
        .send()
        .await
        .map_err(|e| aws_err(ops::LIST, sid, e))?;
    let mut vs: Vec<Version> = out
        .versions()
        .iter()
        .filter_map(|v| {
            Some(Version {
                id: v.version_id()?.to_string(),
                stages: v.version_stages().to_vec(),
                created: v
                    .created_date()
                    .map_or(0, |d| u64::try_from(d.secs()).unwrap_or(0)),
            })
        })
        .collect();
    vs.sort_by_key(|v| std::cmp::Reverse(v.created));
    Ok(vs)
}

/// The string of version `version` of `sid`.
async fn read(client: &Client, sid: &str, version: &str) -> Result<Zeroizing<String>, Error> {
    let out = client
        .get_secret_value()
        .secret_id(sid)
        .version_id(version)
        .send()
        .await
        .map_err(|e| aws_err(ops::READ, sid, e))?;
    Ok(Zeroizing::new(
        out.secret_string().unwrap_or_default().to_string(),
    ))
}

/// A new version of `sid` holding `text`, labelled `stage` (AWSCURRENT when
/// `None`, as PutSecretValue does); returns its id.
async fn put(client: &Client, sid: &str, text: &str, stage: Option<&str>) -> Result<String, Error> {
    let version = token();
    let mut req = client
        .put_secret_value()
        .secret_id(sid)
        .client_request_token(&version)
        .secret_string(text);
    if let Some(s) = stage {
        req = req.version_stages(s);
    }
    req.send().await.map_err(|e| aws_err(ops::PUT, sid, e))?;
    Ok(version)
}

/// Moves AWSCURRENT of `sid` to `version` from `current`, the version this
/// process read as current: refused by Secrets Manager (nothing moved)
/// where the label is no longer on `current`, another process having moved
/// it since. The SDK's error, for the caller to tell that case.
async fn move_current_from(
    client: &Client,
    sid: &str,
    version: &str,
    current: &str,
) -> Result<(), SdkError<UpdateSecretVersionStageError, HttpResponse>> {
    client
        .update_secret_version_stage()
        .secret_id(sid)
        .version_stage("AWSCURRENT")
        .move_to_version_id(version)
        .remove_from_version_id(current)
        .send()
        .await
        .map(|_| ())
}

/// Removes the AWSPENDING label from `version` of `sid`; refused (nothing
/// changed) where the label is not on `version`. The SDK's error, for the
/// caller to tell that case.
async fn drop_pending_label(
    client: &Client,
    sid: &str,
    version: &str,
) -> Result<(), SdkError<UpdateSecretVersionStageError, HttpResponse>> {
    client
        .update_secret_version_stage()
        .secret_id(sid)
        .version_stage("AWSPENDING")
        .remove_from_version_id(version)
        .send()
        .await
        .map(|_| ())
}

impl SecretsManagerStore {
    /// Reads the secret's labelled versions in the job's layout, putting
    /// the secret back from a stopped purge's backup where it is missing.
    pub async fn open(keys: &KeysSpec) -> Result<Self, Error> {
        Self::open_as(keys, true).await
    }

    /// As [`SecretsManagerStore::open`]; without `restore`, a missing
    /// secret is an error (a run's look at its store must not race a purge
    /// between its delete and its create).
    pub async fn open_as(keys: &KeysSpec, restore: bool) -> Result<Self, Error> {
        let secret_id = keys.secret_id.clone().ok_or_else(|| {
            Error::Config(
                "keys source \"aws-secrets-manager\" needs secret_id = \"name or ARN\"".into(),
            )
        })?;
        let client = client(keys).await;
        // DescribeSecret first: it says "not found" plainly where some
        // services fail ListSecretVersionIds on a missing secret
        let described = match client.describe_secret().secret_id(&secret_id).send().await {
            Ok(d) => d,
            Err(e)
                if restore
                    && errors::not_found(&e)
                    && Self::restore_from_backup(&client, &secret_id).await? =>
            {
                client
                    .describe_secret()
                    .secret_id(&secret_id)
                    .send()
                    .await
                    .map_err(|e| aws_err(ops::DESCRIBE, &secret_id, e))?
            }
            Err(e) => return Err(aws_err(ops::DESCRIBE, &secret_id, e)),
        };
        let meta_line = described
            .tags()
            .iter()
            .find(|t| t.key() == Some(META_TAG))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string();
        let vs = versions(&client, &secret_id, false).await?;
        let labelled = |label: &str| {
            vs.iter()
                .find(|v| v.stages.iter().any(|s| s == label))
                .cloned()
        };
        let current = labelled("AWSCURRENT").ok_or_else(|| {
            Error::Config(format!("secret {secret_id:?} has no AWSCURRENT version: create it with `rekey secrets init`"))
        })?;
        let pending = labelled("AWSPENDING").filter(|p| p.id != current.id);
        // only where rekey itself labels the new key AWSPENDING
        let labels_pending = match keys.layout {
            Layout::Rekey => true,
            Layout::Value => keys.pending_secret_id.is_none(),
            Layout::EnvJson => false,
        };
        let label_left = labelled("AWSPENDING")
            .filter(|p| labels_pending && p.id == current.id)
            .map(|p| LeftPending::Label(p.id));
        refuse_a_replica(&client, &secret_id, &described)?;
        let uses = uses_secret::UsesSecret::beside(&secret_id, &described);
        let mut store = SecretsManagerStore {
            client,
            secret_id,
            spec: keys.clone(),
            current_version: Some(current.id.clone()),
            pending_version: pending.as_ref().map(|p| p.id.clone()),
            left_pending: label_left,
            doc: None,
            encoding: keys.key_encoding.unwrap_or(KeyEncoding::Hex),
            meta: Meta::default(),
            before: KeyTable::default(),
            table: KeyTable::default(),
            uses,
        };
        let text = read(&store.client, &store.secret_id, &current.id).await?;
        let table = match keys.layout {
            Layout::Rekey => {
                let mut table = keyring::parse(&store.secret_id, &text)?;
                if let Some(p) = &pending {
                    // The pending version holds the keyring as it will be once
                    // promoted: show its new current key as pending, beside today's current.
                    let staged = keyring::parse(
                        &store.secret_id,
                        &read(&store.client, &store.secret_id, &p.id).await?,
                    )?;
                    if let Some(new) = staged.entries.iter().find(|e| {
                        e.state == KeyState::Current && !table.entries.iter().any(|t| t.id == e.id)
                    }) {
                        table.entries.push(Entry {
                            state: KeyState::Pending,
                            ..new.clone()
                        });
                    }
                }
                table
            }
            Layout::EnvJson | Layout::Value => {
                store.meta = Meta::parse(&meta_line);
                store.open_layout(&text, &current, pending.as_ref()).await?
            }
        };
        store.before = table.clone();
        store.table = table;
        Ok(store)
    }

    /// Writes the meta tag when the table's differs from the one read.
    async fn save_meta(&mut self) -> Result<(), Error> {
        if self.spec.layout == Layout::Rekey {
            return Ok(());
        }
        let line = Meta::of_known(&self.table, &self.meta);
        if Meta::parse(&line) == self.meta {
            return Ok(());
        }
        let tag = aws_sdk_secretsmanager::types::Tag::builder()
            .key(META_TAG)
            .value(&line)
            .build();
        self.client
            .tag_resource()
            .secret_id(&self.secret_id)
            .tags(tag)
            .send()
            .await
            .map_err(|e| aws_err(ops::TAG, &self.secret_id, e))?;
        self.meta = Meta::parse(&line);
        Ok(())
    }

    /// Creates the secret with `table` as its first AWSCURRENT version, in the job's layout.
    pub async fn create(keys: &KeysSpec, table: &KeyTable) -> Result<(), Error> {
        let secret_id = keys.secret_id.clone().ok_or_else(|| {
            Error::Config("keys source \"aws-secrets-manager\" needs secret_id".into())
        })?;
        let client = client(keys).await;
        let text = layouts::initial_text(keys, table)?;
        let mut req = client
            .create_secret()
            .name(&secret_id)
            .client_request_token(token())
            .secret_string(text.as_str());
        if keys.layout != Layout::Rekey {
            req = req.tags(
                aws_sdk_secretsmanager::types::Tag::builder()
                    .key(META_TAG)
                    .value(Meta::of(table))
                    .build(),
            );
        }
        req.send()
            .await
            .map_err(|e| aws_err(ops::CREATE, &secret_id, e))?;
        Ok(())
    }

    /// Names the store for the audit trail.
    pub fn secret_id(&self) -> String {
        format!("aws-secrets-manager:{}", self.secret_id)
    }

    /// The databases the secret's record (`<name>.rekey-uses`,
    /// [`uses_secret`]) names now.
    pub async fn uses_now(&self) -> Result<Vec<StoreUse>, Error> {
        self.uses.read(&self.client).await.map(|(uses, _)| uses)
    }

    /// Applies `change` to the secret's record, read again until the
    /// update lands on the version it read, and writes it where `change`
    /// says it changed; true where it did.
    pub async fn update_uses(
        &self,
        change: &mut (dyn FnMut(&mut Vec<StoreUse>) -> bool + Send),
    ) -> Result<bool, Error> {
        self.uses.update(&self.client, &self.spec, change).await
    }

    /// The material of key `id` from the secret's former versions (Secrets
    /// Manager keeps them: they are this store's archive of retired keys),
    /// newest first.
    pub async fn archived_key(&self, id: KeyId) -> Result<Option<Key>, Error> {
        let sid = &self.secret_id;
        for v in versions(&self.client, sid, true).await? {
            let text = read(&self.client, sid, &v.id).await?;
            let found = match self.spec.layout {
                Layout::Rekey => keyring::parse(sid, &text)?
                    .entries
                    .into_iter()
                    .find(|e| e.id == id)
                    .and_then(|e| e.key),
                Layout::EnvJson | Layout::Value => self.archived_in(&text, id),
            };
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Records `key`, fetched from a former version, as held since opening,
    /// so that destroying it afterwards ([`Self::save`]) purges the former versions.
    pub fn hold_archived(&mut self, key: &Key) {
        if let Some(e) = self.before.entries.iter_mut().find(|e| e.id == key.id()) {
            e.key = Some(key.clone());
        }
    }

    /// Moves AWSCURRENT from `current` to `version` (Secrets Manager moves
    /// AWSPREVIOUS to `current`) and removes AWSPENDING from it (finishSecret).
    async fn move_current(&mut self, version: &str, current: &str) -> Result<(), Error> {
        let sid = self.secret_id.clone();
        move_current_from(&self.client, &sid, version, current)
            .await
            .map_err(|e| aws_err(ops::LABEL, &sid, e))?;
        self.drop_pending_label(version).await?;
        self.current_version = Some(version.to_string());
        Ok(())
    }

    /// Removes the AWSPENDING label from `version`.
    async fn drop_pending_label(&mut self, version: &str) -> Result<(), Error> {
        drop_pending_label(&self.client, &self.secret_id, version)
            .await
            .map_err(|e| aws_err(ops::LABEL, &self.secret_id, e))
    }

    /// A new version holding `text`, made current as finishSecret does:
    /// labelled AWSPENDING, then AWSCURRENT moved onto it.
    async fn write_current(&mut self, text: &str) -> Result<(), Error> {
        let Some(current) = self.current_version.clone() else {
            return Err(Error::Runtime(format!(
                "secret {:?}: no AWSCURRENT version",
                self.secret_id
            )));
        };
        let version = put(&self.client, &self.secret_id, text, Some("AWSPENDING")).await?;
        self.move_current(&version, &current).await
    }

    /// Writes the transitions applied to the table since it was loaded; a
    /// key whose material was destroyed takes the former versions with it ([`purge`]).
    pub async fn save(&mut self) -> Result<(), Error> {
        // a new pending key replaces what a stopped promote left (its
        // version takes the label, or its value the pending secret)
        if self.table.id_in(KeyState::Pending).is_none() {
            self.finish_stopped_promote().await?;
        }
        match self.spec.layout {
            Layout::Rekey => self.save_keyring().await?,
            Layout::EnvJson => self.save_env_json().await?,
            Layout::Value => self.save_value().await?,
        }
        self.save_meta().await?;
        let destroyed: Vec<KeyId> = self
            .before
            .entries
            .iter()
            .filter(|b| b.key.is_some())
            .filter(|b| {
                self.table
                    .entries
                    .iter()
                    .any(|e| e.id == b.id && e.key.is_none())
            })
            .map(|b| b.id)
            .collect();
        if !destroyed.is_empty() {
            self.purge_former_versions(&destroyed).await?;
        }
        self.before = self.table.clone();
        Ok(())
    }

    /// Whether a promote was stopped before it took the now current key
    /// away from the new key's place (saving finishes it).
    pub fn promote_unfinished(&self) -> bool {
        self.left_pending.is_some()
    }

    /// Takes the now current key away from the new key's place, as the
    /// promote that was stopped would have.
    async fn finish_stopped_promote(&mut self) -> Result<(), Error> {
        match self.left_pending.take() {
            None => {}
            Some(LeftPending::Secret(sid)) => {
                // read again: a key staged there since this store was opened
                // is not the copy of the current key to take away
                let still_current = match (
                    self.pending_value(None).await?,
                    self.before
                        .entries
                        .iter()
                        .find(|e| e.state == KeyState::Current)
                        .and_then(|e| e.key.as_ref()),
                ) {
                    (Some((pending, _)), Some(current)) => pending.material() == current.material(),
                    _ => false,
                };
                if still_current {
                    self.remove_pending().await?;
                } else {
                    tracing::warn!(
                        "secret {sid:?} no longer holds the current key: left as it is (a key may have been staged there since)"
                    );
                }
            }
            Some(LeftPending::Label(version)) => self.drop_pending_label(&version).await?,
        }
        Ok(())
    }

    /// `layout = "rekey"`: the keyring's versions.
    async fn save_keyring(&mut self) -> Result<(), Error> {
        let was_pending = self.before.id_in(KeyState::Pending);
        let now_pending = self.table.id_in(KeyState::Pending);
        let now_current = self.table.id_in(KeyState::Current);
        match (was_pending, now_pending) {
            // createSecret: the keyring as it will be once promoted, labelled AWSPENDING
            (None, Some(_)) => {
                let mut promoted = self.table.clone();
                let _ = promoted.promote(crate::crypto::keytable::now());
                let text = keyring::render(&promoted)?;
                self.pending_version =
                    Some(put(&self.client, &self.secret_id, &text, Some("AWSPENDING")).await?);
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
                    self.drop_pending_label(&pending).await?;
                }
                let text = keyring::render(&self.table)?;
                self.write_current(&text).await?;
            }
            // rollback after promotion, retire
            _ => {
                let text = keyring::render(&self.table)?;
                self.write_current(&text).await?;
            }
        }
        Ok(())
    }
}

/// Refuses a keyring secret read in a region other than its primary's (a
/// replica): the record of the databases using it is kept beside the
/// secret, in the region it is read in, and a replica's would be a second
/// record that a retire in the primary region never reads, while the
/// retire's new version replicates to the databases reading the replica.
fn refuse_a_replica(
    client: &Client,
    secret_id: &str,
    described: &aws_sdk_secretsmanager::operation::describe_secret::DescribeSecretOutput,
) -> Result<(), Error> {
    let (Some(primary), Some(here)) = (described.primary_region(), client.config().region()) else {
        return Ok(());
    };
    if primary == here.as_ref() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "secret {secret_id:?} is read in {here}, where it is a replica of the secret in {primary}: rekey keeps the \
         record of the databases using a keyring beside it, and a replica's record would be one a retire in {primary} \
         never reads. Read the keyring in its primary region in every job that uses it: region = \"{primary}\" \
         in the job's [keys]"
    )))
}
