-- The nonce counter, sharded: each writer session counts into a row of its
-- own (shard = its backend pid modulo 64), so batches of different lanes and
-- processes no longer wait on one row's lock until they commit. A key's
-- count is the sum of its shards (existing counts become shard 0).
ALTER TABLE rekey.key_usage ADD COLUMN shard int NOT NULL DEFAULT 0;
ALTER TABLE rekey.key_usage DROP CONSTRAINT key_usage_pkey;
ALTER TABLE rekey.key_usage ADD PRIMARY KEY (fingerprint, shard);
