-- The incident and the operator's notes a rotation was started with, so the
-- events of its later steps, run by invocations that do not repeat them,
-- still carry them (with the rotation's reason).
ALTER TABLE rekey.rotations ADD COLUMN incident_id text, ADD COLUMN notes text;
