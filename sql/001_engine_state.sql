-- rekey's own state, in schema "rekey" of the target database.
-- Applied once by the engine (see src/checkpoint.rs); never edit a released file,
-- add the next numbered one instead.

CREATE TABLE rekey.jobs (
    job_id       bigserial PRIMARY KEY,
    name         text        NOT NULL,
    spec_hash    text        NOT NULL,
    -- key ids and fingerprints, never key material
    keys         jsonb       NOT NULL,
    state        text        NOT NULL CHECK (state IN ('running', 'done', 'abandoned')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- totals of the finished run (rows, values, conflicts, seconds)
    summary      jsonb
);
-- at most one unfinished job per name: that is the one `run` resumes
CREATE UNIQUE INDEX jobs_one_running_per_name ON rekey.jobs (name) WHERE state = 'running';

CREATE TABLE rekey.progress (
    job_id           bigint  NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    target           int     NOT NULL,
    range_no         int     NOT NULL,
    table_name       text    NOT NULL,
    -- key bounds in PostgreSQL's binary format, one element per key column;
    -- NULL lower = from the start, NULL upper = to the end
    lower_key        bytea[],
    upper_key        bytea[],
    -- last key committed; resume continues after it
    last_key         bytea[],
    done             boolean NOT NULL DEFAULT false,
    rows_scanned     bigint  NOT NULL DEFAULT 0,
    rows_rewritten   bigint  NOT NULL DEFAULT 0,
    values_rewritten bigint  NOT NULL DEFAULT 0,
    values_skipped   bigint  NOT NULL DEFAULT 0,
    values_failed    bigint  NOT NULL DEFAULT 0,
    conflicts        bigint  NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, target, range_no)
);

CREATE TABLE rekey.quarantine (
    job_id       bigint NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    table_name   text   NOT NULL,
    column_name  text   NOT NULL,
    -- the row's key: binary format per key column, and as text for people
    pk           bytea[] NOT NULL,
    pk_text      text,
    error_kind   text   NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, table_name, column_name, pk)
);

CREATE TABLE rekey.audit (
    audit_id            bigserial PRIMARY KEY,
    event_type          text NOT NULL,
    timestamp           timestamptz NOT NULL DEFAULT now(),
    secret_id           text,
    operator            text,
    reason              text,
    verification_status text,
    affected_records    bigint,
    notes               text,
    job_id              bigint REFERENCES rekey.jobs ON DELETE SET NULL
);
