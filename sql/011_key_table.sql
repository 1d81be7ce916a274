-- Keys of a `[keys] source = "table"` store: rekey's lifecycle state of each
-- data key in the application's key table (whose status column knows only
-- ACTIVE, INACTIVE and COMPROMISED: a staged key is INACTIVE there and
-- `pending` here), and the wrapped form of a retired key, whose row leaves
-- the application's table, until it is purged. Never an unwrapped key.
CREATE TABLE rekey.key_table_keys (
    key_table    text        NOT NULL,
    purpose      text        NOT NULL,
    version      bigint      NOT NULL,
    state        text        NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'retired')),
    changed_at   timestamptz NOT NULL DEFAULT now(),
    compromised  boolean     NOT NULL DEFAULT false,
    archived_key bytea,
    PRIMARY KEY (key_table, purpose, version)
);
