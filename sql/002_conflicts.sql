-- Rows the application changed between rekey's read and write: left untouched,
-- recorded here in the batch's own transaction, and re-read at the end of the run.
CREATE TABLE rekey.conflicts (
    job_id   bigint  NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target   int     NOT NULL,
    -- the row's key, binary format per key column
    pk       bytea[] NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, target, pk)
);
