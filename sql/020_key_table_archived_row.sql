-- A retired key-table row's own columns besides its key (algorithm, creation
-- and expiry time, as text in the column's type), kept with its archived
-- wrapped key so a restore puts the row back as the application made it,
-- not as a key created now. Never key material.
ALTER TABLE rekey.key_table_keys ADD COLUMN archived_row jsonb;
