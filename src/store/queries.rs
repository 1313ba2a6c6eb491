//! SQL both backends run unchanged, by aggregate. Placeholders are `$N`, which PostgreSQL
//! binds by position and SQLite by name (`sqlite::driver` binds `$1`, `$2`, ... by name), so
//! only statements whose dialects really differ (row locks) live in the backends' modules.

/// A caller's request key with its record's fate; rows stored before `$3` have expired.
pub const SELECT_CREATE_REQUEST: &str = "SELECT c.record_id, c.fingerprint, r.deleted_at \
     FROM create_requests c JOIN records r ON r.record_id = c.record_id \
     WHERE c.caller = $1 AND c.request_id = $2 AND c.created_at >= $3";

/// Frees an expired request key for reuse, in the create's transaction.
pub const DELETE_EXPIRED_CREATE_REQUEST: &str = "DELETE FROM create_requests \
     WHERE caller = $1 AND request_id = $2 AND created_at < $3";

pub const EXPIRE_CREATE_REQUESTS: &str = "DELETE FROM create_requests WHERE created_at < $1";

/// A deleted record's request keys keep only the fact that they were used: their
/// fingerprint is an HMAC of the identity.
pub const FORGET_CREATE_REQUESTS: &str =
    "UPDATE create_requests SET fingerprint = NULL WHERE record_id = $1";

pub const INSERT_CREATE_REQUEST: &str = "INSERT INTO create_requests \
     (caller, request_id, record_id, fingerprint, created_at) VALUES ($1, $2, $3, $4, $5)";

/// A record's row (`INSERT` and its conflict clause).
macro_rules! insert_record {
    ($insert:literal) => {
        concat!(
            $insert,
            " INTO records \
             (record_id, version, created_at, updated_at, wrapped_key, kek_version, \
              document_index, phone_index, age_gate, policy_version, retain_until, \
              index_version) \
             VALUES ($1, 1, $2, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
    };
}

pub const INSERT_RECORD: &str = insert_record!("INSERT");

/// SQLite's form of [`INSERT_RECORD`]. With the default conflict clause (ABORT) an insert
/// into a table with several indexes runs under a statement journal, a copy of every page
/// it touches (a fifth of a create's record-row insert on the writer, BENCHMARKS.md). FAIL
/// needs none, and loses nothing here: SQLite checks every uniqueness constraint before it
/// writes any B-tree, so a refused row has written nothing; any other failure fails the
/// caller's job, which rolls back (`sqlite::records::write_record`).
pub const INSERT_RECORD_OR_FAIL: &str = insert_record!("INSERT OR FAIL");

/// The account-state columns of `records r`, as [`super::AccountState`] decodes them.
macro_rules! account_columns {
    () => {
        "r.deleted_at, r.suspended_at, r.age_gate, r.index_version, r.policy_version, \
         (SELECT COUNT(*) FROM guardian_consents c \
          WHERE c.record_id = r.record_id AND c.revoked_at IS NULL) AS active_consents"
    };
}

/// A record's sealed fields, one row (`store::field_set`).
pub const INSERT_FIELDS: &str = "INSERT INTO sealed_fields (record_id, fields) VALUES ($1, $2)";

/// An update's or a re-key's fields, replacing the set a create wrote (or a migrated record
/// without one).
pub const UPSERT_FIELDS: &str = "INSERT INTO sealed_fields (record_id, fields) VALUES ($1, $2) \
     ON CONFLICT (record_id) DO UPDATE SET fields = excluded.fields";

pub const DELETE_FIELDS: &str = "DELETE FROM sealed_fields WHERE record_id = $1";

/// The columns every read of live records returns, in `rules::record_at`'s order: the
/// record's own, its account state, and its sealed fields (one value, NULL for none).
macro_rules! live_record_columns {
    () => {
        concat!(
            "r.record_id, r.version, r.created_at, r.updated_at, r.wrapped_key, ",
            account_columns!(),
            ", f.fields FROM records r LEFT JOIN sealed_fields f ON f.record_id = r.record_id"
        )
    };
}

/// One statement, one row: the metadata and the fields come from the same snapshot.
pub const SELECT_LIVE_RECORD: &str = concat!(
    "SELECT ",
    live_record_columns!(),
    " WHERE r.record_id = $1 AND r.deleted_at IS NULL"
);

/// Most ids one [`select_live_records`] binds: a larger batch (`limits.max_batch_size` has
/// no upper bound) is read in several statements, far below SQLite's 32 766 and
/// PostgreSQL's 65 535 bound parameters.
pub const IDS_PER_STATEMENT: usize = 1000;

/// The live records among `n` ids (`$1..$n`), a row each: a batch read's records from ONE
/// statement instead of one per record, each from the statement's one snapshot, as from
/// [`SELECT_LIVE_RECORD`].
pub fn select_live_records(n: usize) -> String {
    debug_assert!(n <= IDS_PER_STATEMENT);
    format!(
        "SELECT {} WHERE r.record_id IN ({}) AND r.deleted_at IS NULL",
        live_record_columns!(),
        placeholders(n.max(1), 1)
    )
}

/// A page of live records for an export, in record id order after `$1`, created at or
/// before `$2`, at most `$3`, a row each: the keyset scan that keeps an export's memory
/// flat. One statement per page, so each record comes from one snapshot.
pub const SCAN_LIVE_RECORDS: &str = concat!(
    "SELECT ",
    live_record_columns!(),
    " WHERE r.deleted_at IS NULL AND r.record_id > $1 AND r.created_at <= $2 \
     ORDER BY r.record_id LIMIT $3"
);

/// An export page's records as [`SCAN_LIVE_RECORDS`] returns them but with `fields` NULL
/// (SQLite: their sets follow from [`SCAN_FIELD_SETS`] in the same read transaction, a
/// range scan in key order instead of a lookup per record).
pub const SCAN_LIVE_RECORD_ROWS: &str = concat!(
    "SELECT r.record_id, r.version, r.created_at, r.updated_at, r.wrapped_key, ",
    account_columns!(),
    ", NULL AS fields FROM records r \
     WHERE r.deleted_at IS NULL AND r.record_id > $1 AND r.created_at <= $2 \
     ORDER BY r.record_id LIMIT $3"
);

/// The sealed-field sets of a record-id range, in key order; `record_id, fields` by
/// position (SQLite).
pub const SCAN_FIELD_SETS: &str = "SELECT record_id, fields FROM sealed_fields \
     WHERE record_id > $1 AND record_id <= $2 ORDER BY record_id";

/// A record's sealed fields (`store::field_set`); no row: none.
pub const SELECT_FIELDS: &str = "SELECT fields FROM sealed_fields WHERE record_id = $1";

pub const SELECT_META: &str =
    "SELECT version, created_at, updated_at FROM records WHERE record_id = $1";

/// `$8 = 1` lets the write through a suspension (the account-security role).
pub const UPDATE_RECORD: &str = "UPDATE records \
     SET version = version + 1, updated_at = $3, document_index = $4, phone_index = $5, \
         age_gate = $6, policy_version = COALESCE($7, policy_version), index_version = $9 \
     WHERE record_id = $1 AND version = $2 AND deleted_at IS NULL \
       AND (suspended_at IS NULL OR $8 = 1) \
     RETURNING created_at";

pub const SELECT_ACCOUNT_STATE: &str = concat!(
    "SELECT ",
    account_columns!(),
    " FROM records r WHERE r.record_id = $1"
);

pub const SHRED_RECORD: &str = "UPDATE records \
     SET deleted_at = $2, updated_at = $2, version = version + 1, wrapped_key = NULL, \
         kek_version = NULL, document_index = NULL, phone_index = NULL, age_gate = NULL \
     WHERE record_id = $1 AND deleted_at IS NULL AND (suspended_at IS NULL OR $3 = 1)";

pub const SHRED_GUARDIANS: &str =
    "UPDATE guardian_consents SET guardian_sealed = NULL WHERE record_id = $1";

/// `$1, $2, ..., $n`.
fn placeholders(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Live records whose `column` (`document_index` or `phone_index`) is one of `n` values:
/// the same key under each live index version.
pub fn find_by_index(column: &str, n: usize) -> String {
    assert!(matches!(column, "document_index" | "phone_index"));
    format!(
        "SELECT r.record_id, {} FROM records r WHERE r.{column} IN ({}) \
         AND r.deleted_at IS NULL ORDER BY r.record_id",
        account_columns!(),
        placeholders(n.max(1), 1)
    )
}

/// Whether another live record (not `$1`) holds one of `n` document indexes (`$2..`).
pub fn document_held_elsewhere(n: usize) -> String {
    format!(
        "SELECT COUNT(*) FROM records WHERE document_index IN ({}) \
         AND deleted_at IS NULL AND record_id <> $1",
        placeholders(n, 2)
    )
}

/// Index versions a write must have computed for: the active one and the decrypt-only ones
/// that may still index records.
pub const SELECT_LIVE_INDEX_VERSIONS: &str = "SELECT version FROM key_versions \
     WHERE key_kind = 'index' AND state IN ('ACTIVE', 'DECRYPT_ONLY')";

pub const SUSPEND: &str = "UPDATE records SET suspended_at = $2 \
     WHERE record_id = $1 AND deleted_at IS NULL AND suspended_at IS NULL";

pub const REINSTATE: &str = "UPDATE records SET suspended_at = NULL \
     WHERE record_id = $1 AND deleted_at IS NULL AND suspended_at IS NOT NULL";

pub const INSERT_ACCOUNT_EVENT: &str = "INSERT INTO account_events \
     (event_id, record_id, occurred_at, kind, actor, reason, note, ticket, consent_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Oldest first, keyset-paginated on (occurred_at, event_id).
pub const LIST_ACCOUNT_EVENTS: &str = "SELECT event_id, record_id, occurred_at, kind, actor, \
     reason, note, ticket, consent_id FROM account_events \
     WHERE record_id = $1 AND (occurred_at > $2 OR (occurred_at = $2 AND event_id > $3)) \
     ORDER BY occurred_at, event_id LIMIT $4";

pub const INSERT_CONSENT: &str = "INSERT INTO guardian_consents \
     (consent_id, record_id, guardian_record_id, guardian_sealed, relationship, evidence_ref, \
      policy_version, granted_at, granted_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Revokes one active consent (`$2`) or, with `$2` NULL, every active consent of `$1`.
pub const REVOKE_CONSENTS: &str = "UPDATE guardian_consents SET revoked_at = $3, revoked_by = $4 \
     WHERE record_id = $1 AND ($2 IS NULL OR consent_id = $2) AND revoked_at IS NULL \
     RETURNING consent_id";

/// Reserves `$2` sequence numbers on chain `$1`; returns the new head sequence and the
/// previous head hash, and holds the chain's row lock until commit (on SQLite the write
/// transaction is exclusive anyway).
pub const ADVANCE_CHAIN: &str = "UPDATE audit_chains SET head_seq = head_seq + $2 \
     WHERE chain_id = $1 RETURNING head_seq, head_hash";

pub const DELETE_EVENT_RECORDS_PREFIX: &str =
    "DELETE FROM audit_event_records WHERE chain_id = $1 AND seq <= $2";

pub const SET_CHAIN_HASH: &str = "UPDATE audit_chains SET head_hash = $2 WHERE chain_id = $1";

pub const REGISTER_CHAIN: &str = "INSERT INTO audit_chains (chain_id, started_at, head_seq, head_hash) \
     VALUES ($1, $2, 0, $3)";

pub(crate) const EVENT_COLUMNS: &str = "chain_id, seq, event_id, occurred_at, caller, peer, rpc, record_ids, \
     purpose, justification, released, outcome, reason, request_id, trace_id, prev_hash, hash";

/// The filters of [`list_audit_events`] after the record, on the events of `e`.
pub(crate) const EVENT_FILTERS: &str = "($2 IS NULL OR e.caller = $2) AND ($3 IS NULL OR e.purpose = $3) \
     AND ($4 IS NULL OR e.outcome = $4) AND e.occurred_at >= $5 AND e.occurred_at < $6 \
     AND (e.occurred_at < $7 OR (e.occurred_at = $7 AND e.event_id < $8))";

/// `EVENT_COLUMNS` of `audit_events e`.
pub(crate) fn event_columns_of_e() -> String {
    EVENT_COLUMNS
        .split(", ")
        .map(|column| format!("e.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`list_audit_events`] for one record (`$1`, never NULL here): the events about it alone
/// (`audit_events.record_id`) and those naming it among others (`audit_event_records`), each
/// branch newest first from its index, merged.
pub fn list_audit_events_of_record() -> String {
    let columns = event_columns_of_e();
    format!(
        "SELECT {EVENT_COLUMNS} FROM ( \
           SELECT * FROM (SELECT {columns} FROM audit_events e \
             WHERE e.record_id = $1 AND {EVENT_FILTERS} \
             ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT $9) alone \
           UNION ALL \
           SELECT * FROM (SELECT {columns} FROM audit_event_records x \
             JOIN audit_events e ON e.chain_id = x.chain_id AND e.seq = x.seq \
             WHERE x.record_id = $1 AND {EVENT_FILTERS} \
             ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT $9) among_others \
         ) events ORDER BY occurred_at DESC, event_id DESC LIMIT $9"
    )
}

/// Newest first, keyset-paginated on (occurred_at, event_id); `NULL` filters match all.
pub fn list_audit_events() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM audit_events \
         WHERE ($1 IS NULL OR record_id = $1) AND ($2 IS NULL OR caller = $2) \
           AND ($3 IS NULL OR purpose = $3) AND ($4 IS NULL OR outcome = $4) \
           AND occurred_at >= $5 AND occurred_at < $6 \
           AND (occurred_at < $7 OR (occurred_at = $7 AND event_id < $8)) \
         ORDER BY occurred_at DESC, event_id DESC LIMIT $9"
    )
}

/// The breach question: on PostgreSQL from the partial index `audit_events_plaintext_releases`,
/// on SQLite from the time index's range (`audit_events_time`).
pub fn plaintext_releases() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM audit_events \
         WHERE caller = $1 AND plaintext = 1 AND occurred_at >= $2 AND occurred_at < $3 \
           AND (occurred_at < $4 OR (occurred_at = $4 AND event_id < $5)) \
         ORDER BY occurred_at DESC, event_id DESC LIMIT $6"
    )
}

/// The filters of [`disclosures`] on the events of `e`: released fields, under one of the
/// `purposes` (`$5..`), before the cursor (`$2`, `$3`).
pub(crate) fn disclosure_filters(purposes: usize) -> String {
    let placeholders: Vec<String> = (0..purposes).map(|i| format!("${}", i + 5)).collect();
    format!(
        "e.outcome = 'OK' AND e.released <> '[]' \
         AND (e.occurred_at < $2 OR (e.occurred_at = $2 AND e.event_id < $3)) \
         AND e.purpose IN ({})",
        placeholders.join(", ")
    )
}

/// Released fields of one record under the given purposes, newest first. `$5..` are the
/// purposes, spliced in as numbered placeholders.
pub fn disclosures(purposes: usize) -> String {
    let columns = event_columns_of_e();
    let filters = disclosure_filters(purposes);
    format!(
        "SELECT {EVENT_COLUMNS} FROM ( \
           SELECT * FROM (SELECT {columns} FROM audit_events e \
             WHERE e.record_id = $1 AND {filters} \
             ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT $4) alone \
           UNION ALL \
           SELECT * FROM (SELECT {columns} FROM audit_event_records x \
             JOIN audit_events e ON e.chain_id = x.chain_id AND e.seq = x.seq \
             WHERE x.record_id = $1 AND {filters} \
             ORDER BY e.occurred_at DESC, e.event_id DESC LIMIT $4) among_others \
         ) events ORDER BY occurred_at DESC, event_id DESC LIMIT $4"
    )
}

pub fn chain_events() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM audit_events WHERE chain_id = $1 AND seq > $2 \
         ORDER BY seq LIMIT $3"
    )
}

pub const CHAIN_HEADS: &str =
    "SELECT chain_id, head_seq, head_hash FROM audit_chains ORDER BY chain_id";

pub const CHAIN_IDS: &str = "SELECT chain_id FROM audit_chains \
     UNION SELECT DISTINCT chain_id FROM audit_events \
     UNION SELECT chain_id FROM audit_expiry_markers";

pub const INSERT_CHECKPOINT: &str = "INSERT INTO audit_checkpoints \
     (created_at, heads, signature, format, signer_id, counter, key_id, prev_hash, closed) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

const CHECKPOINT_COLUMNS: &str =
    "id, created_at, heads, signature, format, signer_id, counter, key_id, prev_hash, closed";

pub fn checkpoints() -> String {
    format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id")
}

/// A signer's newest checkpoint, from the (signer_id, counter) index.
pub fn latest_signer_checkpoint() -> String {
    format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE signer_id = $1 \
         ORDER BY counter DESC LIMIT 1"
    )
}

pub const COUNT_SIGNER_CHECKPOINTS: &str =
    "SELECT COUNT(*) FROM audit_checkpoints WHERE signer_id = $1";

pub const CHAINED_CHECKPOINT_EXISTS: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM audit_checkpoints WHERE signer_id IS NOT NULL LIMIT 1) AS any_chained";

pub const EXPIRY_MARKERS: &str =
    "SELECT chain_id, up_to_seq, hash, expired_at, signature FROM audit_expiry_markers";

pub const DELETE_CHAIN_PREFIX: &str = "DELETE FROM audit_events WHERE chain_id = $1 AND seq <= $2";

pub const UPSERT_EXPIRY_MARKER: &str = "INSERT INTO audit_expiry_markers \
     (chain_id, up_to_seq, hash, expired_at, signature) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (chain_id) DO UPDATE SET up_to_seq = excluded.up_to_seq, hash = excluded.hash, \
     expired_at = excluded.expired_at, signature = excluded.signature";

// Key lifecycle. Statements that lock rows differ per dialect and live in the backends.

pub const COUNT_KEY_VERSIONS: &str = "SELECT COUNT(*) FROM key_versions WHERE key_kind = $1";

pub const INSERT_KEY_VERSION: &str = "INSERT INTO key_versions \
     (key_kind, version, state, provider, created_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT DO NOTHING";

pub const SELECT_ACTIVE_KEY_VERSION: &str =
    "SELECT version FROM key_versions WHERE key_kind = $1 AND state = 'ACTIVE'";

pub const SELECT_MAX_KEY_VERSION: &str =
    "SELECT MAX(version) FROM key_versions WHERE key_kind = $1";

/// Per version, the live records it wraps (KEKs) or indexes (index keys).
pub const SELECT_KEY_VERSIONS: &str = "SELECT v.version, v.state, v.provider, v.created_at, \
       CASE WHEN v.key_kind = 'kek' THEN (SELECT COUNT(*) FROM records r \
            WHERE r.kek_version = v.version AND r.deleted_at IS NULL) \
          WHEN v.key_kind = 'index' THEN (SELECT COUNT(*) FROM records r \
            WHERE r.index_version = v.version AND r.deleted_at IS NULL) \
          ELSE 0 END AS records \
     FROM key_versions v WHERE v.key_kind = $1 ORDER BY v.version";

pub const SELECT_KEY_VERSION_STATES: &str =
    "SELECT version, state FROM key_versions WHERE key_kind = $1 ORDER BY version";

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

pub const COUNT_UNDER_INDEX_VERSION: &str =
    "SELECT COUNT(*) FROM records WHERE index_version = $1 AND deleted_at IS NULL";

pub const COUNT_INDEX_OLDER_THAN: &str =
    "SELECT COUNT(*) FROM records WHERE index_version < $1 AND deleted_at IS NULL";

/// Compare-and-swap on the record's version and index version: a record updated, re-keyed
/// or deleted since the batch read it keeps what its writer gave it.
pub const REINDEX_RECORD: &str = "UPDATE records \
     SET document_index = $2, phone_index = $3, age_gate = $4, index_version = $5 \
     WHERE record_id = $1 AND version = $6 AND index_version = $7 AND deleted_at IS NULL";

pub const ADVANCE_REINDEX_JOB: &str = "UPDATE rewrap_jobs \
     SET reindexed = reindexed + $2, failed = failed + $3, updated_at = $4, \
         target_index_version = $5 WHERE job_id = $1";

pub const COUNT_OLDER_THAN: &str =
    "SELECT COUNT(*) FROM records WHERE kek_version < $1 AND deleted_at IS NULL";

/// Compare-and-swap on the wrapped key itself: a record re-keyed or deleted since the batch
/// read it is left alone rather than given back a wrap of its old data key.
pub const REWRAP_RECORD: &str = "UPDATE records SET wrapped_key = $2, kek_version = $3 \
     WHERE record_id = $1 AND wrapped_key = $4 AND deleted_at IS NULL";

pub const INSERT_REWRAP_JOB: &str = "INSERT INTO rewrap_jobs \
     (job_id, target_version, state, started_at, updated_at, owner_instance, owner_process, \
      lease_until) VALUES ($1, $2, 'RUNNING', $3, $3, $4, $5, $6)";

/// A live owner renewing its lease; a job another instance thought dead is running after
/// all, and says so again.
pub const RENEW_REWRAP_LEASE: &str = "UPDATE rewrap_jobs SET lease_until = $2, state = 'RUNNING' \
     WHERE job_id = $1 AND state IN ('RUNNING', 'INTERRUPTED')";

/// RUNNING jobs whose owner is gone: the lease ran out (a job without one, from before
/// leases, counts from its last progress), or the owner's instance ($3) now runs as another
/// process ($4), so the process that ran the job died.
pub const INTERRUPT_ABANDONED_JOBS: &str = "UPDATE rewrap_jobs \
     SET state = 'INTERRUPTED', updated_at = $1 \
     WHERE state = 'RUNNING' AND (COALESCE(lease_until, updated_at + $2) < $1 \
        OR (owner_instance = $3 AND owner_process <> $4))";

pub const SELECT_REWRAP_JOBS: &str = "SELECT job_id, state, target_version, \
     target_index_version, started_at, updated_at, rewrapped, reindexed, failed, \
     owner_instance FROM rewrap_jobs ORDER BY started_at DESC, job_id LIMIT $1";

pub const ADVANCE_REWRAP_JOB: &str = "UPDATE rewrap_jobs \
     SET rewrapped = rewrapped + $2, failed = failed + $3, updated_at = $4 WHERE job_id = $1";

pub const FINISH_REWRAP_JOB: &str =
    "UPDATE rewrap_jobs SET state = $2, updated_at = $3 WHERE job_id = $1";

pub const SELECT_REWRAP_JOB: &str =
    "SELECT rewrapped, failed, state FROM rewrap_jobs WHERE job_id = $1";

/// Ciphertexts sealed under a record's key outside its fields ([`super::BoundCiphertexts`]).
pub const SELECT_BOUND_NOTES: &str = "SELECT event_id, note FROM account_events \
     WHERE record_id = $1 AND note IS NOT NULL ORDER BY event_id";

pub const SELECT_BOUND_GUARDIANS: &str = "SELECT consent_id, guardian_sealed \
     FROM guardian_consents WHERE record_id = $1 AND guardian_sealed IS NOT NULL \
     ORDER BY consent_id";

pub const COUNT_BOUND: &str = "SELECT \
     (SELECT COUNT(*) FROM account_events WHERE record_id = $1 AND note IS NOT NULL) + \
     (SELECT COUNT(*) FROM guardian_consents WHERE record_id = $1 AND guardian_sealed IS NOT NULL)";

/// Compare-and-swap: replaces a note only if it is still the one that was re-sealed.
pub const RESEAL_NOTE: &str =
    "UPDATE account_events SET note = $2 WHERE event_id = $1 AND note = $3";

pub const RESEAL_GUARDIAN: &str = "UPDATE guardian_consents SET guardian_sealed = $2 WHERE consent_id = $1 AND guardian_sealed = $3";

pub const REKEY_RECORD: &str = "UPDATE records \
     SET version = version + 1, updated_at = $3, wrapped_key = $4, kek_version = $5 \
     WHERE record_id = $1 AND version = $2 AND deleted_at IS NULL RETURNING created_at";

pub const SELECT_EXPIRED: &str = "SELECT record_id FROM records \
     WHERE retain_until <= $1 AND deleted_at IS NULL ORDER BY retain_until, record_id LIMIT $2";
