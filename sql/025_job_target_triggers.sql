-- Whether an UPDATE trigger fired on each target's rekey writes when the
-- job began. Where values do not show their key, a job's batches count the
-- rows such a trigger writes beside theirs only where one was there when
-- the process began; a trigger created later, even while no process ran
-- (between two windows of a job), keeps the job from saying done. NULL:
-- a job begun before this was recorded (each process's own start decides).
ALTER TABLE rekey.job_targets ADD COLUMN update_triggers boolean;
