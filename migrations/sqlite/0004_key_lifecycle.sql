-- Key lifecycle: the state of every key version lives here, so that every vault instance
-- sharing this database agrees on which version wraps new keys. Key material never does:
-- it stays in the keyring file or the hardware module (see src/keys/mod.rs).
CREATE TABLE key_versions (
    key_kind     TEXT NOT NULL,
    version      INTEGER NOT NULL,
    -- ACTIVE, DECRYPT_ONLY, RETIRED or DESTROYED.
    state        TEXT NOT NULL,
    -- Which provider holds the material ('local' keyring file or 'hsm').
    provider     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    retired_at   INTEGER,
    destroyed_at INTEGER,
    PRIMARY KEY (key_kind, version)
) WITHOUT ROWID;
-- Exactly one active version per kind, enforced by the database.
CREATE UNIQUE INDEX key_versions_one_active ON key_versions (key_kind) WHERE state = 'ACTIVE';

-- One row per kind; key administration (rotate, retire, destroy) locks it so that those
-- operations, and the keyring-file edits they make, happen one at a time across instances.
CREATE TABLE key_admin_locks (
    key_kind TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
INSERT INTO key_admin_locks (key_kind) VALUES ('kek');

-- Rewrap jobs and their progress. The authoritative progress is each record's kek_version;
-- this table carries counters for reporting and a heartbeat.
CREATE TABLE rewrap_jobs (
    job_id         TEXT PRIMARY KEY NOT NULL,
    target_version INTEGER NOT NULL,
    state          TEXT NOT NULL,
    started_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    rewrapped      INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Retention: when a record must be crypto-shredded. NULL: no deadline.
ALTER TABLE records ADD COLUMN retain_until INTEGER;
CREATE INDEX records_retain_until ON records (retain_until) WHERE deleted_at IS NULL;
CREATE INDEX records_kek_version_id ON records (kek_version, record_id) WHERE deleted_at IS NULL;
DROP INDEX records_kek_version;
