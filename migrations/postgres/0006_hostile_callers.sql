-- Every record an audit event names, for events that name more than one (an event about a
-- single record keeps it in audit_events.record_id): a lookup with several matches, a
-- consent naming a minor and a guardian. Each person's listing reads both. Derived from
-- the hashed record_ids of the event, so it is an index, not evidence.
CREATE TABLE audit_event_records (
    record_id   TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    chain_id    TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (record_id, occurred_at, chain_id, seq)
);
-- Retention removes a chain's prefix from here too.
CREATE INDEX audit_event_records_chain ON audit_event_records (chain_id, seq);
INSERT INTO audit_event_records (record_id, occurred_at, chain_id, seq)
SELECT DISTINCT j.value, e.occurred_at, e.chain_id, e.seq
FROM audit_events e CROSS JOIN LATERAL json_array_elements_text(e.record_ids::json) AS j(value)
WHERE json_array_length(e.record_ids::json) > 1;

-- Idempotency keys expire, and lose their fingerprint (an HMAC of the identity) when their
-- record is deleted: the row then only says that the request id was used, so a retry is
-- answered RECORD_DELETED until the key expires.
ALTER TABLE create_requests ALTER COLUMN fingerprint DROP NOT NULL;
UPDATE create_requests SET fingerprint = NULL
WHERE record_id IN (SELECT record_id FROM records WHERE deleted_at IS NOT NULL);
CREATE INDEX create_requests_created_at ON create_requests (created_at);
