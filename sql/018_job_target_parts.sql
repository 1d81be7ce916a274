-- The partitions and inheritance children (at any depth) of each job's
-- targets when the job started, with the columns the job rotated in them:
-- a partition detached since (or a child no longer inheriting) is a table
-- of its own that the job file does not list, and whose values a retire's
-- full verify would not read. Kept by oid and column number as
-- rekey.job_targets keeps its tables. Runs before this table existed are
-- known by their listed tables only.
CREATE TABLE rekey.job_target_parts (
    job_id      bigint   NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target      int      NOT NULL,
    -- schema.table, as rekey.job_targets names its table
    table_name  text     NOT NULL,
    table_oid   oid      NOT NULL,
    columns     text[]   NOT NULL,
    attnums     int2[]   NOT NULL,
    PRIMARY KEY (job_id, target, table_oid)
);
