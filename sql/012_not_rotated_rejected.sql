-- A write the database refuses with an error for one row (a trigger's
-- exception, a constraint) no longer stops the run: the row is found by
-- halving its batch, re-read at the end of the run and, refused again,
-- recorded as not rotated with the database's own words.
ALTER TABLE rekey.not_rotated DROP CONSTRAINT not_rotated_reason_check;
ALTER TABLE rekey.not_rotated ADD CONSTRAINT not_rotated_reason_check
    CHECK (reason IN ('write_refused', 'write_undone', 'row_locked', 'write_rejected'));
-- write_rejected: the error's SQLSTATE and message, e.g.
--   P0001: archived patients are read-only
ALTER TABLE rekey.not_rotated ADD COLUMN detail text;
