-- Several rekey processes share one job: each unfinished range is leased to
-- one process at a time (owner, its home session's pid, and an expiry that
-- heartbeats push forward). A range whose owner's session is gone, or whose
-- lease ran out, can be taken over. Checkpoints are written only by the owner.
-- Every claim bumps lease_gen, and a checkpoint must name the generation it
-- was leased under: a lane still writing under an older lease cannot commit.
ALTER TABLE rekey.progress
    ADD COLUMN owner       text,
    ADD COLUMN owner_pid   int,
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN lease_gen   bigint NOT NULL DEFAULT 0;

-- Live control of running jobs: `rekey pause|resume|stop --job`.
ALTER TABLE rekey.jobs
    ADD COLUMN control text NOT NULL DEFAULT 'run' CHECK (control IN ('run', 'pause', 'stop'));

-- Values encrypted by rekey under each key with a random 96-bit nonce
-- (by fingerprint, never material): one key must not pass 2^32 of them.
CREATE TABLE rekey.key_usage (
    fingerprint  text PRIMARY KEY,
    key_label    text   NOT NULL,
    encryptions  bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
