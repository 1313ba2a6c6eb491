-- The audit trail. Events hold record ids, caller and purpose names, field names and levels:
-- never identity values. Each running vault appends to its own chain (chain_id); within a
-- chain, seq is contiguous and every event stores its predecessor's hash and its own.
CREATE TABLE audit_chains (
    chain_id   TEXT PRIMARY KEY NOT NULL,
    started_at INTEGER NOT NULL,
    head_seq   INTEGER NOT NULL,
    head_hash  BLOB NOT NULL
);

CREATE TABLE audit_events (
    chain_id      TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    event_id      TEXT NOT NULL UNIQUE,
    occurred_at   INTEGER NOT NULL,
    caller        TEXT NOT NULL,
    peer          TEXT,
    rpc           TEXT NOT NULL,
    -- The one record the event is about, when there is one: the per-person index.
    record_id     TEXT,
    record_ids    TEXT NOT NULL,
    purpose       TEXT,
    justification TEXT,
    released      TEXT NOT NULL,
    -- 1 when any field left the vault in plaintext.
    plaintext     INTEGER NOT NULL,
    outcome       TEXT NOT NULL,
    reason        TEXT,
    request_id    TEXT,
    trace_id      TEXT,
    prev_hash     BLOB NOT NULL,
    hash          BLOB NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX audit_events_time ON audit_events (occurred_at, event_id);
CREATE INDEX audit_events_record_time ON audit_events (record_id, occurred_at);
CREATE INDEX audit_events_caller_time ON audit_events (caller, occurred_at);
-- "Whose data did this caller receive in plaintext between T1 and T2?" answers from here.
CREATE INDEX audit_events_plaintext_releases ON audit_events (caller, occurred_at)
    WHERE plaintext = 1;

-- Signed statements of every chain's head, so a cut-off tail is detectable.
CREATE TABLE audit_checkpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    heads      TEXT NOT NULL,
    signature  BLOB NOT NULL
);

-- Where expired events were removed: the chain continues from (up_to_seq, hash).
CREATE TABLE audit_expiry_markers (
    chain_id   TEXT PRIMARY KEY NOT NULL,
    up_to_seq  INTEGER NOT NULL,
    hash       BLOB NOT NULL,
    expired_at INTEGER NOT NULL,
    signature  BLOB NOT NULL
);
