-- The key stores each job's targets were read and written under
-- (`KeysSpec::store_label`, as `file:keyring.json`), so that retiring a key
-- of one store does not refuse for a table the job rotated under another
-- store's keys (a target with `keys` of its own, since moved to a job of
-- its own). NULL for runs before this column: their stores are known by
-- the key fingerprints `rekey.jobs.keys` recorded alone.
ALTER TABLE rekey.job_targets ADD COLUMN key_stores text[];
