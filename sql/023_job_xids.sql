-- The transactions a job's batches committed in, and the transaction that
-- began the job: a row whose xmin is newer than the job's start and is none
-- of the job's own was written by someone else while the job ran. Where a
-- value does not show its key (raw AES-GCM, Fernet), that is how `run`
-- finds values an application wrote under an old key behind it without
-- decrypting the whole table again. 32-bit xids, as xmin shows them.
ALTER TABLE rekey.jobs ADD COLUMN started_xid bigint;
CREATE TABLE rekey.job_xids (
    job_id bigint NOT NULL REFERENCES rekey.jobs ON DELETE CASCADE,
    xid    bigint NOT NULL
);
CREATE INDEX job_xids_job ON rekey.job_xids (job_id);
