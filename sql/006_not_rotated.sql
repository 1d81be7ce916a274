-- Values rekey could not rotate because the database refused or undid its
-- write (a trigger, a row-level security policy, a rule) on the first try
-- and again when re-read. They are still under their old key; `run` says how
-- many and exits non-zero, and `status` reports them.
CREATE TABLE rekey.not_rotated (
    job_id       bigint  NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target       int     NOT NULL,
    table_name   text    NOT NULL,
    column_name  text    NOT NULL,
    -- the row's key: binary format per key column, and as text for people
    pk           bytea[] NOT NULL,
    pk_text      text,
    -- write_refused: the UPDATE left the row alone though it still held what
    --   was read (a trigger returned NULL, a policy or a rule);
    -- write_undone: the UPDATE ran but the stored value is not what rekey
    --   wrote (a BEFORE trigger changed it);
    -- row_locked: another transaction held the row locked through every try
    reason       text    NOT NULL CHECK (reason IN ('write_refused', 'write_undone', 'row_locked')),
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, target, column_name, pk)
);

ALTER TABLE rekey.progress ADD COLUMN values_not_rotated bigint NOT NULL DEFAULT 0;
