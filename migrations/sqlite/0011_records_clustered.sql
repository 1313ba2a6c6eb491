-- Records stored in record-id order (issue 12): a rewrap batch walks records by id, and in
-- rowid (insertion) order each of its updates dirtied a page of its own. The table is rebuilt
-- WITHOUT ROWID (the migration runner turns foreign-key enforcement off for the rebuild and
-- checks every reference before it commits, SQLite's documented procedure).
CREATE TABLE records_v11 (
    record_id      TEXT PRIMARY KEY NOT NULL,
    version        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- Set when the record is crypto-shredded; the row stays as a tombstone.
    deleted_at     INTEGER,
    wrapped_key    BLOB,
    kek_version    INTEGER,
    -- HMAC blind indexes; NULL once deleted, so a deleted person's document can be re-used.
    document_index BLOB,
    phone_index    BLOB,
    suspended_at   INTEGER,
    -- The birth date sealed under the record's state key; NULL once the record is deleted.
    age_gate       BLOB,
    policy_version TEXT,
    -- When the record must be crypto-shredded; NULL: no deadline.
    retain_until   INTEGER,
    index_version  INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
INSERT INTO records_v11 (record_id, version, created_at, updated_at, deleted_at, wrapped_key,
    kek_version, document_index, phone_index, suspended_at, age_gate, policy_version,
    retain_until, index_version)
SELECT record_id, version, created_at, updated_at, deleted_at, wrapped_key, kek_version,
    document_index, phone_index, suspended_at, age_gate, policy_version, retain_until,
    index_version
FROM records ORDER BY record_id;
DROP TABLE records;
ALTER TABLE records_v11 RENAME TO records;
CREATE UNIQUE INDEX records_document_index ON records (document_index);
CREATE INDEX records_phone_index ON records (phone_index);
-- Only records with a deadline: the sweep asks for `retain_until <= now`, which no NULL
-- matches, and every create without a deadline no longer writes a random leaf of this index.
CREATE INDEX records_retain_until ON records (retain_until)
    WHERE deleted_at IS NULL AND retain_until IS NOT NULL;
CREATE INDEX records_kek_version_id ON records (kek_version, record_id) WHERE deleted_at IS NULL;
CREATE INDEX records_index_version_id ON records (index_version, record_id)
    WHERE deleted_at IS NULL;
