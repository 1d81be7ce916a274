-- `rekey rotate`: where each rotation stands, so a second invocation continues
-- from the step the first one reached.
CREATE TABLE rekey.rotations (
    rotation_id  bigserial PRIMARY KEY,
    job_name     text   NOT NULL,
    step         text   NOT NULL CHECK (step IN ('staged', 'ran', 'verified', 'promoted', 'retired', 'rolled_back')),
    reason       text   NOT NULL,
    operator     text   NOT NULL,
    secret_id    text   NOT NULL,
    -- key ids, never material
    old_key      bigint,
    new_key      bigint NOT NULL,
    grace_s      bigint NOT NULL,
    job_id       bigint REFERENCES rekey.jobs ON DELETE SET NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    promoted_at  timestamptz,
    finished_at  timestamptz
);
CREATE UNIQUE INDEX rotations_one_open_per_job ON rekey.rotations (job_name) WHERE step NOT IN ('retired', 'rolled_back');
