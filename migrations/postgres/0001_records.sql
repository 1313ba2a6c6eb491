-- Identity records. No column holds plaintext: fields are AES-GCM ciphertexts under the
-- record's data key, which is stored only wrapped by a key-encryption key.
CREATE TABLE records (
    record_id      TEXT PRIMARY KEY NOT NULL,
    version        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    -- Set when the record is crypto-shredded; the row stays as a tombstone.
    deleted_at     BIGINT,
    wrapped_key    BYTEA,
    kek_version    BIGINT,
    -- HMAC blind indexes; NULL once deleted, so a deleted person's document can be re-used.
    document_index BYTEA,
    phone_index    BYTEA
);
CREATE UNIQUE INDEX records_document_index ON records (document_index);
CREATE INDEX records_phone_index ON records (phone_index);
CREATE INDEX records_kek_version ON records (kek_version);

CREATE TABLE record_fields (
    record_id  TEXT NOT NULL REFERENCES records (record_id),
    field      TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    PRIMARY KEY (record_id, field)
);

-- Idempotency keys of CreateRecord, per caller.
CREATE TABLE create_requests (
    caller      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    record_id   TEXT NOT NULL REFERENCES records (record_id),
    fingerprint BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (caller, request_id)
);
