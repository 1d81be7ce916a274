-- A lane of another process that finds no range to claim asks the owner of
-- a leased range to split it: the owner's next checkpoint reads the flag
-- (and clears it), and its reader splits the rest of the range at the
-- half-way key, for any idle lane of any process to claim.
ALTER TABLE rekey.progress ADD COLUMN split_wanted boolean NOT NULL DEFAULT false;
