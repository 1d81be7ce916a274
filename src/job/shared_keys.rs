//! A run pages a table by its key, and writes each row back by it: the key
//! must be unique over every row the table's reads return. A partitioned
//! table's key is (PostgreSQL enforces it across its partitions); an
//! inheritance parent's is not: its children hold rows of their own under
//! keys of their own, and a key that repeats across them (a history child
//! holding copies of the parent's rows, say) makes pages skip rows at their
//! edges and one write reach two rows. Such a table is refused before any
//! write.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::job::Target;
use crate::Error;

/// Refuses `t` when its table has inheritance children (not partitions)
/// and a key of its rows repeats across them. Reads the whole hierarchy
/// once, only where there are such children.
pub async fn refuse_keys_shared_with_children(client: &Client, t: &Target) -> Result<(), Error> {
    let children: Vec<String> = client
        .query(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT i.inhrelid FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                  WHERE i.inhparent = $1::text::regclass AND p.relkind = 'r'
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
             SELECT format('%I.%I', n.nspname, c.relname) FROM tree
               JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY 1",
            &[&t.qualified()],
        )
        .await
        .ctx(|| format!("listing the inheritance children of {}", t.table))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if children.is_empty() {
        return Ok(());
    }
    let key = t.key_list("");
    let names = t
        .key
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let repeated: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT 1 FROM {} GROUP BY {key} HAVING count(*) > 1) AS repeated",
                t.qualified()
            ),
            &[],
        )
        .await
        .ctx(|| format!("looking for keys of {} repeated in its inheritance children", t.table))?
        .get(0);
    if repeated == 0 {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} has inheritance children ({}), and {repeated} of its keys ({names}) are held by more than one row across \
         them: its key is unique in each table, not across them, and rekey pages the table by it and writes each row \
         back by it. Nothing was written. Give the rows keys unique across the tables (ids from one sequence); or, \
         where the applications can do without reading the children through {} meanwhile, take them out of it for the \
         rotation (ALTER TABLE child NO INHERIT {}, and INHERIT again after) and list each table as a target of its own",
        t.table,
        children.join(", "),
        t.table,
        t.table,
    )))
}
