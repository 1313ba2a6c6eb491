-- The audit trail shaped for appending (issue 12). A group commit used to dirty about one
-- random leaf per event (the per-person index keyed by record id) plus the right edges of five
-- B-trees; now an event is written to two B-trees that only grow at their right edge, and the
-- per-person lookup reads blocks of sealed, sorted entries (see ARCHITECTURE.md, "The audit
-- trail"). Events, hashes and chains are unchanged: only where rows sit and which indexes exist.

-- Every chain id that has events, a head or an expiry marker gets a small number, so that an
-- event's place (chain, seq) is one integer: `pos = chain_no * 2^40 + seq`. `sealed_seq` is
-- how far the chain's events are sealed into `audit_event_subjects`.
CREATE TABLE audit_chain_numbers (
    chain_no   INTEGER PRIMARY KEY,
    chain_id   TEXT NOT NULL UNIQUE,
    sealed_seq INTEGER NOT NULL DEFAULT 0
);
INSERT INTO audit_chain_numbers (chain_id)
SELECT chain_id FROM (
    SELECT chain_id, started_at AS t FROM audit_chains
    UNION ALL SELECT chain_id, min(occurred_at) FROM audit_events GROUP BY chain_id
    UNION ALL SELECT chain_id, expired_at FROM audit_expiry_markers
) GROUP BY chain_id ORDER BY min(t), chain_id;

-- The events, keyed by their place: appending to a chain appends to this B-tree (the newest
-- chain has the highest number), and (chain, seq) stays unique through the key.
CREATE TABLE audit_events_v10 (
    pos           INTEGER PRIMARY KEY,
    chain_id      TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    event_id      TEXT NOT NULL,
    occurred_at   INTEGER NOT NULL,
    caller        TEXT NOT NULL,
    peer          TEXT,
    rpc           TEXT NOT NULL,
    -- The one record the event is about, when there is one.
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
    hash          BLOB NOT NULL
);
INSERT INTO audit_events_v10 (pos, chain_id, seq, event_id, occurred_at, caller, peer, rpc,
    record_id, record_ids, purpose, justification, released, plaintext, outcome, reason,
    request_id, trace_id, prev_hash, hash)
SELECT n.chain_no * 1099511627776 + e.seq, e.chain_id, e.seq, e.event_id, e.occurred_at,
    e.caller, e.peer, e.rpc, e.record_id, e.record_ids, e.purpose, e.justification, e.released,
    e.plaintext, e.outcome, e.reason, e.request_id, e.trace_id, e.prev_hash, e.hash
FROM audit_events e JOIN audit_chain_numbers n ON n.chain_id = e.chain_id;
DROP TABLE audit_events;
ALTER TABLE audit_events_v10 RENAME TO audit_events;

-- An event inserted without its place (by hand: the vault always gives it) is moved to it, its
-- chain numbered if new, so chain walks by position see it and verification judges it. A row
-- left elsewhere anyway (this trigger dropped first) fails verification (`chain_ids`).
CREATE TRIGGER audit_events_placed AFTER INSERT ON audit_events
WHEN NEW.pos IS NOT (SELECT n.chain_no * 1099511627776 + NEW.seq
                     FROM audit_chain_numbers n WHERE n.chain_id = NEW.chain_id)
BEGIN
    INSERT OR IGNORE INTO audit_chain_numbers (chain_id) VALUES (NEW.chain_id);
    UPDATE audit_events SET pos = (SELECT n.chain_no * 1099511627776 + NEW.seq
                                   FROM audit_chain_numbers n WHERE n.chain_id = NEW.chain_id)
    WHERE pos = NEW.pos;
END;

-- The one time index: newest-first listings walk it, and it keeps what their cursor names,
-- (occurred_at, event_id), unique, so the same event cannot be appended twice. Its keys only
-- grow. The per-caller index and the partial index of plaintext releases are gone (each cost
-- page writes at every group commit): "whose data did this caller receive in plaintext
-- between T1 and T2" reads the range of this index.
CREATE UNIQUE INDEX audit_events_time ON audit_events (occurred_at, event_id);

-- The per-person index, in sealed blocks. A block is a range of one chain's events,
-- (block = pos of its first event, last_pos]; once sealed, one row per (record named, event)
-- is written for the whole range, sorted, so the index grows at its right edge. Events after
-- a chain's `sealed_seq` are found by scanning them (a few thousand at most). Entries are
-- derived from each event's hashed `record_ids`: an index, not evidence.
CREATE TABLE audit_blocks (
    block    INTEGER PRIMARY KEY,
    last_pos INTEGER NOT NULL
);
CREATE TABLE audit_event_subjects (
    block     INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    pos       INTEGER NOT NULL,
    PRIMARY KEY (block, record_id, pos)
) WITHOUT ROWID;

-- Seal what is there: one block per chain holding all its events.
INSERT INTO audit_blocks (block, last_pos)
SELECT min(pos), max(pos) FROM audit_events GROUP BY pos / 1099511627776;
INSERT OR IGNORE INTO audit_event_subjects (block, record_id, pos)
SELECT b.block, s.record_id, s.pos FROM (
    SELECT e.record_id AS record_id, e.pos AS pos FROM audit_events e WHERE e.record_id IS NOT NULL
    UNION ALL
    SELECT j.value, e.pos FROM audit_events e, json_each(e.record_ids) j WHERE e.record_id IS NULL
) s JOIN audit_blocks b ON s.pos BETWEEN b.block AND b.last_pos
ORDER BY b.block, s.record_id, s.pos;
UPDATE audit_chain_numbers SET sealed_seq = coalesce(
    (SELECT max(e.seq) FROM audit_events e
     WHERE e.pos >= audit_chain_numbers.chain_no * 1099511627776
       AND e.pos < (audit_chain_numbers.chain_no + 1) * 1099511627776), 0);

-- Superseded by audit_event_subjects.
DROP TABLE audit_event_records;
