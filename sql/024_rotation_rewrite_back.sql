-- A rotation ended by `rekey secrets rollback` (not by an abort, which ends
-- only on a full verify) leaves the values already rewritten under the key
-- it turned away from until a run rewrites them back. Where values show
-- their key (versioned-gcm, tink) a count finds them; where they do not
-- (Fernet, raw AES-GCM) this says the rewrite back is still owed, until a
-- run of the job begun after the rollback finishes.
ALTER TABLE rekey.rotations ADD COLUMN rewrite_back_due boolean NOT NULL DEFAULT false;
