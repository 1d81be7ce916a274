-- The columns each job's targets rotate, recorded when the job starts, so
-- that retiring a key can tell a column the job file no longer lists (and
-- whose values a full verify would not read) from one that was dropped
-- from its table (whose values are gone). Kept by name and by the table's
-- oid and the column's number both: a renamed table or column is still
-- found by number, a table dropped and restored from a backup by name.
-- Runs before this table existed are known by their tables only.
CREATE TABLE rekey.job_targets (
    job_id      bigint   NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target      int      NOT NULL,
    -- schema.table as rekey.progress records it
    table_name  text     NOT NULL,
    table_oid   oid      NOT NULL,
    columns     text[]   NOT NULL,
    -- pg_attribute.attnum of each of columns, in the same order
    attnums     int2[]   NOT NULL,
    PRIMARY KEY (job_id, target)
);
