//! SQL text for a target, in one place so it is easy to check that nothing
//! from input is spliced into SQL (README, Guarantees): every identifier
//! comes from the catalog and goes through [`quote_ident`]; every value
//! (keys, prefixes, limits) is a bind parameter or a COPY field.

use crate::db::quote_ident;
use crate::job::{Aad, Encoding, Target};

/// Which key bounds a keyset query has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bounds {
    /// Rows strictly after a lower key.
    pub lower: bool,
    /// Rows up to and including an upper key.
    pub upper: bool,
}

/// The key range conditions of a keyset query (`(key) > $1..` after a lower
/// key, `(key) <= $n..` up to an upper one), and the next free parameter number.
fn bound_conditions(target: &Target, bounds: Bounds) -> (Vec<String>, usize) {
    let keys = target.key_list("");
    let mut conds = Vec::new();
    let mut next = 1;
    if bounds.lower {
        conds.push(format!("({keys}) > {}", key_params(target, next)));
        next += target.key.len();
    }
    if bounds.upper {
        conds.push(format!("({keys}) <= {}", key_params(target, next)));
        next += target.key.len();
    }
    (conds, next)
}

/// Parameter placeholders `($a, $a+1, ...)` for one key, starting at `first`.
fn key_params(target: &Target, first: usize) -> String {
    let list = (0..target.key.len())
        .map(|i| format!("${}", first + i))
        .collect::<Vec<_>>()
        .join(", ");
    format!("({list})")
}

/// SQL for the first `len` bytes of the ciphertext in column `col`, or NULL
/// where the column is NULL or empty (an empty value holds no ciphertext:
/// like NULL, it is under no key, and left as it is, as applications that
/// write one for "no value" skip it). For base64 text, only the leading characters are
/// decoded, and text that is not base64 gives an empty prefix (so the value is
/// read, and quarantined) instead of an error that would stop the query.
/// No literal holds a backslash: with `standard_conforming_strings` off,
/// `'\x'::bytea` is the byte `x` (0x78), the prefix of key version 120.
/// Text is tested bytewise (`octet_length`, `COLLATE "C"`): under a
/// nondeterministic collation a regular expression is an error, and text
/// of ignorable characters equals `''`.
pub fn prefix_expr(target: &Target, col: usize, alias: &str, len: usize) -> String {
    let c = format!("{alias}{}", quote_ident(&target.columns[col].name));
    match target.columns[col].write {
        Encoding::Raw if target.columns[col].type_name == "bytea" => {
            format!("NULLIF(substring({c} from 1 for {len}), ''::bytea)")
        }
        Encoding::Raw => {
            format!("NULLIF(substring(convert_to({c}, 'UTF8') from 1 for {len}), ''::bytea)")
        }
        Encoding::Base64 => {
            let chars = len.div_ceil(3) * 4;
            format!(
                "CASE WHEN {c} IS NULL OR octet_length({c}) = 0 THEN NULL \
                 WHEN substring({c} from 1 for {chars}) COLLATE \"C\" ~ '^[A-Za-z0-9+/]{{{chars}}}$' \
                 THEN substring(decode(substring({c} from 1 for {chars}), 'base64') from 1 for {len}) \
                 ELSE ''::bytea END"
            )
        }
    }
}

/// `<prefix of column col> <op> $param`, where the column's values show
/// their key ([`Target::stale_prefix`]).
pub fn prefix_compared(
    target: &Target,
    col: usize,
    alias: &str,
    op: &str,
    param: usize,
) -> Option<String> {
    let prefix = target.stale_prefix(col)?;
    Some(format!(
        "{} {op} ${param}",
        prefix_expr(target, col, alias, prefix.len())
    ))
}

/// `(c1 stale OR c2 stale ...)`: rows holding at least one value not on the
/// target key. Prefixes are parameters `$first..`, one per column that has one;
/// returns the SQL and the columns whose prefix must be bound, in order.
pub fn stale_filter(target: &Target, alias: &str, first: usize) -> (String, Vec<usize>) {
    let mut terms = Vec::new();
    let mut bound = Vec::new();
    for (i, col) in target.columns.iter().enumerate() {
        match prefix_compared(target, i, alias, "<>", first + bound.len()) {
            Some(term) => {
                terms.push(term);
                bound.push(i);
            }
            None => terms.push(holds_a_value(alias, &col.name)),
        }
    }
    (format!("({})", terms.join(" OR ")), bound)
}

/// `column` (after `alias`) holds a value: not NULL nor empty ([`prefix_expr`]).
fn holds_a_value(alias: &str, column: &str) -> String {
    format!("octet_length({alias}{}) > 0", quote_ident(column))
}

/// Rows holding a value labelled with the target key, for the preflight's
/// check that the target key given opens them: among the newest `$n+1` rows
/// by key (where an application writing under the key puts its rows) and in
/// a `$n+2` percent sample of the pages (where a run before this one put
/// them), at most `$n+3` of each, once each, as a page. Parameters: the target
/// prefixes of the returned columns, in order, then those three. `None`
/// where no column's values show their key (a migration, Fernet, a search
/// hash).
pub fn select_labelled(target: &Target) -> Option<(String, Vec<usize>)> {
    let mut terms = Vec::new();
    let mut bound = Vec::new();
    for i in 0..target.columns.len() {
        if let Some(term) = prefix_compared(target, i, "", "=", bound.len() + 1) {
            terms.push(term);
            bound.push(i);
        }
    }
    if bound.is_empty() {
        return None;
    }
    let labelled = terms.join(" OR ");
    let n = bound.len();
    let (newest, percent, limit) = (n + 1, n + 2, n + 3);
    let shown = format!(
        "{}, {}{}",
        target.key_list(""),
        column_list(target),
        aad_select(target)
    );
    let descending = target
        .key
        .iter()
        .map(|c| format!("{} DESC", quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = target_filter(target);
    let table = target.qualified();
    let sql = format!(
        "(SELECT * FROM (SELECT {shown} FROM {table} WHERE true{filter} ORDER BY {descending} LIMIT ${newest}) AS newest \
          WHERE {labelled} LIMIT ${limit}) \
         UNION \
         (SELECT {shown} FROM {table} TABLESAMPLE SYSTEM (${percent}) WHERE ({labelled}){filter} LIMIT ${limit})"
    );
    Some((sql, bound))
}

/// One keyset page: key columns then encrypted columns, in key order.
/// Parameters: lower key (if any), upper key (if any), stale prefixes (if
/// `only_stale`, unless the target [`Target::reads_labelled`]), then the
/// row limit.
pub fn select_page(target: &Target, bounds: Bounds, only_stale: bool) -> (String, Vec<usize>) {
    let keys = target.key_list("");
    let cols = column_list(target);
    let (mut conds, mut next) = bound_conditions(target, bounds);
    let mut prefixed = Vec::new();
    if only_stale && target.reads_labelled {
        // every value, those on the target key too, but no row without one
        let held: Vec<String> = target
            .columns
            .iter()
            .map(|c| holds_a_value("", &c.name))
            .collect();
        conds.push(format!("({})", held.join(" OR ")));
    } else if only_stale {
        let (filter, cols) = stale_filter(target, "", next);
        next += cols.len();
        conds.push(filter);
        prefixed = cols;
    }
    if let Some(f) = &target.filter {
        conds.push(format!("({f})"));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT {keys}, {cols}{} FROM {}{filter} ORDER BY {keys} LIMIT ${next}",
        aad_select(target),
        target.qualified()
    );
    (sql, prefixed)
}

/// The key half-way through a range's next `$cap` rows (after a key, if
/// `bounds.lower`; up to its upper bound, if `bounds.upper`), with how many
/// rows those are: where a lane splits the rest of its range for an idle
/// one.
pub fn split_point(target: &Target, bounds: Bounds) -> String {
    let keys = target.key_list("");
    let (conds, next) = bound_conditions(target, bounds);
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    // counted on the key's index, then skipped to half-way on it: no sort, no window
    format!(
        "SELECT {}, c.\"rekey n\"
           FROM (SELECT count(*) AS \"rekey n\" FROM (SELECT 1 FROM {table}{filter} ORDER BY {keys} LIMIT ${next}) s) c,
                LATERAL (SELECT {keys} FROM {table}{filter} ORDER BY {keys} OFFSET greatest(c.\"rekey n\" / 2 - 1, 0) LIMIT 1) m",
        target.key_list("m."),
        table = target.qualified(),
    )
}

/// `, "col"::text` when the target binds a column as associated data.
pub fn aad_select(target: &Target) -> String {
    match &target.aad {
        Aad::Column(c) => format!(", {}::text AS \"rekey aad\"", quote_ident(c)),
        Aad::None | Aad::Constant(_) => String::new(),
    }
}

/// `WHERE` conditions every read of a target carries (its operator filter).
pub fn target_filter(target: &Target) -> String {
    target
        .filter
        .as_ref()
        .map(|f| format!(" AND ({f})"))
        .unwrap_or_default()
}

/// The encrypted columns, quoted, comma-separated.
pub(super) fn column_list(target: &Target) -> String {
    target
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `f(i, quoted name)` for every encrypted column, joined by `sep`.
fn per_column(target: &Target, sep: &str, f: impl Fn(usize, &str) -> String) -> String {
    target
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| f(i, &quote_ident(&c.name)))
        .collect::<Vec<_>>()
        .join(sep)
}

/// `t."k1" = s.k0 AND ...`: a table row joined to its stage row.
fn stage_join(target: &Target) -> String {
    target
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} = s.k{i}", quote_ident(&k.name)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Name of the per-connection temp stage table for a target.
pub fn stage_table(target: &Target) -> String {
    format!("pg_temp.rekey_stage_{}", target.index)
}

/// Creates the stage table: key columns `k0..`, then `o<i>`/`n<i>` (old and
/// new value) per encrypted column, with the target's own column types.
pub fn create_stage(target: &Target) -> String {
    let keys = target
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS k{i}", quote_ident(&k.name)));
    // as the type underneath a domain: a cell left alone is staged as NULL,
    // which a NOT NULL domain refuses; the column's checks hold on the update
    let vals = target.columns.iter().enumerate().flat_map(|(i, c)| {
        [
            format!("{}::{} AS o{i}", quote_ident(&c.name), c.type_name),
            format!("{}::{} AS n{i}", quote_ident(&c.name), c.type_name),
        ]
    });
    format!(
        "CREATE TEMP TABLE IF NOT EXISTS rekey_stage_{} ON COMMIT DELETE ROWS AS SELECT {} FROM {} WITH NO DATA",
        target.index,
        keys.chain(vals).collect::<Vec<_>>().join(", "),
        target.qualified()
    )
}

/// Binary COPY into the stage table.
pub fn copy_stage(target: &Target) -> String {
    format!("COPY {} FROM STDIN (FORMAT binary)", stage_table(target))
}

/// The compare-and-swap write: a row is updated only where every encrypted
/// column still holds the value that was read. It answers one row: rows
/// updated, and rows whose every value is now what rekey wrote (in
/// RETURNING, `t` is the row as stored, after any BEFORE trigger). With
/// `bounded`, `$1..` and `$n+1..` bound the key range of the batch so the
/// join reads only that stretch of the index.
pub fn update_from_stage(target: &Target, bounded: bool) -> String {
    let n = target.key.len();
    let sets = per_column(target, ", ", |i, q| {
        format!("{q} = COALESCE(s.n{i}, t.{q})")
    });
    let keys = target.key_list("t.");
    let range = if bounded {
        format!(
            " AND ({keys}) >= {} AND ({keys}) <= {}",
            key_params(target, 1),
            key_params(target, n + 1)
        )
    } else {
        String::new()
    };
    format!(
        "WITH u AS (UPDATE {} AS t SET {sets} FROM {} AS s WHERE {}{range} AND {} RETURNING {} AS landed) \
         SELECT count(*)::bigint, count(*) FILTER (WHERE landed)::bigint FROM u",
        target.qualified(),
        stage_table(target),
        stage_join(target),
        as_read(target),
        per_column(target, " AND ", landed),
    )
}

/// Whether the row still holds every value as it was read.
fn as_read(target: &Target) -> String {
    per_column(target, " AND ", |i, q| {
        format!("t.{q} IS NOT DISTINCT FROM s.o{i}")
    })
}

/// Whether column `i` of the row holds what rekey wrote (or, where rekey
/// wrote nothing, what was read).
fn landed(i: usize, q: &str) -> String {
    format!("t.{q} IS NOT DISTINCT FROM coalesce(s.n{i}, s.o{i})")
}

/// After [`update_from_stage`], where each staged row stands, for rows
/// still in the table: its key, whether this transaction updated it
/// (`age(xmin) = 0`), whether it still holds what was read, and per
/// encrypted column whether it holds what rekey wrote. Staged rows missing
/// from the answer were deleted meanwhile.
pub fn staged_outcome(target: &Target) -> String {
    let keys = (0..target.key.len())
        .map(|i| format!("s.k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT {keys}, age(t.xmin) = 0, {}, {} FROM {} AS s JOIN {} AS t ON {}",
        as_read(target),
        per_column(target, ", ", landed),
        stage_table(target),
        target.qualified(),
        stage_join(target)
    )
}

/// After [`update_from_stage`] and the AFTER triggers, how many staged
/// rows hold exactly what rekey wrote in every encrypted column: where it
/// is every staged row, no row's outcome needs fetching.
pub fn landed_count(target: &Target) -> String {
    format!(
        "SELECT count(*)::bigint FROM {} AS s JOIN {} AS t ON {} WHERE {}",
        stage_table(target),
        target.qualified(),
        stage_join(target),
        per_column(target, " AND ", landed)
    )
}

/// The rows this transaction has inserted or updated so far in the tables
/// named by `$1` (text[]: the job's targets) and their partitions and
/// children, by the server's own counts of the transaction: read before
/// and after a batch's UPDATE, what it wrote beside the rows it swapped (a
/// trigger's copies) shows as a difference greater than its own count.
pub const ROWS_WRITTEN_IN_TARGETS: &str = "WITH RECURSIVE tree(relid) AS (
         SELECT t::regclass::oid FROM unnest($1::text[]) AS t
         UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
     SELECT coalesce(sum(pg_stat_get_xact_tuples_inserted(relid) + pg_stat_get_xact_tuples_updated(relid)), 0)::bigint
       FROM tree";

/// Records one undecryptable value. Parameters: job id, table label, column,
/// key as bytea[], error kind, the key columns, then the value as read.
/// Only while encrypted column `col` still holds the value read (the last
/// parameter): a value changed since (perhaps fixed by the application) is
/// re-read instead, and answers no row.
pub fn insert_quarantine(target: &Target, col: usize) -> String {
    let n = target.key.len();
    format!(
        "INSERT INTO rekey.quarantine (job_id, table_name, column_name, pk, pk_text, error_kind) \
         SELECT $1, $2, $3, $4, ROW({keys})::text, $5 FROM {table} AS t WHERE ({keys}) = {params} AND t.{column} IS NOT DISTINCT FROM ${value} \
         ON CONFLICT (job_id, table_name, column_name, pk) DO UPDATE SET error_kind = EXCLUDED.error_kind, seen_at = now() \
         RETURNING pk_text",
        keys = target.key_list("t."),
        table = target.qualified(),
        params = key_params(target, 6),
        column = quote_ident(&target.columns[col].name),
        value = 6 + n,
    )
}

/// Records one value that was not rotated. Parameters: job id, target,
/// table label, column, key as bytea[], reason, the database's words (or
/// NULL), then the key columns for the text lookup.
pub fn insert_not_rotated(target: &Target) -> String {
    format!(
        "INSERT INTO rekey.not_rotated (job_id, target, table_name, column_name, pk, pk_text, reason, detail) \
         SELECT $1, $2, $3, $4, $5, (SELECT ROW({keys})::text FROM {table} AS t WHERE ({keys}) = {params}), $6, $7 \
         ON CONFLICT (job_id, target, column_name, pk) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail, seen_at = now()",
        keys = target.key_list("t."),
        table = target.qualified(),
        params = key_params(target, 8),
    )
}

/// A random sample of rows in the layout of [`select_page`], followed by the
/// row's key as text. Parameters: sample percent (real), row limit.
pub fn select_sample(target: &Target) -> String {
    let keys = target.key_list("");
    let cols = column_list(target);
    let filter = target
        .filter
        .as_ref()
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    format!(
        "SELECT {keys}, {cols}{}, ROW({keys})::text AS \"rekey key\" FROM {} TABLESAMPLE BERNOULLI ($1){filter} LIMIT $2",
        aad_select(target),
        target.qualified()
    )
}

/// One row by its key, in the layout of [`select_page`] (conflict re-reads).
pub fn select_by_key(target: &Target) -> String {
    let keys = target.key_list("");
    let cols = column_list(target);
    format!(
        "SELECT {keys}, {cols}{} FROM {} WHERE ({keys}) = {}{}",
        aad_select(target),
        target.qualified(),
        key_params(target, 1),
        target_filter(target)
    )
}

/// The key of one row as text, for reports (`(42)`, `(7,abc)`).
pub fn key_text(target: &Target) -> String {
    let keys = target.key_list("t.");
    format!(
        "SELECT ROW({keys})::text FROM {} AS t WHERE ({keys}) = {}",
        target.qualified(),
        key_params(target, 1)
    )
}
