-- Which database an audit event was recorded in. One job file (and its JSON
-- lines audit log) may serve several databases, staging and production:
-- each keeps a chain of its own, and `rekey report --check` checks the
-- file's lines of the database it is pointed at, counting the others'.
-- A random id made with the schema, not the server's system identifier:
-- databases of one cluster share that. A copy of the database (a backup
-- restored, a snapshot) keeps the id, as it keeps the chain.
CREATE TABLE rekey.identity (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    database_id  text    NOT NULL
);
INSERT INTO rekey.identity (database_id)
    VALUES (md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text || current_database()));
ALTER TABLE rekey.audit ADD COLUMN database_id text;
