-- The audit trail as evidence: every event names the keys it concerns, the
-- incident and the operator's notes as fields, and is hash-chained to the
-- event before it in the same chain (one chain per job name), so an edited,
-- deleted or reordered event is found by `rekey report --check`.
--
-- `notes` now holds the operator's notes (`--notes`, the healthprep
-- template's field); what rekey itself says about the event moves to
-- `detail`. Rows written before this migration have no hash: they stay as
-- they are, outside the chain.
ALTER TABLE rekey.audit
    ADD COLUMN detail       text,
    ADD COLUMN incident_id  text,
    -- key ids, never material
    ADD COLUMN old_key      bigint,
    ADD COLUMN new_key      bigint,
    ADD COLUMN rotation_id  bigint,
    -- the chain (the job's name), the event's place in it, where the JSON
    -- line went (host:path), and the SHA-256 links
    ADD COLUMN chain        text,
    ADD COLUMN seq          bigint,
    ADD COLUMN written_to   text,
    ADD COLUMN prev_hash    text,
    ADD COLUMN hash         text;
-- one event per place in a chain: two writers can never fork it
CREATE UNIQUE INDEX audit_chain_seq ON rekey.audit (chain, seq) WHERE chain IS NOT NULL;
-- a hashed event is evidence: deleting its job must not rewrite it
ALTER TABLE rekey.audit DROP CONSTRAINT IF EXISTS audit_job_id_fkey;
