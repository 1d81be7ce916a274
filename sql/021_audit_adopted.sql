-- When an event was recorded in rekey.audit from its line in the JSON file,
-- after a crash between the line and its commit, rather than by the
-- invocation that wrote it: `report --check` names every such event, since
-- a line appended to the file by anyone who may write it would be recorded
-- so too. Not part of the event's hash.
ALTER TABLE rekey.audit ADD COLUMN adopted_at timestamptz;
