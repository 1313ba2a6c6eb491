//! SQL both backends run unchanged. sqlx binds `$N` placeholders on SQLite as well as on
//! PostgreSQL, so only statements whose dialects really differ live in the backend modules.

pub const SELECT_CREATE_REQUEST: &str =
    "SELECT record_id, fingerprint FROM create_requests WHERE caller = $1 AND request_id = $2";

pub const INSERT_CREATE_REQUEST: &str = "INSERT INTO create_requests \
     (caller, request_id, record_id, fingerprint, created_at) VALUES ($1, $2, $3, $4, $5)";

pub const INSERT_RECORD: &str = "INSERT INTO records \
     (record_id, version, created_at, updated_at, wrapped_key, kek_version, document_index, phone_index, \
      retain_until) \
     VALUES ($1, 1, $2, $2, $3, $4, $5, $6, $7)";

pub const INSERT_FIELD: &str =
    "INSERT INTO record_fields (record_id, field, ciphertext) VALUES ($1, $2, $3)";

pub const DELETE_FIELDS: &str = "DELETE FROM record_fields WHERE record_id = $1";

/// One statement, so the metadata and the fields come from the same snapshot.
pub const SELECT_LIVE_RECORD: &str = "SELECT r.version, r.created_at, r.updated_at, r.wrapped_key, \
            f.field, f.ciphertext \
     FROM records r LEFT JOIN record_fields f ON f.record_id = r.record_id \
     WHERE r.record_id = $1 AND r.deleted_at IS NULL ORDER BY f.field";

pub const SELECT_FIELD_NAMES: &str =
    "SELECT field FROM record_fields WHERE record_id = $1 ORDER BY field";

pub const SELECT_META: &str =
    "SELECT version, created_at, updated_at FROM records WHERE record_id = $1";

pub const UPDATE_RECORD: &str = "UPDATE records \
     SET version = version + 1, updated_at = $3, document_index = $4, phone_index = $5 \
     WHERE record_id = $1 AND version = $2 AND deleted_at IS NULL RETURNING created_at";

pub const SELECT_STATE: &str = "SELECT deleted_at FROM records WHERE record_id = $1";

pub const SHRED_RECORD: &str = "UPDATE records \
     SET deleted_at = $2, updated_at = $2, version = version + 1, wrapped_key = NULL, \
         kek_version = NULL, document_index = NULL, phone_index = NULL \
     WHERE record_id = $1 AND deleted_at IS NULL";

pub const FIND_BY_DOCUMENT: &str =
    "SELECT record_id FROM records WHERE document_index = $1 AND deleted_at IS NULL";

pub const FIND_BY_PHONE: &str = "SELECT record_id FROM records WHERE phone_index = $1 AND deleted_at IS NULL ORDER BY record_id";

pub const INSERT_AUDIT_EVENT: &str = "INSERT INTO audit_events \
     (event_id, occurred_at, caller, peer, rpc, record_ids, purpose, justification, released, \
      outcome, reason, request_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

// Key lifecycle. Statements that lock rows differ per dialect and live in the backends.

pub const COUNT_KEY_VERSIONS: &str = "SELECT COUNT(*) FROM key_versions WHERE key_kind = $1";

pub const INSERT_KEY_VERSION: &str = "INSERT INTO key_versions \
     (key_kind, version, state, provider, created_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT DO NOTHING";

pub const SELECT_ACTIVE_KEY_VERSION: &str =
    "SELECT version FROM key_versions WHERE key_kind = $1 AND state = 'ACTIVE'";

pub const SELECT_MAX_KEY_VERSION: &str =
    "SELECT MAX(version) FROM key_versions WHERE key_kind = $1";

/// Per version, the live records it wraps. Only KEKs wrap record keys, so other kinds
/// count nothing.
pub const SELECT_KEY_VERSIONS: &str = "SELECT v.version, v.state, v.provider, v.created_at, \
       CASE WHEN v.key_kind = 'kek' THEN (SELECT COUNT(*) FROM records r \
            WHERE r.kek_version = v.version AND r.deleted_at IS NULL) ELSE 0 END AS records \
     FROM key_versions v WHERE v.key_kind = $1 ORDER BY v.version";

pub const SELECT_KEY_VERSION_STATE: &str =
    "SELECT state FROM key_versions WHERE key_kind = $1 AND version = $2";

pub const SET_KEY_VERSION_STATE: &str =
    "UPDATE key_versions SET state = $3 WHERE key_kind = $1 AND version = $2";

pub const RETIRE_KEY_VERSION: &str = "UPDATE key_versions SET state = 'RETIRED', retired_at = $3 \
     WHERE key_kind = $1 AND version = $2";

pub const DESTROY_KEY_VERSION: &str = "UPDATE key_versions \
     SET state = 'DESTROYED', destroyed_at = $3 WHERE key_kind = $1 AND version = $2";

pub const COUNT_UNDER_KEK_VERSION: &str =
    "SELECT COUNT(*) FROM records WHERE kek_version = $1 AND deleted_at IS NULL";

pub const COUNT_OLDER_THAN: &str =
    "SELECT COUNT(*) FROM records WHERE kek_version < $1 AND deleted_at IS NULL";

/// Compare-and-swap on the wrapped key itself: a record re-keyed or deleted since the batch
/// read it is left alone rather than given back a wrap of its old data key.
pub const REWRAP_RECORD: &str = "UPDATE records SET wrapped_key = $2, kek_version = $3 \
     WHERE record_id = $1 AND wrapped_key = $4 AND deleted_at IS NULL";

pub const INSERT_REWRAP_JOB: &str = "INSERT INTO rewrap_jobs \
     (job_id, target_version, state, started_at, updated_at) VALUES ($1, $2, 'RUNNING', $3, $3)";

pub const ADVANCE_REWRAP_JOB: &str = "UPDATE rewrap_jobs \
     SET rewrapped = rewrapped + $2, failed = failed + $3, updated_at = $4 WHERE job_id = $1";

pub const FINISH_REWRAP_JOB: &str =
    "UPDATE rewrap_jobs SET state = $2, updated_at = $3 WHERE job_id = $1";

pub const SELECT_REWRAP_JOB: &str =
    "SELECT rewrapped, failed, state FROM rewrap_jobs WHERE job_id = $1";

pub const REKEY_RECORD: &str = "UPDATE records \
     SET version = version + 1, updated_at = $3, wrapped_key = $4, kek_version = $5 \
     WHERE record_id = $1 AND version = $2 AND deleted_at IS NULL RETURNING created_at";

pub const SELECT_EXPIRED: &str = "SELECT record_id FROM records \
     WHERE retain_until <= $1 AND deleted_at IS NULL ORDER BY retain_until, record_id LIMIT $2";
