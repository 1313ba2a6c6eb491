-- Every record an audit event names, for events that name more than one (an event about a
-- single record keeps it in audit_events.record_id): a lookup with several matches, a
-- consent naming a minor and a guardian. Each person's listing reads both. Derived from
-- the hashed record_ids of the event, so it is an index, not evidence.
CREATE TABLE audit_event_records (
    record_id   TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    chain_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (record_id, occurred_at, chain_id, seq)
) WITHOUT ROWID;
-- Retention removes a chain's prefix from here too.
CREATE INDEX audit_event_records_chain ON audit_event_records (chain_id, seq);
INSERT OR IGNORE INTO audit_event_records (record_id, occurred_at, chain_id, seq)
SELECT j.value, e.occurred_at, e.chain_id, e.seq
FROM audit_events e, json_each(e.record_ids) j
WHERE json_array_length(e.record_ids) > 1;

-- Idempotency keys expire, and lose their fingerprint (an HMAC of the identity) when their
-- record is deleted: the row then only says that the request id was used, so a retry is
-- answered RECORD_DELETED until the key expires. SQLite cannot drop a NOT NULL in place.
CREATE TABLE create_requests_v6 (
    caller      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    record_id   TEXT NOT NULL REFERENCES records (record_id),
    fingerprint BLOB,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (caller, request_id)
) WITHOUT ROWID;
INSERT INTO create_requests_v6 (caller, request_id, record_id, fingerprint, created_at)
SELECT c.caller, c.request_id, c.record_id,
       CASE WHEN r.deleted_at IS NULL THEN c.fingerprint END, c.created_at
FROM create_requests c JOIN records r ON r.record_id = c.record_id;
DROP TABLE create_requests;
ALTER TABLE create_requests_v6 RENAME TO create_requests;
CREATE INDEX create_requests_created_at ON create_requests (created_at);
