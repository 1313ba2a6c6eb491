-- Account state beside the identity: suspension, the age gate the login path needs, and the
-- privacy-policy version the person accepted.
ALTER TABLE records ADD COLUMN suspended_at INTEGER;
-- The birth date, sealed under the vault's state key (not the record key), so CheckAccount
-- can tell minors without unwrapping a record key. NULL once the record is deleted.
ALTER TABLE records ADD COLUMN age_gate BLOB;
ALTER TABLE records ADD COLUMN policy_version TEXT;

-- Actions taken on an account (clause 4(1)): kept after the record is deleted.
CREATE TABLE account_events (
    event_id    TEXT PRIMARY KEY NOT NULL,
    record_id   TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT,
    -- Staff's free text, sealed under the record's data key: shredded with the record.
    note        BLOB,
    ticket      TEXT,
    consent_id  TEXT
);
CREATE INDEX account_events_record ON account_events (record_id, occurred_at, event_id);

CREATE TABLE guardian_consents (
    consent_id         TEXT PRIMARY KEY NOT NULL,
    record_id          TEXT NOT NULL REFERENCES records (record_id),
    guardian_record_id TEXT,
    -- A guardian without a record of their own: their identity, sealed under the minor's key.
    guardian_sealed    BLOB,
    relationship       TEXT NOT NULL,
    evidence_ref       TEXT NOT NULL,
    policy_version     TEXT NOT NULL,
    granted_at         INTEGER NOT NULL,
    granted_by         TEXT NOT NULL,
    revoked_at         INTEGER,
    revoked_by         TEXT
);
CREATE INDEX guardian_consents_active ON guardian_consents (record_id) WHERE revoked_at IS NULL;
