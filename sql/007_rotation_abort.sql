-- `rekey rotate --abort`: a rotation cancelled before promotion rewrites its
-- values back to the old key before it ends as rolled back; `aborting` is the
-- step it holds meanwhile, so a killed abort resumes.
ALTER TABLE rekey.rotations DROP CONSTRAINT rotations_step_check;
ALTER TABLE rekey.rotations ADD CONSTRAINT rotations_step_check
    CHECK (step IN ('staged', 'ran', 'verified', 'promoted', 'retired', 'rolled_back', 'aborting'));

-- The job file a job was started from (absolute path), so that two job files
-- that share a default name (their file name) are told apart.
ALTER TABLE rekey.jobs ADD COLUMN job_file text;
