//! Whether rekey can see and update every row of a target, checked before
//! any run, verify or retire touches it (README, Guarantees 8). What hides
//! rows (row-level security that applies to the role, a foreign table
//! whose rows another server's permissions filter, a key whose collation
//! makes distinct keys compare equal, a rule that replaces updates) is
//! refused with the fix; what may refuse or undo a write (a trigger, an
//! UPDATE policy) cannot be ruled out up front and is said: every write is
//! checked (after the AFTER triggers, deferred ones included, where the
//! table has any), and such values are reported as not rotated.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::db::quote_ident;
use crate::error::DbContext;
use crate::Error;

use super::Target;

/// Refuses a target whose rows rekey might not all see; warns of what may
/// refuse its writes.
pub async fn check(client: &Client, targets: &mut [Target]) -> Result<(), Error> {
    for t in targets {
        if let Some(caution) = row_security(client, t).await? {
            tracing::warn!("{caution}");
            t.cautions.push(caution);
        }
        foreign_children(client, t).await?;
        key_collations(client, t).await?;
        key_types(client, t).await?;
        update_rules(client, t).await?;
        for caution in write_triggers(client, t).await? {
            tracing::warn!("{caution}");
            t.cautions.push(caution);
        }
        (t.after_triggers, t.update_triggers) = update_triggers(client, t).await?;
    }
    Ok(())
}

/// What hides rows, checked again where a run counts what it left: row
/// security or a foreign child that came while it went on (a policy a DBA
/// created, a table attached) hides rows from the recount as from the run,
/// and the run would say done with them on their old key. Likewise a
/// table the name no longer reaches, and, where a target's values hide
/// their key (`keys_hidden`), an UPDATE trigger that came since the job
/// began: batches before it did not count what it wrote beside their rows.
/// `began`: each target's table as the job began on it, by target (its
/// oid, and whether an UPDATE trigger fired there; where the job did not
/// record them, this process's own start decides).
pub async fn still_sees_every_row(
    client: &Client,
    targets: &[Target],
    began: &HashMap<usize, (u32, Option<bool>)>,
    keys_hidden: bool,
) -> Result<(), Error> {
    for t in targets {
        let (oid, triggers) = began.get(&t.index).copied().unwrap_or((t.oid, None));
        let had_triggers = triggers.unwrap_or(t.update_triggers);
        let checked = async {
            same_table(client, t, oid).await?;
            row_security(client, t).await?;
            foreign_children(client, t).await?;
            if keys_hidden && !had_triggers && update_triggers(client, t).await?.1 {
                return Err(Error::Config(format!(
                    "{}: an UPDATE trigger was created or enabled on it since the job began; what such a trigger writes \
                     beside the rows rekey rewrites (a copy of the old value in a history table) was not counted by the \
                     batches before it, for values that do not show their key",
                    t.table
                )));
            }
            Ok(())
        }
        .await;
        if let Err(Error::Config(why)) = checked {
            return Err(Error::NotDone(format!(
                "{why}. This came while the job went on: what it wrote stands, but rows it did not see or count may be \
                 on an old key, so it does not say done. The job is given up: once fixed, `rekey run` starts it over \
                 (values already rotated stay rotated)"
            )));
        }
        checked?;
    }
    Ok(())
}

/// The table the name answers to is still the one the job was resolved
/// to: one renamed away and another made under its name while the run went
/// on (a DBA's swap) leaves the rows of the first that the run had not
/// reached on their old key, under a name out of the job's scope, while
/// the recount of the second finds nothing left.
async fn same_table(client: &Client, t: &Target, began: u32) -> Result<(), Error> {
    let Some(moved) = moved_from(client, t, began).await? else {
        return Ok(());
    };
    let now = match moved.name_taken {
        true => "another table now answers to that name",
        false => "no table answers to that name now",
    };
    let was = match moved.now {
        Some(w) => format!("the table the run began on is now {w}"),
        None => "the table the run began on was dropped".to_string(),
    };
    Err(Error::Config(format!(
        "{} was renamed or replaced: {now}, and {was}; its rows the run had not reached are on their old key, out of \
         the job's scope. Give the job's target the name of the table the applications read",
        t.table
    )))
}

/// Where the table a job began on went, when `t`'s name no longer reaches it.
pub struct Moved {
    /// Another table answers to the name now.
    pub name_taken: bool,
    /// The name of the table the job began on now; `None`: dropped.
    pub now: Option<String>,
}

/// Whether `t`'s name still reaches the table of oid `began` (the one the
/// job began on, not the one this process resolved: a caller may hold a
/// job across a reload of its table); where not, where that one went.
pub async fn moved_from(client: &Client, t: &Target, began: u32) -> Result<Option<Moved>, Error> {
    let row = client
        .query_one(
            "SELECT to_regclass($1)::oid, (SELECT n.nspname || '.' || c.relname FROM pg_class c
                                             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $2)",
            &[&t.qualified(), &began],
        )
        .await
        .ctx(|| format!("looking up table {} again", t.table))?;
    let now: Option<u32> = row.get(0);
    Ok((now != Some(began)).then(|| Moved {
        name_taken: now.is_some(),
        now: row.get(1),
    }))
}

/// A foreign table among a target's partitions or inheritance children:
/// rekey's statements reach its rows through the parent, but another
/// server answers for them, under its own row security and the user
/// mapping's permissions, which no local catalog shows. A row it hides
/// would keep its old key while a run, a verify and a retire all saw
/// nothing left.
async fn foreign_children(client: &Client, t: &Target) -> Result<(), Error> {
    let found: Vec<String> = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = $1::text::regclass
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT n.nspname || '.' || c.relname FROM tree JOIN pg_class c ON c.oid = tree.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'f' ORDER BY 1",
            &[&t.qualified()],
        )
        .await
        .ctx(|| format!("checking the partitions and children of {}", t.table))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{}: its partitions or inheritance children include foreign tables ({}), whose rows another server holds under its own \
         row-level security and the user mapping's permissions, which rekey cannot see: a value hidden there would stay on its \
         old key while rekey reported the rotation done. Rotate those tables with a job against the database that holds them, \
         and take them out of this table's tree for this one (ALTER TABLE ... NO INHERIT, or DETACH PARTITION)",
        t.table,
        found.join(", ")
    )))
}

/// Whether an enabled UPDATE trigger (row or statement level, a
/// constraint trigger included, deferred or not) on the target or a
/// partition or child fires on the columns rekey sets: first whether an
/// AFTER one does (it may change the row after the UPDATE returned it, so
/// the sink reads back what landed), then whether any does (it may write
/// other rows in the run's own transaction, so the sink counts what its
/// batches wrote beside their own rows).
async fn update_triggers(client: &Client, t: &Target) -> Result<(bool, bool), Error> {
    let set: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    // tgtype bits: 2 before, 16 update, 64 instead of; tgenabled: 'O' and
    // 'A' fire in rekey's sessions ('R' only under replication, 'D' never)
    client
        .query_one(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT coalesce(bool_or(tg.tgtype & 2 = 0), false), count(*) > 0
               FROM pg_trigger tg JOIN tree ON tree.relid = tg.tgrelid
              WHERE NOT tg.tgisinternal AND tg.tgenabled IN ('O', 'A')
                AND tg.tgtype & 64 = 0 AND tg.tgtype & 16 = 16
                AND (cardinality(tg.tgattr::int2[]) = 0
                     OR EXISTS (SELECT 1 FROM pg_attribute a
                                 WHERE a.attrelid = tg.tgrelid AND a.attnum = ANY (tg.tgattr::int2[])
                                   AND a.attname = ANY ($2::text[])))",
            &[&t.qualified(), &set],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .ctx(|| format!("checking the triggers of {}", t.table))
}

/// Row-level security that applies to this role must provably let it see
/// every row: a permissive SELECT policy `USING (true)` that applies to it,
/// and no restrictive one. Otherwise rows it cannot see would keep their old
/// key while a run, a verify and a retire all reported nothing left.
async fn row_security(client: &Client, t: &Target) -> Result<Option<String>, Error> {
    let what = || format!("checking row-level security on {}", t.table);
    let row = client
        .query_one(
            "SELECT row_security_active(c.oid), c.relforcerowsecurity, current_user::text,
                    coalesce(bool_or(p.polpermissive AND p.polcmd IN ('r', '*') AND q.expr = 'true'), false),
                    coalesce(bool_or(NOT p.polpermissive AND p.polcmd IN ('r', '*')), false),
                    string_agg(format('%s (%s, USING %s)', quote_ident(p.polname),
                                      CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END,
                                      CASE WHEN length(q.expr) > 60 THEN left(q.expr, 57) || '...'
                                           ELSE coalesce(q.expr, 'true') END), '; ' ORDER BY p.polname)
                        FILTER (WHERE p.polcmd IN ('r', '*')),
                    pg_has_role(current_user, c.relowner, 'USAGE')
               FROM pg_class c
               LEFT JOIN pg_policy p ON p.polrelid = c.oid
                    AND (0::oid = ANY (p.polroles)
                         OR EXISTS (SELECT 1 FROM unnest(p.polroles) r WHERE r <> 0 AND pg_has_role(current_user, r, 'USAGE')))
               LEFT JOIN LATERAL (SELECT pg_get_expr(p.polqual, p.polrelid) AS expr) q ON true
              WHERE c.oid = $1::text::regclass
              GROUP BY c.oid, c.relforcerowsecurity, c.relowner",
            &[&t.qualified()],
        )
        .await
        .ctx(what)?;
    let (active, forced, role, sees_all, restricted): (bool, bool, String, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let policies: Option<String> = row.get(5);
    let owner: bool = row.get(6);
    if !active {
        return Ok(None);
    }
    if sees_all && !restricted {
        return Ok(Some(format!(
            "row-level security applies to role {role} on {}; its policies let it see every row, but an UPDATE policy may refuse some writes: such values are reported as not rotated",
            t.table
        )));
    }
    // FORCE is why only for the owner: another role is under the policies anyway
    let why = if forced && owner {
        "the table has FORCE ROW LEVEL SECURITY, so its policies apply to its owner too"
    } else {
        "row-level security is enabled and the role is neither a superuser, nor BYPASSRLS, nor the table's owner"
    };
    // what hides rows: the policies that apply to it, or none (then it sees no row)
    let hiding = match policies {
        Some(p) => format!("its policies may hide rows from it: {p}"),
        None => "no policy lets it read a row, so it sees none".to_string(),
    };
    Err(Error::Config(format!(
        "{}: row-level security applies to role {role} ({why}), and {hiding}; a value rekey cannot see would stay \
         on its old key while rekey reported the rotation done. Connect as a role with BYPASSRLS (ALTER ROLE {role} BYPASSRLS) or as a superuser{}",
        t.table,
        if forced { "" } else { ", or as the table's owner" }
    )))
}

/// Keyset paging orders and compares keys: under a nondeterministic
/// collation distinct keys can compare equal, and rows would be skipped.
async fn key_collations(client: &Client, t: &Target) -> Result<(), Error> {
    let names: Vec<&str> = t.key.iter().map(|k| k.name.as_str()).collect();
    let found = client
        .query(
            "SELECT a.attname::text, co.collname::text
               FROM pg_attribute a JOIN pg_collation co ON co.oid = a.attcollation
              WHERE a.attrelid = $1::text::regclass AND a.attname = ANY ($2) AND NOT co.collisdeterministic",
            &[&t.qualified(), &names],
        )
        .await
        .ctx(|| format!("checking the collations of {}'s key", t.table))?;
    if let Some(r) = found.first() {
        let (column, collation): (String, String) = (r.get(0), r.get(1));
        return Err(Error::Config(format!(
            "key column {}.{column} uses the nondeterministic collation {collation:?}: rows whose keys compare equal under it would be \
             skipped by keyset paging and keep their old key. Name a key of deterministically collated columns as primary_key \
             (a numeric id, or a column with COLLATE \"C\")",
            t.table
        )));
    }
    Ok(())
}

/// Keyset paging compares keys and sends them back as parameters: a key of
/// a composite type cannot be sent back (PostgreSQL takes no anonymous
/// composite input), and a type with no btree ordering cannot be compared.
async fn key_types(client: &Client, t: &Target) -> Result<(), Error> {
    let names: Vec<&str> = t.key.iter().map(|k| k.name.as_str()).collect();
    // a domain (over domains) is compared as the type underneath
    let sql = format!(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                b.typtype IN ('c', 'p'),
                EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
                         WHERE am.amname = 'btree' AND oc.opcdefault
                           AND (oc.opcintype = b.oid
                                OR (oc.opcintype = 'anyarray'::regtype AND b.typcategory = 'A')
                                OR (oc.opcintype = 'anyenum'::regtype AND b.typtype = 'e')
                                OR (oc.opcintype = 'anyrange'::regtype AND b.typtype = 'r')))
           FROM pg_attribute a JOIN pg_type b ON b.oid = {}
          WHERE a.attrelid = $1::text::regclass AND a.attname = ANY ($2)",
        super::catalog::base_type_oid("a.atttypid")
    );
    let rows = client
        .query(&sql, &[&t.qualified(), &names])
        .await
        .ctx(|| format!("checking the types of {}'s key", t.table))?;
    for r in &rows {
        let (column, type_name, composite, ordered): (String, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let why = if composite {
            "a composite type, which PostgreSQL cannot take back as a parameter"
        } else if !ordered {
            "a type with no btree ordering"
        } else {
            continue;
        };
        return Err(Error::Config(format!(
            "key column {}.{column} is of type {type_name}, {why}, so rekey cannot page by it; name a key of scalar columns as primary_key \
             (a unique NOT NULL id, or the composite's fields stored in columns of their own)",
            t.table
        )));
    }
    Ok(())
}

/// An enabled `ON UPDATE` rule stops every write: a `DO INSTEAD` rule
/// replaces rekey's UPDATE with something else, and PostgreSQL refuses any
/// other on the data-modifying `WITH` the UPDATE is.
async fn update_rules(client: &Client, t: &Target) -> Result<(), Error> {
    let rules: Vec<String> = client
        .query(
            "SELECT format('%s (%s)', rulename, CASE WHEN is_instead THEN 'DO INSTEAD' ELSE 'DO ALSO' END)
               FROM pg_rewrite WHERE ev_class = $1::text::regclass AND ev_type = '2' AND ev_enabled IN ('O', 'A') ORDER BY rulename",
            &[&t.qualified()],
        )
        .await
        .ctx(|| format!("checking the rules of {}", t.table))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !rules.is_empty() {
        return Err(Error::Config(format!(
            "{} has ON UPDATE rules: {}; a DO INSTEAD rule replaces the updates rekey makes, and PostgreSQL refuses a DO ALSO rule \
             on them (each is a data-modifying statement in WITH), so rekey cannot rotate the values in place; \
             disable them for the rotation (ALTER TABLE {} DISABLE RULE name), or drop them",
            t.table,
            rules.join(", "),
            t.qualified()
        )));
    }
    Ok(())
}

/// Enabled row-level BEFORE UPDATE triggers, on the target and on its
/// partitions and inheritance children (rekey's UPDATE reaches their rows
/// too), that fire on the columns rekey sets, may refuse or change a
/// write: said up front, one line per table (returned); the sink checks every write.
async fn write_triggers(client: &Client, t: &Target) -> Result<Vec<String>, Error> {
    // every column is in the SET list, a hash-only target's ciphertexts too
    let set: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    // tgtype bits: 1 row-level, 2 before, 16 update; tgattr: the columns of
    // UPDATE OF, none for any; a partition's clone of a trigger above it
    // (tgparentid) is named where it was made
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT n.nspname || '.' || c.relname, string_agg(tg.tgname::text, ', ' ORDER BY tg.tgname)
               FROM pg_trigger tg JOIN tree ON tree.relid = tg.tgrelid
               JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D'
                AND NOT EXISTS (SELECT 1 FROM pg_trigger up JOIN tree ON tree.relid = up.tgrelid
                                 WHERE up.oid = tg.tgparentid)
                AND tg.tgtype & 1 = 1 AND tg.tgtype & 2 = 2 AND tg.tgtype & 16 = 16
                AND (cardinality(tg.tgattr::int2[]) = 0
                     OR EXISTS (SELECT 1 FROM pg_attribute a
                                 WHERE a.attrelid = tg.tgrelid AND a.attnum = ANY (tg.tgattr::int2[])
                                   AND a.attname = ANY ($2::text[])))
              GROUP BY 1 ORDER BY 1",
            &[&t.qualified(), &set],
        )
        .await
        .ctx(|| format!("checking the triggers of {}", t.table))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (table, triggers): (String, String) = (r.get(0), r.get(1));
            format!(
                "{table} has BEFORE UPDATE triggers ({triggers}): a trigger that refuses or changes rekey's write leaves the value on its old key; \
                 rekey checks every write and reports such values as not rotated"
            )
        })
        .collect())
}

/// Refuses, before a run writes anything, a target whose table this role
/// may not read or whose written columns it may not update: the run would
/// otherwise fail on its first batch with the server's "permission denied"
/// and a hint to run again, where a grant is the fix. Then
/// [`replica_identity`] and [`update_refused`], which waits for the table's
/// lock as long as the run's statements would (`lock_wait`).
pub async fn check_writable(
    client: &Client,
    t: &Target,
    lock_wait: Option<std::time::Duration>,
) -> Result<(), Error> {
    // every column is in the UPDATE's SET list, a hash-only target's ciphertexts too
    let written: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    let row = client
        .query_one(
            "SELECT current_user::text, has_table_privilege($1::text::regclass, 'SELECT'),
                    array(SELECT c FROM unnest($2::text[]) AS c
                           WHERE NOT has_column_privilege($1::text::regclass, c, 'UPDATE')),
                    has_any_column_privilege($1::text::regclass, 'SELECT')",
            &[&t.table.qualified(), &written],
        )
        .await
        .ctx(|| format!("checking this role's privileges on {}", t.table))?;
    let (role, select, no_update, some_columns): (String, bool, Vec<String>, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if select && no_update.is_empty() {
        replica_identity(client, t).await?;
        return update_refused(client, t, lock_wait).await;
    }
    let columns: Vec<String> = no_update.iter().map(|c| quote_ident(c)).collect();
    let table = &t.table;
    let cannot = match (select, columns.is_empty()) {
        (false, true) => format!("read {table}"),
        (false, false) => format!("read {table}, nor update {} in it", columns.join(", ")),
        (true, _) => format!("update {} in {table}", columns.join(", ")),
    };
    // column grants do not let it read the rows' system columns, nor whole rows
    let columns_only = if !select && some_columns {
        " (it may read some of its columns only: rekey reads whole rows and their system columns, which takes SELECT on the table)"
    } else {
        ""
    };
    let mut grant = Vec::new();
    if !select {
        grant.push("SELECT".to_string());
    }
    if !columns.is_empty() {
        grant.push(format!("UPDATE ({})", columns.join(", ")));
    }
    Err(Error::Config(format!(
        "role {role} may not {cannot}{columns_only}: the run would fail on its first batch. Nothing was written. \
         Grant it, then run again: GRANT {} ON {} TO {}",
        grant.join(", "),
        t.table.qualified(),
        quote_ident(&role)
    )))
}

/// Refuses a target (or a partition or child of it) that a publication
/// publishes updates of while it has no replica identity (`REPLICA IDENTITY
/// NOTHING`, or the default with no primary key): PostgreSQL refuses every
/// UPDATE of such a table, rekey's first batch too, which would leave a job
/// of several tables half done.
async fn replica_identity(client: &Client, t: &Target) -> Result<(), Error> {
    // a partition is published through its own name or an ancestor's
    // (pg_partition_ancestors lists none for a table outside a partition tree)
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid),
             published AS (
                 SELECT p.pubname, g.relid FROM pg_publication p, LATERAL pg_get_publication_tables(p.pubname) g
                  WHERE p.pubupdate)
             SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary),
                    string_agg(DISTINCT pb.pubname::text, ', ')
               FROM tree JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN published pb ON pb.relid = c.oid OR pb.relid IN (SELECT relid FROM pg_partition_ancestors(c.oid))
              WHERE c.relkind = 'r'
                AND CASE c.relreplident
                      WHEN 'f' THEN false
                      WHEN 'n' THEN true
                      WHEN 'd' THEN NOT EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary)
                      ELSE NOT EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisreplident)
                    END
              GROUP BY 1, 2, 3 ORDER BY 1",
            &[&t.qualified()],
        )
        .await
        .ctx(|| format!("checking the replica identity of {}", t.table))?;
    let Some(r) = rows.first() else {
        return Ok(());
    };
    let (table, identity, has_primary_key, publications): (String, String, bool, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    let has = match identity.as_str() {
        "n" => "REPLICA IDENTITY NOTHING",
        "d" => "the default replica identity and no primary key",
        _ => "a replica identity index that is gone",
    };
    // the primary key where there is one and no identity was chosen, else an index or every column
    let identity = if identity == "n" && has_primary_key {
        "DEFAULT (its primary key)"
    } else {
        "USING INDEX <a unique index>, or REPLICA IDENTITY FULL"
    };
    let fix = format!("ALTER TABLE {table} REPLICA IDENTITY {identity}");
    let more = match rows.len() {
        1 => String::new(),
        n => format!(" (and {} more of its partitions or children)", n - 1),
    };
    Err(Error::Config(format!(
        "{table}{more} has {has} and publication {publications} publishes its updates: PostgreSQL refuses every UPDATE \
         of it, rekey's too, so the run would fail on its first batch. Nothing was written. Give it a replica identity \
         for the rotation ({fix}), or leave it out of the publication, then run again"
    )))
}

/// Refuses a target (or a partition or child of it) that PostgreSQL would
/// refuse every UPDATE of for what it is, not for a row: a publication's
/// row filter on columns outside the replica identity, or a column list
/// that leaves some out (PostgreSQL 15 and later), among others. Asked of
/// PostgreSQL itself: an `EXPLAIN` of an UPDATE of the target's columns
/// starts the executor, which checks each table it would update (every
/// partition and child: a TID condition is one the planner cannot prove
/// false, where PostgreSQL 17 proves `ctid IS NULL` false and prunes them
/// all) without reading a row or firing a trigger. It takes the lock each
/// batch takes, waiting for it as long as a batch would (`lock_wait`, the
/// run's `--lock-timeout`), not the preflight session's shorter wait: a
/// table locked longer is refused naming who holds it
/// ([`super::table_locks`]).
async fn update_refused(
    client: &Client,
    t: &Target,
    lock_wait: Option<std::time::Duration>,
) -> Result<(), Error> {
    let set: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            let c = quote_ident(&c.name);
            format!("{c} = {c}")
        })
        .collect();
    let explain = format!(
        "EXPLAIN UPDATE {} SET {} WHERE ctid = '(0,0)'::tid",
        t.qualified(),
        set.join(", ")
    );
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            crate::db::session::ms(lock_wait)
        ))
        .await
        .ctx(|| format!("setting the lock wait for checking {}", t.table))?;
    let probed = client.batch_execute(&explain).await;
    // back to the session's own wait (its startup options) for what follows;
    // where the probe failed, its error is the one to tell
    let reset = client.batch_execute("RESET lock_timeout").await;
    let Err(e) = probed else {
        return reset.ctx(|| format!("resetting the lock wait after checking {}", t.table));
    };
    // the probe takes the lock each batch takes: another session's stronger one made it wait
    if let Some(waited) =
        lock_wait.filter(|_| e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
    {
        let stalled = super::table_locks::Stalled::Update(waited);
        return Err(super::table_locks::refusal(client, t, &stalled, e).await);
    }
    // the codes of CheckCmdReplicaIdentity's refusals: a column list or row
    // filter the identity does not cover, no identity at all
    let Some(db) = e.as_db_error().filter(|d| {
        [
            tokio_postgres::error::SqlState::INVALID_COLUMN_REFERENCE,
            tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        ]
        .contains(d.code())
    }) else {
        return Err(e)
            .ctx(|| format!("checking that PostgreSQL lets this role update {}", t.table));
    };
    Err(Error::Config(format!(
        "PostgreSQL refuses every UPDATE of {}, rekey's too: {}{}, so the run would fail on its first batch. Nothing \
         was written. Where a publication publishes its updates, its row filter (WHERE) may use only the replica \
         identity's columns, and its column list must include them: change the publication (ALTER PUBLICATION ... \
         SET TABLE), give the table a replica identity that covers them (REPLICA IDENTITY FULL, for a row filter), \
         or leave the table out of the publication for the rotation; then run again",
        t.table,
        db.message(),
        db.detail().map_or_else(String::new, |d| format!(" ({})", d.trim_end_matches('.')))
    )))
}

/// Enabled UPDATE triggers on the targets, and on their partitions and
/// inheritance children (rekey's UPDATE reaches their rows too), that fire
/// on the columns rekey sets and can read the old row (row-level, or given
/// an OLD TABLE), whose function reads it (for a function whose source
/// rekey cannot read, one written in C say, any): one that copies the old
/// values elsewhere (a history or audit table) keeps a copy under the old
/// key of every row a run rewrites, out of the job's targets, which retiring
/// the key leaves unreadable. Warnings for the operator, one per trigger;
/// the run is not refused (a trigger that only logs, or copies new values,
/// is common).
pub async fn old_row_copies(client: &Client, targets: &[Target]) -> Result<Vec<String>, Error> {
    let mut warnings = Vec::new();
    for t in targets {
        // every column is in the SET list, a hash-only target's ciphertexts too
        let set: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        // tgtype bits: 1 row-level, 16 update; tgattr: the columns of UPDATE OF, none for any;
        // a partition's clone of a trigger above it (tgparentid) is named where it was made
        let rows = client
            .query(
                "WITH RECURSIVE tree(relid) AS (
                     SELECT $1::text::regclass::oid
                     UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
                 SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname || '.' || c.relname,
                        tg.tgname::text, p.oid::regprocedure::text
                   FROM pg_trigger tg JOIN tree ON tree.relid = tg.tgrelid
                   JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_language l ON l.oid = p.prolang
                  WHERE NOT tg.tgisinternal AND tg.tgenabled <> 'D'
                    AND NOT EXISTS (SELECT 1 FROM pg_trigger up JOIN tree ON tree.relid = up.tgrelid
                                     WHERE up.oid = tg.tgparentid)
                    AND tg.tgtype & 16 = 16 AND (tg.tgtype & 1 = 1 OR tg.tgoldtable IS NOT NULL)
                    AND (cardinality(tg.tgattr::int2[]) = 0
                         OR EXISTS (SELECT 1 FROM pg_attribute a
                                     WHERE a.attrelid = tg.tgrelid AND a.attnum = ANY (tg.tgattr::int2[])
                                       AND a.attname = ANY ($2::text[])))
                    AND (tg.tgoldtable IS NOT NULL OR l.lanname NOT IN ('plpgsql', 'sql')
                         OR p.prosrc ~* $3)
                  ORDER BY 2, 3",
                &[&t.qualified(), &set, &r"\mold\M"],
            )
            .await
            .ctx(|| format!("checking the triggers of {}", t.table))?;
        for r in rows {
            let (qualified, table, name, function): (String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            warnings.push(format!(
                "{table}: trigger {name} (function {function}) fires on each row rekey rewrites and reads the old row: \
                 if it copies the old values elsewhere (a history or audit table), those copies stay under the old key, \
                 and retiring that key leaves them unreadable. If it does, list that table as a target of this job too \
                 (a run finds copies made behind it and says so; the next run rotates them), or, where the copies need \
                 not stay readable, disable the trigger for the rotation (ALTER TABLE {qualified} DISABLE TRIGGER {trigger}, \
                 then ENABLE TRIGGER)",
                trigger = quote_ident(&name),
            ));
        }
    }
    Ok(warnings)
}
