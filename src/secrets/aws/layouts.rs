//! `layout = "env-json"` and `layout = "value"` on Secrets Manager: the
//! secret holds exactly what the application reads.
//!
//! - env-json: every transition is a new AWSCURRENT version of the flat
//!   object (applications read AWSCURRENT): stage adds the new key (and
//!   `<P>_PENDING_VERSION`, or `<P>_KEY_NEW`), promote switches the current
//!   version (or copies NEW into `<P>_KEY` and removes NEW), retire removes
//!   the old key's member; its material stays in the former versions.
//! - value: the secret string is the current key. The new key goes where the
//!   deployment reads `ENCRYPTION_KEY_NEW`: `pending_secret_id` (created, or
//!   given a new version) or the AWSPENDING version of the same secret.
//!   Promote makes it the AWSCURRENT value (AWSPREVIOUS keeps the old key)
//!   and deletes the pending secret (or removes the AWSPENDING label), as the
//!   healthprep policy deletes `ENCRYPTION_KEY_NEW`.

use zeroize::Zeroizing;

use super::errors::{aws_err, not_found, ops};
use super::{put, read, SecretsManagerStore, Version};
use crate::crypto::keyring::{encode_key, Key, KeyEncoding, KeyId};
use crate::crypto::keytable::{Entry, KeyState, KeyTable};
use crate::secrets::layout::{self, flat::FlatDoc, Slot};
use crate::secrets::spec::{KeysSpec, Layout};
use crate::Error;

/// The first version's text of a new secret holding `table`.
pub(super) fn initial_text(keys: &KeysSpec, table: &KeyTable) -> Result<Zeroizing<String>, Error> {
    let enc = keys.key_encoding.unwrap_or(if keys.fernet_job {
        KeyEncoding::Fernet
    } else {
        KeyEncoding::Hex
    });
    match keys.layout {
        Layout::Rekey => super::keyring::render(table),
        Layout::EnvJson => {
            let mut doc = FlatDoc::parse("{}").map_err(|e| Error::Runtime(e.to_string()))?;
            layout::render_env_json(&keys.prefix, &mut doc, table, enc);
            Ok(Zeroizing::new(doc.text().to_string()))
        }
        Layout::Value => table
            .entries
            .iter()
            .find(|e| e.state == KeyState::Current)
            .and_then(|e| e.key.as_ref())
            .map(|k| encode_key(k.material(), enc))
            .ok_or_else(|| Error::Config("the new secret has no current key".into())),
    }
}

impl SecretsManagerStore {
    /// Whether the secret can keep a key that is neither current nor
    /// pending (an un-staged key values may still be under): rekey's keyring
    /// and the versioned env-json can; the value layout and the dual
    /// convention hold only the current key and the new one.
    pub fn holds_unstaged_keys(&self) -> bool {
        match self.spec.layout {
            Layout::Rekey => true,
            Layout::EnvJson => self
                .doc
                .as_ref()
                .is_some_and(|d| layout::versioned(&self.spec.prefix, &d.names())),
            Layout::Value => false,
        }
    }

    /// Where applications read the new key, for messages.
    pub fn new_key_place(&self) -> String {
        match (&self.spec.layout, &self.spec.pending_secret_id) {
            (Layout::Value, Some(p)) => format!("secret {p:?}"),
            (Layout::Value, None) => "the AWSPENDING version".into(),
            (Layout::EnvJson, _) => format!("{}_KEY_NEW", self.spec.prefix),
            (Layout::Rekey, _) => "the keyring".into(),
        }
    }

    /// The layout and how keys are written, for `secrets init --adopt`.
    pub fn describe_layout(&self) -> String {
        match self.spec.layout {
            Layout::Rekey => "layout rekey (rekey's keyring JSON, keys in hex)".into(),
            Layout::EnvJson => format!(
                "layout env-json ({} convention, prefix {}), keys in {}",
                if self
                    .doc
                    .as_ref()
                    .is_some_and(|d| layout::versioned(&self.spec.prefix, &d.names()))
                {
                    "versioned"
                } else {
                    "dual"
                },
                self.spec.prefix,
                self.encoding
            ),
            Layout::Value => format!(
                "layout value (the secret is the key), keys in {}, pending key in {}",
                self.encoding,
                self.spec.pending_secret_id.as_deref().map_or_else(
                    || "its AWSPENDING version".to_string(),
                    |p| format!("secret {p:?}")
                )
            ),
        }
    }

    fn layout_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "secret {:?} (layout = \"{}\") {e}",
            self.secret_id, self.spec.layout
        ))
    }

    /// Reads the table of an env-json or value secret from its current text.
    pub(super) async fn open_layout(
        &mut self,
        text: &str,
        current: &Version,
        pending: Option<&Version>,
    ) -> Result<KeyTable, Error> {
        let fernet = self.spec.fernet_job;
        let (slots, current_text) = match self.spec.layout {
            Layout::EnvJson => {
                let doc = FlatDoc::parse(text).map_err(|e| {
                    if text.trim_start().starts_with('{') {
                        self.layout_err(e)
                    } else {
                        self.layout_err("is a plain value, not a flat JSON object of environment names: set layout = \"value\" if it is the key itself")
                    }
                })?;
                if doc.get("format").as_deref().map(String::as_str) == Some(super::keyring::FORMAT)
                {
                    return Err(self.layout_err("is a rekey keyring: set layout = \"rekey\""));
                }
                let (slots, cur) = layout::env_json_slots(&self.spec.prefix, &doc, 0)
                    .map_err(|e| self.layout_err(e))?;
                self.doc = Some(doc);
                (slots, cur)
            }
            Layout::Value | Layout::Rekey => {
                let key = layout::value_key(text).map_err(|e| self.layout_err(e))?;
                let pending = match (
                    self.pending_value(pending).await?,
                    &self.spec.pending_secret_id,
                ) {
                    (Some((new, _)), Some(sid)) if new.material() == key.material() => {
                        // a promote stopped before it deleted the pending secret
                        self.left_pending = Some(super::LeftPending::Secret(sid.clone()));
                        None
                    }
                    (found, _) => found,
                };
                let mut slots = vec![Slot {
                    id: None,
                    state: KeyState::Current,
                    key,
                    written_at: current.created,
                }];
                if let Some((new, at)) = pending {
                    slots.push(Slot {
                        id: None,
                        state: KeyState::Pending,
                        key: new,
                        written_at: at,
                    });
                }
                (slots, Some(Zeroizing::new(text.to_string())))
            }
        };
        self.encoding = self
            .spec
            .key_encoding
            .unwrap_or_else(|| match &current_text {
                Some(t) => layout::detect_encoding(t, fernet),
                None if fernet => KeyEncoding::Fernet,
                None => KeyEncoding::Hex,
            });
        Ok(layout::assemble(slots, &self.meta))
    }

    /// The pending key of a value secret, with when it was written.
    pub(super) async fn pending_value(
        &self,
        pending: Option<&Version>,
    ) -> Result<Option<(Key, u64)>, Error> {
        let parse = |sid: &str, text: &str| {
            layout::value_key(text)
                .map_err(|e| Error::Config(format!("secret {sid:?} (the pending key) {e}")))
        };
        match &self.spec.pending_secret_id {
            None => match pending {
                None => Ok(None),
                Some(p) => {
                    let text = read(&self.client, &self.secret_id, &p.id).await?;
                    Ok(Some((parse(&self.secret_id, &text)?, p.created)))
                }
            },
            Some(sid) => {
                let out = match self.client.get_secret_value().secret_id(sid).send().await {
                    Ok(out) => out,
                    Err(e) if not_found(&e) => return Ok(None),
                    // scheduled for deletion: the pending key is gone
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_invalid_request_exception()) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(aws_err(ops::READ, sid, e)),
                };
                let text = Zeroizing::new(out.secret_string().unwrap_or_default().to_string());
                let at = out
                    .created_date()
                    .map_or(0, |d| u64::try_from(d.secs()).unwrap_or(0));
                Ok(Some((parse(sid, &text)?, at)))
            }
        }
    }

    /// Key `id`'s material in a former version's text, recognised by its
    /// version name (env-json, versioned) or by the fingerprint the meta tag
    /// records for it.
    pub(super) fn archived_in(&self, text: &str, id: KeyId) -> Option<Key> {
        let fingerprint = self
            .meta
            .keys
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.fingerprint.clone());
        let candidates: Vec<(Option<KeyId>, Key)> = match self.spec.layout {
            Layout::EnvJson => {
                let doc = FlatDoc::parse(text).ok()?;
                layout::env_json_slots(&self.spec.prefix, &doc, 0)
                    .ok()?
                    .0
                    .into_iter()
                    .map(|s| (s.id, s.key))
                    .collect()
            }
            _ => vec![(None, layout::value_key(text).ok()?)],
        };
        candidates
            .into_iter()
            .find(|(sid, k)| {
                *sid == Some(id) || fingerprint.as_deref() == Some(k.fingerprint().as_str())
            })
            .map(|(_, k)| Key::new(id, *k.material()))
    }

    /// env-json: the object with the table's keys, as a new AWSCURRENT version when it changed.
    pub(super) async fn save_env_json(&mut self) -> Result<(), Error> {
        let Some(doc) = &self.doc else {
            return Err(Error::Runtime(format!(
                "secret {:?}: not read as env-json",
                self.secret_id
            )));
        };
        let mut next = FlatDoc::parse(doc.text()).map_err(|e| Error::Runtime(e.to_string()))?;
        layout::render_env_json(&self.spec.prefix, &mut next, &self.table, self.encoding);
        if next.text() != doc.text() {
            // one PutSecretValue: AWSCURRENT (and AWSPREVIOUS) move in the
            // same call, so no reader ever sees a half-written change
            let text = Zeroizing::new(next.text().to_string());
            self.current_version = Some(put(&self.client, &self.secret_id, &text, None).await?);
        }
        self.doc = Some(next);
        Ok(())
    }

    /// value: the pending key written, promoted, or dropped.
    pub(super) async fn save_value(&mut self) -> Result<(), Error> {
        let find = |t: &KeyTable, s: KeyState| t.entries.iter().find(|e| e.state == s).cloned();
        let text = |e: &Entry| {
            e.key
                .as_ref()
                .map(|k| encode_key(k.material(), self.encoding))
        };
        let (was_pending, now_pending) = (
            find(&self.before, KeyState::Pending),
            find(&self.table, KeyState::Pending),
        );
        let (was_current, now_current) = (
            find(&self.before, KeyState::Current),
            find(&self.table, KeyState::Current),
        );
        if let (None, Some(p)) = (&was_pending, &now_pending) {
            let t =
                text(p).ok_or_else(|| Error::Runtime("the staged key has no material".into()))?;
            return self.write_pending(&t).await;
        }
        let current_changed = was_current.map(|e| e.id) != now_current.as_ref().map(|e| e.id);
        if current_changed {
            let Some(cur) = now_current else {
                return Ok(());
            };
            let promoted_pending = was_pending.as_ref().is_some_and(|p| p.id == cur.id);
            match (
                promoted_pending,
                &self.spec.pending_secret_id,
                self.pending_version.clone(),
                self.current_version.clone(),
            ) {
                (true, None, Some(pending), Some(current)) => {
                    self.move_current(&pending, &current).await?;
                    self.pending_version = None;
                }
                _ => {
                    let t = match text(&cur) {
                        Some(t) => t,
                        None => {
                            let archived = self.archived_key(cur.id).await?.ok_or_else(|| {
                                Error::Config(format!(
                                    "key {} is no longer in secret {:?} or its former versions",
                                    cur.id, self.secret_id
                                ))
                            })?;
                            encode_key(archived.material(), self.encoding)
                        }
                    };
                    self.current_version =
                        Some(put(&self.client, &self.secret_id, &t, None).await?);
                    self.remove_pending().await?;
                }
            }
        } else if was_pending.is_some() && now_pending.is_none() {
            self.remove_pending().await?;
        }
        Ok(())
    }

    /// Writes the new key where the deployment reads `ENCRYPTION_KEY_NEW`.
    async fn write_pending(&mut self, text: &str) -> Result<(), Error> {
        let Some(sid) = self.spec.pending_secret_id.clone() else {
            self.pending_version =
                Some(put(&self.client, &self.secret_id, text, Some("AWSPENDING")).await?);
            return Ok(());
        };
        let created = self
            .client
            .create_secret()
            .name(&sid)
            .client_request_token(super::token())
            .secret_string(text)
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_exists_exception()) =>
            {
                put(&self.client, &sid, text, None).await.map(drop)
            }
            Err(e) => Err(aws_err(ops::CREATE, &sid, e)),
        }
    }

    /// Takes the pending key away: the pending secret deleted (at once: an
    /// application must not read it again), or the AWSPENDING label removed.
    pub(super) async fn remove_pending(&mut self) -> Result<(), Error> {
        match self.spec.pending_secret_id.clone() {
            Some(sid) => match self
                .client
                .delete_secret()
                .secret_id(&sid)
                .force_delete_without_recovery(true)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(aws_err(ops::DELETE, &sid, e)),
            },
            None => {
                if let Some(p) = self.pending_version.take() {
                    self.drop_pending_label(&p).await?;
                }
                Ok(())
            }
        }
    }
}
