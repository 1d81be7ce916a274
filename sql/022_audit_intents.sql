-- An audit event rekey is about to write: committed, under the chain's
-- lock, before the event's JSON line is written, and deleted in the
-- transaction that inserts the event into rekey.audit. A process stopped
-- between the line and that commit leaves both: the next command records
-- the line's event (rekey.audit.adopted_at) only when an intent here names
-- it (chain, place, hash), so a line appended to the file by anyone else,
-- however well it is chained, is never taken for one rekey wrote. An
-- intent whose line is not in the file is an event that never happened.
CREATE TABLE rekey.audit_intents (
    chain      text NOT NULL,
    seq        bigint NOT NULL,
    hash       text NOT NULL,
    -- host:path of the JSON file the line goes to
    written_to text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain, seq, hash)
);
