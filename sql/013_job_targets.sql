-- The columns each job's targets rotate, recorded when the job starts, so
-- that retiring a key can tell a column the job file no longer lists (and
-- whose values a full verify would not read) from one that was dropped
-- from its table (whose values are gone). Runs before this table existed
-- are known by their tables only.
CREATE TABLE rekey.job_targets (
    job_id      bigint NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target      int    NOT NULL,
    table_name  text   NOT NULL,
    columns     text[] NOT NULL,
    PRIMARY KEY (job_id, target)
);
