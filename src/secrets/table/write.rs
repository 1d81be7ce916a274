//! Writing a key table back: a transition in one transaction (statuses,
//! a new row, a retired row moved to rekey's archive and a restored one
//! put back as it was), refused if the table
//! changed since it was read (a new row also if another purpose took its
//! version meanwhile); and one wrapped key replaced by compare-and-swap,
//! for a master key rewrap.

use std::collections::BTreeMap;

use super::store::{null_version, KeyTableStore, LOCK, TABLE_LOCK};
use super::{Status, DEFAULT_ALGORITHM};
use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::{Entry, KeyState};
use crate::db::quote_ident;
use crate::error::DbContext;
use crate::Error;

impl KeyTableStore {
    /// Writes the table's keys back in one transaction: every status, any
    /// new row, retired rows moved into rekey's archive. Demotions are
    /// written before the promotion, so a unique index on the ACTIVE row
    /// holds at every statement.
    pub async fn save(&mut self) -> Result<(), Error> {
        self.reopen_if_closed().await?;
        let c = self.columns.clone();
        let what = || format!("writing the key table {}", self.relation);
        let set_status = format!(
            "UPDATE {t} SET {s} = $3::text::{st} WHERE {p}::text = $1 AND {v} = $2::bigint AND {s}::text IS DISTINCT FROM $3",
            t = self.relation,
            s = quote_ident(&c.status),
            st = self.ty(&c.status),
            p = quote_ident(&c.purpose),
            v = quote_ident(&c.version),
        );
        // a new key's row is made now; a restored key's row ($7, the
        // columns kept when it was retired) as the application made it
        let insert = format!(
            "INSERT INTO {t} ({v}, {p}, {a}, {k}, {s}, {cr}, {ex}) VALUES ($2::bigint, $1::text::{pt},
               coalesce($7::text::jsonb ->> 'algorithm', $4)::text::{at}, $5, $3::text::{st},
               coalesce(($7::text::jsonb ->> 'created_at')::{crt}, now()::{crt}),
               coalesce(($7::text::jsonb ->> 'expires_at')::{ext}, (now() + make_interval(days => $6))::{ext}))",
            t = self.relation,
            v = quote_ident(&c.version),
            p = quote_ident(&c.purpose),
            a = quote_ident(&c.algorithm),
            k = quote_ident(&c.encrypted_key),
            s = quote_ident(&c.status),
            cr = quote_ident(&c.created_at),
            ex = quote_ident(&c.expires_at),
            pt = self.ty(&c.purpose),
            at = self.ty(&c.algorithm),
            st = self.ty(&c.status),
            crt = self.ty(&c.created_at),
            ext = self.ty(&c.expires_at),
        );
        // the row's own columns besides its key, kept for a restore (times in
        // ISO 8601, as JSON writes them whatever the session's DateStyle)
        let delete = format!(
            "DELETE FROM {t} WHERE {p}::text = $1 AND {v} = $2::bigint
             RETURNING json_build_object('algorithm', {a}::text, 'created_at', {cr}, 'expires_at', {ex})::text",
            t = self.relation,
            p = quote_ident(&c.purpose),
            v = quote_ident(&c.version),
            a = quote_ident(&c.algorithm),
            cr = quote_ident(&c.created_at),
            ex = quote_ident(&c.expires_at),
        );
        let archived_row = "SELECT archived_row::text FROM rekey.key_table_keys
                             WHERE key_table = $1 AND purpose = $2 AND version = $3 AND state = 'retired'";
        let mark = "INSERT INTO rekey.key_table_keys (key_table, purpose, version, state, changed_at, compromised, archived_key, archived_row)
                    VALUES ($1, $2, $3, $4, to_timestamp($5), $6, $7, $8::text::jsonb)
                    ON CONFLICT (key_table, purpose, version) DO UPDATE SET state = EXCLUDED.state,
                      changed_at = EXCLUDED.changed_at, compromised = EXCLUDED.compromised, archived_key = EXCLUDED.archived_key,
                      archived_row = CASE WHEN EXCLUDED.state = 'retired'
                                     THEN coalesce(EXCLUDED.archived_row, rekey.key_table_keys.archived_row) END";
        let tx = self.client.transaction().await.ctx(what)?;
        tx.execute(LOCK, &[&self.relation, &self.purpose])
            .await
            .ctx(what)?;
        let rows = tx
            .query(
                &format!(
                    "SELECT {v}::bigint, {s}::text, {k} FROM {t} WHERE {p}::text = $1 FOR UPDATE",
                    v = quote_ident(&c.version),
                    s = quote_ident(&c.status),
                    k = quote_ident(&c.encrypted_key),
                    p = quote_ident(&c.purpose),
                    t = self.relation
                ),
                &[&self.purpose],
            )
            .await
            .ctx(what)?;
        let mut now = BTreeMap::new();
        let mut rewrapped = Vec::new();
        for r in rows {
            let version: i64 = r
                .get::<_, Option<i64>>(0)
                .ok_or_else(|| null_version(&self.relation, &c.version, &self.purpose))?;
            let blob: Option<Vec<u8>> = r.get(2);
            let read = KeyId::try_from(version)
                .ok()
                .and_then(|id| self.wrapped.get(&id));
            if blob.as_ref() != read {
                rewrapped.push(version);
            }
            now.insert(version, r.get::<_, Option<String>>(1).unwrap_or_default());
        }
        if now != self.seen || !rewrapped.is_empty() {
            return Err(Error::Config(format!(
                "the key table {} changed since rekey read it (versions and statuses now {now:?}, read as {:?}; \
                 wrapped keys changed: {rewrapped:?}, e.g. by a master key rewrap): nothing was written; run the command again",
                self.relation, self.seen
            )));
        }
        // a key staged now (a restored key keeps the version it had)
        let adds: Vec<i64> = self
            .table
            .entries
            .iter()
            .filter(|e| e.state == KeyState::Pending)
            .map(|e| i64::from(e.id))
            .filter(|v| !now.contains_key(v))
            .collect();
        if let Some(lowest) = adds.iter().min() {
            // versions are the whole table's: no other purpose's key took it meanwhile
            tx.execute(TABLE_LOCK, &[&self.relation]).await.ctx(what)?;
            let taken: Option<i64> = tx
                .query_one(
                    &format!(
                        "SELECT greatest((SELECT max({v}::bigint) FROM {t} WHERE {p}::text IS DISTINCT FROM $1),
                           (SELECT max(version) FROM rekey.key_table_keys WHERE key_table = $2 AND purpose IS DISTINCT FROM $1))",
                        v = quote_ident(&c.version),
                        p = quote_ident(&c.purpose),
                        t = self.relation
                    ),
                    &[&self.purpose, &self.relation],
                )
                .await
                .ctx(what)?
                .get(0);
            if let Some(taken) = taken.filter(|t| t >= lowest) {
                return Err(Error::Config(format!(
                    "the key table {} changed since rekey read it: another purpose's key has version {taken}, and the new key's \
                     version {lowest} must be above every purpose's: nothing was written; run the command again",
                    self.relation
                )));
            }
        }
        let algorithm = self
            .table
            .id_in(KeyState::Current)
            .and_then(|id| self.algorithms.get(&id))
            .filter(|a| !a.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_ALGORITHM.into());
        let mut order: Vec<&Entry> = self.table.entries.iter().collect();
        order.sort_by_key(|e| e.state == KeyState::Current);
        for e in order {
            let version = i64::from(e.id);
            let blob = self.wrapped.get(&e.id);
            let mut archived = None;
            let mut row: Option<String> = None;
            if e.state == KeyState::Retired {
                // material kept only while the table still holds it (purged: gone)
                archived = e.key.as_ref().and(blob).cloned();
                row = tx
                    .query_opt(&delete, &[&self.purpose, &version])
                    .await
                    .ctx(what)?
                    .and_then(|r| r.get(0));
            } else {
                let blob = blob.ok_or_else(|| {
                    Error::Runtime(format!(
                        "key {} has no wrapped form; nothing was saved",
                        e.id
                    ))
                })?;
                let status = Status::written(e, self.stand_in == Some(e.id)).as_str();
                if now.contains_key(&version) {
                    tx.execute(&set_status, &[&self.purpose, &version, &status])
                        .await
                        .ctx(what)?;
                } else {
                    let restored: Option<String> = tx
                        .query_opt(archived_row, &[&self.relation, &self.purpose, &version])
                        .await
                        .ctx(what)?
                        .and_then(|r| r.get(0));
                    tx.execute(
                        &insert,
                        &[
                            &self.purpose,
                            &version,
                            &status,
                            &algorithm,
                            blob,
                            &self.expires_in_days,
                            &restored,
                        ],
                    )
                    .await
                    .ctx(what)?;
                }
            }
            let changed_at = e.changed_at as f64;
            tx.execute(
                mark,
                &[
                    &self.relation,
                    &self.purpose,
                    &version,
                    &e.state.to_string(),
                    &changed_at,
                    &e.compromised,
                    &archived,
                    &row,
                ],
            )
            .await
            .ctx(what)?;
        }
        tx.commit().await.ctx(what)?;
        self.seen = self
            .table
            .entries
            .iter()
            .filter(|e| e.state != KeyState::Retired)
            .map(|e| {
                let status = Status::written(e, self.stand_in == Some(e.id));
                (i64::from(e.id), status.as_str().to_string())
            })
            .collect();
        Ok(())
    }

    /// Replaces key `id`'s wrapped form, only if it still is `old`
    /// (compare-and-swap, committed at once): a rewrap killed at any
    /// instant leaves each key wrapped under one master key or the other,
    /// never lost. Returns whether it replaced it.
    pub async fn replace_wrapped(
        &mut self,
        id: KeyId,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, Error> {
        self.reopen_if_closed().await?;
        let c = &self.columns;
        let version = i64::from(id);
        let what = || format!("re-wrapping key {id} in the key table {}", self.relation);
        let sql = format!(
            "UPDATE {t} SET {k} = $4 WHERE {p}::text = $1 AND {v} = $2::bigint AND {k} = $3",
            t = self.relation,
            k = quote_ident(&c.encrypted_key),
            p = quote_ident(&c.purpose),
            v = quote_ident(&c.version),
        );
        // under the key table's lock: a save of another job sees the new
        // wrapped key, or commits before it is written
        let tx = self.client.transaction().await.ctx(what)?;
        tx.execute(LOCK, &[&self.relation, &self.purpose])
            .await
            .ctx(what)?;
        let mut n = tx
            .execute(&sql, &[&self.purpose, &version, &old, &new])
            .await
            .ctx(what)?;
        if n == 0 {
            n = tx
                .execute(
                    "UPDATE rekey.key_table_keys SET archived_key = $5 WHERE key_table = $1 AND purpose = $2 AND version = $3 AND archived_key = $4",
                    &[&self.relation, &self.purpose, &version, &old, &new],
                )
                .await
                .ctx(what)?;
        }
        tx.commit().await.ctx(what)?;
        if n > 0 {
            self.wrapped.insert(id, new.to_vec());
        }
        Ok(n > 0)
    }
}
