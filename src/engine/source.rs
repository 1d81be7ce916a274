//! Source: keyset pages of a target's rows, never OFFSET.
//!
//! Each page is `WHERE (key) > (last) AND (key) <= (upper) AND <stale>
//! ORDER BY key LIMIT n`, so each page costs the same however deep into the
//! table it is, and a re-run reads only rows still holding a value on an old
//! key (where the format lets SQL see the key). Statements are prepared once
//! per connection and shape.

use std::collections::HashMap;

use futures_util::TryStreamExt;

use tokio_postgres::{Client, Statement};

use crate::db::raw::{self, RawParam};
use crate::db::session::Timeouts;
use crate::db::{Database, KeyBytes, Page};
use crate::engine::sql::{self, Bounds};
use crate::error::DbContext;
use crate::job::Target;
use crate::Error;

/// Reads pages over one connection.
pub struct Source {
    /// The reading connection (autocommit: no transaction is held between pages).
    client: Client,
    /// Where to reconnect, and the session's limits.
    origin: Option<(Database, Timeouts)>,
    /// Prepared page statements, by target and bounds shape.
    statements: HashMap<(usize, Bounds), (Statement, Vec<usize>)>,
    /// Whether to read only rows with a stale value (false for `verify --full`).
    only_stale: bool,
    /// Bytes of values per row in the last page of each target, to size the next.
    row_bytes: HashMap<usize, usize>,
}

impl Source {
    /// Wraps a connection.
    pub fn new(client: Client, only_stale: bool) -> Self {
        Source {
            client,
            origin: None,
            statements: HashMap::new(),
            only_stale,
            row_bytes: HashMap::new(),
        }
    }

    /// Opens a reading connection with `timeouts` (only `statement_timeout` applies to reads).
    pub async fn connect(
        db: &Database,
        only_stale: bool,
        timeouts: Timeouts,
    ) -> Result<Self, Error> {
        let client = Self::open(db, timeouts).await?;
        Ok(Source {
            client,
            origin: Some((db.clone(), timeouts)),
            statements: HashMap::new(),
            only_stale,
            row_bytes: HashMap::new(),
        })
    }

    /// Replaces a broken connection with a new one.
    pub async fn reconnect(&mut self) -> Result<(), Error> {
        let Some((db, timeouts)) = &self.origin else {
            return Err(Error::Runtime("this reader cannot reconnect".into()));
        };
        self.client = Self::open(db, *timeouts).await?;
        self.statements.clear();
        Ok(())
    }

    /// Reopens the connection where it was closed while this reader sat
    /// idle (a server's `idle_session_timeout`, a proxy); returns whether
    /// it did.
    pub async fn reopen_if_closed(&mut self) -> Result<bool, Error> {
        if !self.client.is_closed() {
            return Ok(false);
        }
        tracing::debug!("a reading session was closed while idle; reopening it");
        self.reconnect().await?;
        Ok(true)
    }

    async fn open(db: &Database, timeouts: Timeouts) -> Result<Client, Error> {
        let client = db.connect().await?;
        client
            .batch_execute(&timeouts.session_sql())
            .await
            .ctx(|| "configuring a reader connection".into())?;
        // a reader commits the claims of ranges (and the asks for splits):
        // a claim acknowledged and then lost to a server crash would hand
        // the same lease generation out twice; flushed locally at commit
        // (what a crash needs), any stronger setting of the server kept
        client
            .batch_execute(
                "SELECT set_config('synchronous_commit', 'local', false)
                  WHERE current_setting('synchronous_commit') = 'off'",
            )
            .await
            .ctx(|| "configuring a reader connection".into())?;
        Ok(client)
    }

    /// The connection, for the occasional lookup beside the pages.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The connection, for a short transaction beside the pages.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The next page of at most `limit` rows after `after`, up to `upper`.
    pub async fn page(
        &mut self,
        target: &Target,
        after: Option<&KeyBytes>,
        upper: Option<&KeyBytes>,
        limit: usize,
    ) -> Result<Page, Error> {
        let bounds = Bounds {
            lower: after.is_some(),
            upper: upper.is_some(),
        };
        let key = (target.index, bounds);
        if !self.statements.contains_key(&key) {
            let (text, prefixed) = sql::select_page(target, bounds, self.only_stale);
            let stmt = self
                .client
                .prepare(&text)
                .await
                .ctx(|| format!("preparing the read of {}", target.table))?;
            self.statements.insert(key, (stmt, prefixed));
        }
        let (stmt, prefixed) = &self.statements[&key];
        let prefixes: Vec<Vec<u8>> = prefixed
            .iter()
            .filter_map(|&c| target.stale_prefix(c))
            .collect();
        let rows = limit;
        let limit = limit as i64;
        let bounds = bound_params(after, upper);
        let mut params = raw::params(&bounds);
        params.extend(raw::params(&prefixes));
        params.push(&limit);
        let what = || format!("reading a page of {}", target.table);
        // copied row by row into a compact page with places for all its rows,
        // and room for their values as the last page's rows took: the
        // driver's rows cost about 160 bytes each beside their values
        let stream = self
            .client
            .query_raw(stmt, params.iter().copied())
            .await
            .ctx(what)?;
        futures_util::pin_mut!(stream);
        // an eighth more than the last page's rows took, for rows a little larger
        let per_row = self.row_bytes.get(&target.index).map_or(0, |b| b + b / 8);
        let room = rows.saturating_mul(per_row);
        let mut page = Page::with_room(rows, stmt.columns().len(), room);
        while let Some(row) = stream.try_next().await.ctx(what)? {
            page.push(&row)
                .map_err(|e| Error::Runtime(format!("{}: {e}", what())))?;
        }
        if let Some(per_row) = page.value_bytes().checked_div(page.len()) {
            self.row_bytes.insert(target.index, per_row);
        }
        // a range's last page is short, and values larger than the last
        // page's grew their buffer by doubling
        page.shrink_if_roomy();
        Ok(page)
    }
}

impl Source {
    /// The rows with these keys (those that still exist), for conflict re-reads.
    pub async fn rows_by_keys(
        &mut self,
        target: &Target,
        keys: &[KeyBytes],
    ) -> Result<Page, Error> {
        let what = || format!("re-reading conflicted rows of {}", target.table);
        let stmt = self
            .client
            .prepare(&sql::select_by_key(target))
            .await
            .ctx(what)?;
        let mut page = Page::with_capacity(keys.len(), stmt.columns().len());
        for key in keys {
            let key: Vec<RawParam> = key.iter().map(|p| RawParam(p)).collect();
            let found = self
                .client
                .query_opt(&stmt, &raw::params(&key))
                .await
                .ctx(what)?;
            if let Some(row) = found {
                page.push(&row)
                    .map_err(|e| Error::Runtime(format!("{}: {e}", what())))?;
            }
        }
        Ok(page)
    }
}

impl Source {
    /// Where to split what is left of a range after `after` (up to `upper`):
    /// the key half-way through its next `cap` rows, and how many rows those
    /// are; `None` when nothing is left.
    pub async fn split_point(
        &mut self,
        target: &Target,
        after: Option<&KeyBytes>,
        upper: Option<&KeyBytes>,
        cap: i64,
    ) -> Result<Option<(KeyBytes, i64)>, Error> {
        let shape = Bounds {
            lower: after.is_some(),
            upper: upper.is_some(),
        };
        let text = sql::split_point(target, shape);
        let bounds = bound_params(after, upper);
        let mut params = raw::params(&bounds);
        params.push(&cap);
        let row = self
            .client
            .query_opt(&text, &params)
            .await
            .ctx(|| format!("finding where to split a range of {}", target.table))?;
        Ok(row.map(|r| (raw::key_of(&r, target.key.len()), r.get(target.key.len()))))
    }
}

/// The key bounds of a keyset query as parameters, in [`sql::Bounds`] order.
fn bound_params<'a>(after: Option<&'a KeyBytes>, upper: Option<&'a KeyBytes>) -> Vec<RawParam<'a>> {
    after
        .into_iter()
        .chain(upper)
        .flat_map(|k| k.iter().map(|p| RawParam(p)))
        .collect()
}
