-- Rows set aside because the database refused their write (a trigger's
-- exception, a constraint) are told from rows set aside for a lock or a
-- change, so the limit on refused rows holds for the whole job: a run
-- resumed after that limit stopped it sets no more aside.
ALTER TABLE rekey.conflicts ADD COLUMN refused boolean NOT NULL DEFAULT false;
