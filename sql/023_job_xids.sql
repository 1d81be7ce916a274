-- The transactions a job's batches committed in, and where the job began:
-- a row whose xmin is newer than the job's start and is none of the job's
-- own transactions was written by someone else while the job ran. Where a
-- value does not show its key (raw AES-GCM, Fernet), that is how `run`
-- finds values an application wrote under an old key behind it without
-- decrypting the whole table again. `started_xid`: the oldest transaction
-- still running when the job began (the snapshot's xmin, 64-bit), so a
-- transaction begun before the job and committed during it counts too;
-- `xid`: 32-bit, as xmin shows it.
ALTER TABLE rekey.jobs ADD COLUMN started_xid bigint;
CREATE TABLE rekey.job_xids (
    job_id bigint NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    xid    bigint NOT NULL
);
CREATE INDEX job_xids_job_xid ON rekey.job_xids (job_id, xid);
