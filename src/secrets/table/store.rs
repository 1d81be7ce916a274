//! The key table store: reads the application's key table and rekey's
//! lifecycle markers and unwraps every data key through KMS (pinned to the
//! job's master key, except for a rewrap). Writing back is in `write`; the
//! state mapping is in the parent module's documentation.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_kms::Client as Kms;
use tokio_postgres::Client;

use super::{marker_state, KeyColumns, Status, DEFAULT_PURPOSE, DEFAULT_TABLE};
use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{Entry, KeyState, KeyTable};
use crate::db::{quote_ident, Database};
use crate::error::DbContext;
use crate::secrets::spec::KeysSpec;
use crate::secrets::wrap;
use crate::Error;

/// The lock every writer of one key table's keys of one purpose takes, in
/// the transaction that writes (a save) or checks (a rewrap's final
/// check): a stage, promote or retire of one job and a master key rewrap
/// of another never interleave. The two-key form: the one-bigint form is
/// rekey's session locks on jobs.
pub(super) const LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('rekey.key_table'), hashtext($1 || '/' || $2))";

/// The lock a save that adds a row takes after [`LOCK`], for the whole
/// table: versions are shared by every purpose, so two jobs of different
/// purposes never add the same version. Taken after the purpose's own
/// lock, always in that order.
pub(super) const TABLE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('rekey.key_table'), hashtext($1))";

/// A key table, opened: its keys unwrapped in memory.
pub struct KeyTableStore {
    /// A connection to the target database.
    pub(super) client: Client,
    /// Where to open it again.
    db: Database,
    /// KMS.
    kms: Kms,
    /// The master key new data keys are wrapped under, as the job names it.
    master: String,
    /// The table, as the catalog names it (`regclass` text).
    pub(super) relation: String,
    /// The keys' purpose.
    pub(super) purpose: String,
    /// Column names.
    pub(super) columns: KeyColumns,
    /// Type of each mapped column (`format_type`), for casts on write.
    pub(super) types: HashMap<String, String>,
    /// A new key's lifetime in days.
    pub(super) expires_in_days: i32,
    /// Each key's wrapped form, as stored (archive included).
    pub(super) wrapped: HashMap<KeyId, Vec<u8>>,
    /// Each row's algorithm.
    pub(super) algorithms: HashMap<KeyId, String>,
    /// Each row's status as last read or written: a save refuses a table
    /// changed since (another writer's promotion, a key added by hand; with
    /// `wrapped`, a key re-wrapped by a rewrap).
    pub(super) seen: BTreeMap<i64, String>,
    /// Whether every key must unwrap under `master` alone (all but a
    /// rewrap, which finds keys under either master key).
    pinned: bool,
    /// The current key when the purpose has no `ACTIVE` row: its newest
    /// `COMPROMISED` row rekey did not stage or retire. Its row stays
    /// `COMPROMISED` on every write.
    pub(super) stand_in: Option<KeyId>,
    /// The highest version of the whole table, every purpose and rekey's
    /// markers for it included: a new key's version is above it.
    pub(super) version_floor: i64,
    /// The keys, unwrapped.
    pub table: KeyTable,
}

impl std::fmt::Debug for KeyTableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTableStore")
            .field("relation", &self.relation)
            .field("purpose", &self.purpose)
            .field("master", &self.master)
            .field("table", &self.table)
            .finish()
    }
}

/// One row of the key table, as read.
struct Row {
    version: KeyId,
    status: Status,
    blob: Vec<u8>,
    algorithm: String,
    created_at: u64,
}

/// One lifecycle marker of rekey's.
struct Marker {
    state: KeyState,
    changed_at: u64,
    compromised: bool,
    archived: Option<Vec<u8>>,
}

fn secs(v: Option<i64>) -> u64 {
    v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

impl KeyTableStore {
    /// Opens the key table `keys` names and unwraps its keys; with
    /// `pinned`, under the job's master key alone.
    pub async fn open(keys: &KeysSpec, pinned: bool) -> Result<Self, Error> {
        let master = keys.kms_key_id.clone().ok_or_else(|| {
            Error::Config("keys source \"table\" needs kms_key_id = \"alias/... or key ARN\" (the master key that wraps the data keys)".into())
        })?;
        let url = keys.database_url.clone().ok_or_else(|| {
            Error::Config("keys source \"table\" reads its keys from the target database: give it with --database-url, DATABASE_URL or [database] url".into())
        })?;
        let db = Database::parse(&url).map_err(|e| Error::Config(e.to_string()))?;
        let client = db.connect().await?;
        let kms = Kms::new(&crate::secrets::aws::sdk_config(keys).await);
        let name = keys.table.clone().unwrap_or_else(|| DEFAULT_TABLE.into());
        let quoted = name
            .split('.')
            .map(quote_ident)
            .collect::<Vec<_>>()
            .join(".");
        let relation: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&quoted])
            .await
            .ctx(|| format!("looking up the key table {name:?}"))?
            .get(0);
        let relation = relation.ok_or_else(|| {
            Error::Config(format!(
                "the key table {name:?} does not exist in the target database (or this role cannot see it): set [keys] table"
            ))
        })?;
        let columns = keys.columns.clone().unwrap_or_default();
        let types = column_types(&client, &relation, &columns).await?;
        let mut store = KeyTableStore {
            client,
            db,
            kms,
            master,
            relation,
            purpose: keys
                .purpose
                .clone()
                .unwrap_or_else(|| DEFAULT_PURPOSE.into()),
            columns,
            types,
            expires_in_days: keys
                .expires_in_days
                .unwrap_or(super::DEFAULT_EXPIRES_IN_DAYS)
                .try_into()
                .unwrap_or(i32::MAX),
            wrapped: HashMap::new(),
            algorithms: HashMap::new(),
            seen: BTreeMap::new(),
            pinned,
            stand_in: None,
            version_floor: 0,
            table: KeyTable::default(),
        };
        store.load().await?;
        Ok(store)
    }

    fn col(&self, c: &str) -> String {
        quote_ident(c)
    }

    pub(super) fn ty(&self, c: &str) -> &str {
        self.types.get(c).map_or("text", String::as_str)
    }

    /// Opens the connection again where it was closed while the store sat
    /// idle between statements (through its KMS calls, a key per call): a
    /// server's `idle_session_timeout`, a proxy. It holds nothing between
    /// transactions, and a save checks the table against what was read.
    pub(super) async fn reopen_if_closed(&mut self) -> Result<(), Error> {
        if self.client.is_closed() {
            tracing::debug!("the key table's session was closed while idle; reopening it");
            self.client = self.db.connect().await?;
        }
        Ok(())
    }

    /// Reads the rows and markers and unwraps every key.
    async fn load(&mut self) -> Result<(), Error> {
        self.reopen_if_closed().await?;
        let c = &self.columns;
        let sql = format!(
            "SELECT {v}::bigint, {s}::text, {k}, {a}::text, extract(epoch FROM {cr})::bigint FROM {t} WHERE {p}::text = $1 ORDER BY 1",
            v = self.col(&c.version),
            s = self.col(&c.status),
            k = self.col(&c.encrypted_key),
            a = self.col(&c.algorithm),
            cr = self.col(&c.created_at),
            p = self.col(&c.purpose),
            t = self.relation,
        );
        let what = || format!("reading the key table {}", self.relation);
        let mut rows = Vec::new();
        for r in self.client.query(&sql, &[&self.purpose]).await.ctx(what)? {
            let version: i64 = r.get::<_, Option<i64>>(0).ok_or_else(|| {
                null_version(&self.relation, &self.columns.version, &self.purpose)
            })?;
            let version = KeyId::try_from(version).map_err(|_| {
                Error::Config(format!(
                    "key table {}: version {version} is not a key id rekey can use (1 to {})",
                    self.relation,
                    KeyId::MAX
                ))
            })?;
            let status: Option<String> = r.get(1);
            let status = status.as_deref().and_then(Status::parse).ok_or_else(|| {
                Error::Config(format!(
                    "key table {}: version {version} has status {status:?}; rekey reads ACTIVE, INACTIVE or COMPROMISED",
                    self.relation
                ))
            })?;
            let blob: Option<Vec<u8>> = r.get(2);
            let blob = blob.ok_or_else(|| {
                Error::Config(format!(
                    "key table {}: version {version} has no wrapped key",
                    self.relation
                ))
            })?;
            rows.push(Row {
                version,
                status,
                blob,
                algorithm: r.get::<_, Option<String>>(3).unwrap_or_default(),
                created_at: secs(r.get(4)),
            });
        }
        let active: Vec<KeyId> = rows
            .iter()
            .filter(|r| r.status == Status::Active)
            .map(|r| r.version)
            .collect();
        if active.len() > 1 {
            return Err(Error::Config(format!(
                "key table {} has {} ACTIVE keys for purpose {:?} (versions {active:?}); applications must agree on one: set all but one INACTIVE",
                self.relation, active.len(), self.purpose
            )));
        }
        // built afresh: a row deleted since the last read leaves nothing behind
        let seen: BTreeMap<i64, String> = rows
            .iter()
            .map(|r| (i64::from(r.version), r.status.as_str().to_string()))
            .collect();
        let mut wrapped = HashMap::new();
        let mut algorithms = HashMap::new();
        let markers = self.markers().await?;
        let version_floor = self.version_floor().await?;
        let stand_in = if active.is_empty() {
            rows.iter()
                .filter(|r| r.status == Status::Compromised)
                .filter(|r| {
                    !matches!(
                        markers.get(&r.version).map(|m| m.state),
                        Some(KeyState::Pending | KeyState::Previous | KeyState::Retired)
                    )
                })
                .map(|r| r.version)
                .max()
        } else {
            None
        };
        if active.is_empty() && stand_in.is_none() {
            return Err(self.no_current_key(&rows).await);
        }
        let mut table = KeyTable::default();
        for r in rows {
            let m = markers.get(&r.version);
            let key = self.unwrap(r.version, &r.blob).await?;
            let state = if stand_in == Some(r.version) {
                KeyState::Current
            } else {
                r.status.state(m.map(|m| m.state))
            };
            table.entries.push(Entry {
                id: r.version,
                state,
                created_at: r.created_at,
                changed_at: m.map_or(r.created_at, |m| m.changed_at),
                key: Some(key),
                compromised: r.status == Status::Compromised || m.is_some_and(|m| m.compromised),
            });
            wrapped.insert(r.version, r.blob);
            algorithms.insert(r.version, r.algorithm);
        }
        for (version, m) in markers {
            if m.state != KeyState::Retired || table.entries.iter().any(|e| e.id == version) {
                continue;
            }
            let key = match &m.archived {
                Some(blob) => Some(self.unwrap(version, blob).await?),
                None => None,
            };
            if let Some(blob) = m.archived {
                wrapped.insert(version, blob);
            }
            table.entries.push(Entry {
                id: version,
                state: KeyState::Retired,
                created_at: 0,
                changed_at: m.changed_at,
                key,
                compromised: m.compromised,
            });
        }
        table.entries.sort_by_key(|e| e.id);
        self.table = table;
        self.seen = seen;
        self.wrapped = wrapped;
        self.algorithms = algorithms;
        self.stand_in = stand_in;
        self.version_floor = version_floor;
        Ok(())
    }

    /// Why a purpose without an `ACTIVE` or usable `COMPROMISED` row has no
    /// current key, and the fix: no row at all (a purpose spelt otherwise
    /// than the rows': the purposes present are listed), or only rows
    /// applications do not encrypt with.
    async fn no_current_key(&self, rows: &[Row]) -> Error {
        if rows.is_empty() {
            let sql = format!(
                "SELECT DISTINCT {p}::text FROM {t} ORDER BY 1",
                p = self.col(&self.columns.purpose),
                t = self.relation
            );
            let found = self
                .client
                .query(&sql, &[])
                .await
                .ctx(|| format!("reading the purposes of the key table {}", self.relation));
            let present: Vec<String> = match found {
                Ok(found) => found
                    .iter()
                    .filter_map(|r| r.get::<_, Option<String>>(0))
                    .map(|p| format!("{p:?}"))
                    .collect(),
                Err(e) => return e,
            };
            return Error::Config(format!(
                "key table {} has no key of purpose {:?}; {}: set [keys] purpose to the one this job's values are under (it is compared exactly, case included)",
                self.relation,
                self.purpose,
                if present.is_empty() {
                    "the table has no rows".to_string()
                } else {
                    format!("the purposes present are {}", present.join(", "))
                }
            ));
        }
        let listed: Vec<String> = rows
            .iter()
            .map(|r| format!("{} {}", r.version, r.status.as_str()))
            .collect();
        Error::Config(format!(
            "key table {} has no ACTIVE key of purpose {:?} (and no COMPROMISED one rekey could rotate away from): versions {}; \
             set the key applications encrypt with ACTIVE (UPDATE {} SET {} = 'ACTIVE' WHERE {} = <its version>), then run again",
            self.relation,
            self.purpose,
            listed.join(", "),
            self.relation,
            self.col(&self.columns.status),
            self.col(&self.columns.version),
        ))
    }

    /// The highest version of the whole table (every purpose) and of
    /// rekey's markers for it (retired keys'), 0 for none.
    async fn version_floor(&self) -> Result<i64, Error> {
        let what = || format!("reading the versions of the key table {}", self.relation);
        let sql = format!(
            "SELECT coalesce(max({v}::bigint), 0) FROM {t}",
            v = self.col(&self.columns.version),
            t = self.relation
        );
        let rows: i64 = self.client.query_one(&sql, &[]).await.ctx(what)?.get(0);
        if !self.has_markers().await? {
            return Ok(rows);
        }
        let marked: i64 = self
            .client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM rekey.key_table_keys WHERE key_table = $1",
                &[&self.relation],
            )
            .await
            .ctx(what)?
            .get(0);
        Ok(rows.max(marked))
    }

    /// The version a new key of this purpose takes: above every version of
    /// the table, any purpose's and rekey's retired markers' (the
    /// procedure's `getNextKeyVersion`), as read with the keys. Refused
    /// where the version column or a key id cannot hold it.
    pub fn next_id(&self) -> Result<KeyId, Error> {
        let own = self
            .table
            .next_id()
            .map_err(|e| Error::Config(e.to_string()))?;
        let next = i64::from(own).max(self.version_floor.saturating_add(1));
        let ty = self.ty(&self.columns.version);
        let column_max = match ty {
            "smallint" => i64::from(i16::MAX),
            "integer" => i64::from(i32::MAX),
            _ => i64::MAX,
        };
        match KeyId::try_from(next) {
            Ok(id) if next <= column_max => Ok(id),
            _ => Err(Error::Config(format!(
                "key table {}: a new key's version must be above {}, the highest version of the table (every purpose and retired key \
                 included: applications may look a key up by version alone), but {next} does not fit the {:?} column ({ty}) or a key id \
                 (1 to {}); nothing was staged: widen the column, or give the keys versions that leave room",
                self.relation,
                self.version_floor,
                self.columns.version,
                KeyId::MAX
            ))),
        }
    }

    /// The rows of this table's other purposes, and their retired keys
    /// still archived by rekey, each with the master key (ARN) that wraps
    /// it as KMS names it from the wrapped blob (`Decrypt`; the plaintext
    /// is dropped at once), `None` where KMS would not say: what a master
    /// key rewrap of this purpose did not move. Never material.
    pub async fn other_purposes_wrapping(
        &mut self,
    ) -> Result<Vec<(String, i64, Option<String>)>, Error> {
        self.reopen_if_closed().await?;
        let c = &self.columns;
        let what = || {
            format!(
                "reading the other purposes of the key table {}",
                self.relation
            )
        };
        let archived = if self.has_markers().await? {
            "UNION ALL SELECT purpose, version, archived_key FROM rekey.key_table_keys
              WHERE key_table = $2 AND purpose IS DISTINCT FROM $1 AND state = 'retired' AND archived_key IS NOT NULL"
        } else {
            "AND $2::text IS NOT NULL"
        };
        let sql = format!(
            "SELECT {p}::text, {v}::bigint, {k} FROM {t} WHERE {p}::text IS DISTINCT FROM $1 {archived} ORDER BY 1, 2",
            p = self.col(&c.purpose),
            v = self.col(&c.version),
            k = self.col(&c.encrypted_key),
            t = self.relation
        );
        let rows = self
            .client
            .query(&sql, &[&self.purpose, &self.relation])
            .await
            .ctx(what)?;
        let mut out = Vec::new();
        for r in rows {
            let purpose: String = r
                .get::<_, Option<String>>(0)
                .unwrap_or_else(|| "(no purpose)".into());
            let Some(version) = r.get::<_, Option<i64>>(1) else {
                // a row without a version names no key rekey could have
                // moved; it is reported as unchecked under its purpose
                out.push((purpose, 0, None));
                continue;
            };
            let blob: Option<Vec<u8>> = r.get(2);
            let under = match (blob, KeyId::try_from(version)) {
                (Some(blob), Ok(id)) => match wrap::unwrap(&self.kms, id, &blob, None).await {
                    Ok((_, arn)) => Some(arn),
                    // KMS refused to say (no kms:Decrypt on it, a blob it
                    // does not know): reported as unchecked
                    Err(e) if e.is_refusal() => None,
                    // throttled or unreachable: a retry will know, so the
                    // command fails rather than report a guess
                    Err(e) => {
                        return Err(Error::Runtime(format!(
                            "{}: asking which master key wraps {purpose} version {version}: {e}; run the command again",
                            what()
                        )))
                    }
                },
                _ => None,
            };
            out.push((purpose, version, under));
        }
        Ok(out)
    }

    async fn unwrap(&self, version: KeyId, blob: &[u8]) -> Result<Key, Error> {
        let (key, _) = wrap::unwrap(&self.kms, version, blob, self.pinned.then_some(self.master.as_str()))
            .await
            .map_err(|e| {
                let refused = e.is_refusal();
                let said = format!(
                    "key table {}, master key {:?}: {e}; name the master key the table's data keys are wrapped under in [keys] kms_key_id \
                     (check the id or alias, region and endpoint, and that this identity may call kms:Decrypt on it); if a master key \
                     rewrap is under way, finish it (`rekey secrets rewrap --to-kms-key ...`) and name that key",
                    self.relation, self.master
                );
                if refused {
                    Error::Config(said)
                } else {
                    Error::Runtime(said)
                }
            })?;
        Ok(key)
    }

    /// Whether rekey's schema (its markers) exists yet.
    async fn has_markers(&self) -> Result<bool, Error> {
        Ok(self
            .client
            .query_one(
                "SELECT to_regclass('rekey.key_table_keys') IS NOT NULL",
                &[],
            )
            .await
            .ctx(|| "reading rekey's key table markers".to_string())?
            .get(0))
    }

    /// rekey's markers for this table and purpose (none before rekey's schema exists).
    async fn markers(&self) -> Result<BTreeMap<KeyId, Marker>, Error> {
        let what = || "reading rekey's key table markers".to_string();
        let mut out = BTreeMap::new();
        if !self.has_markers().await? {
            return Ok(out);
        }
        let rows = self
            .client
            .query(
                "SELECT version, state, extract(epoch FROM changed_at)::bigint, compromised, archived_key
                   FROM rekey.key_table_keys WHERE key_table = $1 AND purpose = $2",
                &[&self.relation, &self.purpose],
            )
            .await
            .ctx(what)?;
        for r in rows {
            let version: i64 = r.get(0);
            let state: String = r.get(1);
            let (Ok(version), Some(state)) = (KeyId::try_from(version), marker_state(&state))
            else {
                continue;
            };
            out.insert(
                version,
                Marker {
                    state,
                    changed_at: secs(r.get(2)),
                    compromised: r.get(3),
                    archived: r.get(4),
                },
            );
        }
        Ok(out)
    }

    /// A new data key from KMS under the job's master key.
    pub async fn new_key(&mut self, id: KeyId) -> Result<Key, Error> {
        let (key, blob) = wrap::generate(&self.kms, id, &self.master).await?;
        self.wrapped.insert(id, blob);
        Ok(key)
    }

    /// Names the store for the audit trail.
    pub fn secret_id(&self) -> String {
        format!("table:{}:{}", self.relation, self.purpose)
    }

    /// Reads the table again (a rewrap's final check sees keys added meanwhile).
    pub async fn refresh(&mut self) -> Result<(), Error> {
        self.load().await
    }

    /// Begins a transaction on this store's connection holding the key
    /// table's lock ([`LOCK`]) until [`KeyTableStore::release_lock`]: no
    /// other job's save of this table and purpose commits meanwhile.
    pub async fn hold_lock(&mut self) -> Result<(), Error> {
        self.reopen_if_closed().await?;
        let what = || format!("locking the key table {}", self.relation);
        self.client.batch_execute("BEGIN").await.ctx(what)?;
        let locked = self
            .client
            .execute(LOCK, &[&self.relation, &self.purpose])
            .await
            .ctx(what);
        if locked.is_err() {
            // the error to report is the lock's; the connection is left idle either way
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        locked.map(drop)
    }

    /// Ends [`KeyTableStore::hold_lock`]'s transaction (it wrote nothing).
    pub async fn release_lock(&mut self) -> Result<(), Error> {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .ctx(|| format!("unlocking the key table {}", self.relation))
    }

    /// Every stored wrapped data key (archive included), by key id: what a
    /// master key rewrap re-wraps.
    pub fn wrapped_keys(&self) -> Vec<(KeyId, Vec<u8>)> {
        let mut v: Vec<_> = self.wrapped.iter().map(|(k, b)| (*k, b.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// KMS, for the rewrap.
    pub fn kms(&self) -> &Kms {
        &self.kms
    }
}

/// The error for a row of the key table without a version (NULL).
pub(super) fn null_version(relation: &str, column: &str, purpose: &str) -> Error {
    Error::Config(format!(
        "key table {relation}: a row of purpose {purpose:?} has no version ({column:?} is NULL), so rekey cannot tell \
         which values it opens: give it its version (the key id values carry) or delete the row if it holds no key in use"
    ))
}

/// The type of each mapped column; refuses a table that lacks one.
async fn column_types(
    client: &Client,
    relation: &str,
    c: &KeyColumns,
) -> Result<HashMap<String, String>, Error> {
    let rows = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&relation],
        )
        .await
        .ctx(|| format!("reading the columns of the key table {relation}"))?;
    let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let wanted = [
        ("version", &c.version),
        ("purpose", &c.purpose),
        ("algorithm", &c.algorithm),
        ("encrypted_key", &c.encrypted_key),
        ("status", &c.status),
        ("created_at", &c.created_at),
        ("expires_at", &c.expires_at),
    ];
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, name)| !types.contains_key(name.as_str()))
        .map(|(field, name)| format!("{field} = {name:?}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "the key table {relation} has no column for {}: name its columns in [keys.columns]",
            missing.join(", ")
        )));
    }
    for (field, name) in [("created_at", &c.created_at), ("expires_at", &c.expires_at)] {
        let ty = types.get(name).map_or("", String::as_str);
        if !(ty.starts_with("timestamp") || ty == "date") {
            return Err(Error::Config(format!(
                "the key table {relation}: column {name:?} ({field}) is {ty}, not a timestamp: rekey reads and writes key times \
                 as timestamp or timestamptz (not epoch numbers); name a timestamp column in [keys.columns] {field}, or convert \
                 this one (e.g. ALTER TABLE ... TYPE timestamptz USING to_timestamp({name:?} / 1000.0) for epoch milliseconds)"
            )));
        }
    }
    if types.get(&c.encrypted_key).map(String::as_str) != Some("bytea") {
        return Err(Error::Config(format!(
            "the key table {relation}: column {:?} must be bytea (the KMS ciphertext blob, as GenerateDataKey returns it)",
            c.encrypted_key
        )));
    }
    Ok(types)
}
