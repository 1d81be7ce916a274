-- The staged key's fingerprint (never its material), checked at every later
-- step so a store changed by hand between invocations is noticed.
ALTER TABLE rekey.rotations ADD COLUMN new_fingerprint text;
