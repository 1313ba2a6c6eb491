//! Persistence behind one trait, [`Store`], with one implementation per backend: SQLite
//! (the embedded default) and PostgreSQL (production, possibly shared by several vault
//! instances).
//!
//! The store never sees plaintext: it moves sealed field bytes, wrapped keys, blind-index
//! MACs and audit events that carry no identity. Every multi-row change runs in one
//! transaction, so a failure never leaves a half-written record. Nothing here relies on
//! in-process state for correctness: uniqueness, idempotency and optimistic concurrency are
//! enforced by the database, so instances sharing one PostgreSQL agree.

mod postgres;
mod queries;
mod shared;
mod sqlite;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("record not found")]
    NotFound,
    /// Optimistic concurrency: the record changed since the caller read it.
    #[error("record version does not match")]
    VersionConflict,
    /// A live record already holds this identity document.
    #[error("a live record already holds this identity document")]
    DuplicateDocument,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    /// The key version a write wrapped under is no longer the active one: another instance
    /// rotated. The caller refreshes its view of the active version and retries.
    #[error("key version {0} is no longer active")]
    StaleKeyVersion(u32),
    /// A key-lifecycle change the version's current state does not allow.
    #[error("key version {version} is {state}")]
    KeyVersionState { version: u32, state: String },
    /// Retiring a version that still wraps data keys.
    #[error("key version {version} still wraps {records} records")]
    KeyVersionInUse { version: u32, records: i64 },
    /// The key provider failed while the database held the key-admin lock.
    #[error("key provider: {0}")]
    KeyProvider(String),
}

/// Microseconds since the Unix epoch; the one time representation both backends share.
pub type Micros = i64;

/// A new record, already sealed.
#[derive(Debug)]
pub struct NewRecord {
    pub record_id: String,
    pub created_at: Micros,
    pub wrapped_key: Vec<u8>,
    pub kek_version: u32,
    pub document_index: Option<Vec<u8>>,
    pub phone_index: Option<Vec<u8>>,
    pub fields: Vec<SealedField>,
    /// When the record must be crypto-shredded; `None` keeps it until deleted.
    pub retain_until: Option<Micros>,
}

/// One identity field's ciphertext.
#[derive(Debug, Clone)]
pub struct SealedField {
    pub field: String,
    pub ciphertext: Vec<u8>,
}

/// A caller's idempotency key for a create, with a MAC of what it asked for.
#[derive(Debug, Clone)]
pub struct CreateRequestKey {
    pub caller: String,
    pub request_id: String,
    pub fingerprint: Vec<u8>,
}

/// Metadata of a live record: nothing here identifies the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub record_id: String,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub present_fields: Vec<String>,
}

#[derive(Debug)]
pub enum InsertOutcome {
    Inserted(RecordMeta),
    /// The caller already used this request id; `same_request` tells whether the content
    /// matched (a retry) or not (a reused id).
    Replayed {
        meta: RecordMeta,
        same_request: bool,
    },
}

/// A live record as stored: still sealed.
#[derive(Debug)]
pub struct StoredRecord {
    pub meta: RecordMeta,
    pub wrapped_key: Vec<u8>,
    pub fields: Vec<SealedField>,
}

/// A record's fields re-sealed under a fresh data key, and that key wrapped.
#[derive(Debug)]
pub struct RecordRekey {
    pub record_id: String,
    pub expected_version: i64,
    pub updated_at: Micros,
    pub wrapped_key: Vec<u8>,
    pub kek_version: u32,
    pub fields: Vec<SealedField>,
}

/// Replaces a record's sealed fields and indexes if its version is still `expected_version`.
#[derive(Debug)]
pub struct RecordUpdate {
    pub record_id: String,
    pub expected_version: i64,
    pub updated_at: Micros,
    pub document_index: Option<Vec<u8>>,
    pub phone_index: Option<Vec<u8>>,
    pub fields: Vec<SealedField>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Active,
    Deleted,
}

/// One audit event. Holds no identity: record ids, names of fields and levels, caller and
/// purpose names, never values.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub event_id: String,
    pub occurred_at: Micros,
    pub caller: String,
    pub peer: Option<String>,
    pub rpc: String,
    pub record_ids: Vec<String>,
    pub purpose: Option<String>,
    pub justification: Option<String>,
    /// (field, level) pairs actually released.
    pub released: Vec<(String, String)>,
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
}

/// One key version's state as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRow {
    pub version: u32,
    pub state: String,
    pub provider: String,
    pub created_at: Micros,
    /// Live records whose data key this version wraps.
    pub records: i64,
}

/// What a rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// A new version was created and is active; `previous` became decrypt-only.
    Rotated { version: u32, previous: u32 },
    /// The active version was no longer the one the caller expected (another rotation won):
    /// nothing was created.
    NotRotated { active: u32 },
}

/// Creates key material for a version inside the key-admin transaction.
pub type ProvisionFn<'a> = dyn Fn(u32) -> Result<(), String> + Send + Sync + 'a;

/// Re-wraps one data key for a record under the target version; `None` when it cannot be
/// unwrapped (the record is left as it is and counted as failed).
pub type RewrapFn<'a> = dyn Fn(&str, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'a;

/// What one rewrap batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewrapBatch {
    /// Rows the batch looked at; zero means the pass is over.
    pub selected: usize,
    pub rewrapped: u64,
    pub failed: u64,
    /// Where the next batch of this pass starts.
    pub last_record_id: Option<String>,
    /// The target version stopped being active (a rotation happened): nothing was done.
    pub target_inactive: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Inserts a record and its audit event atomically. With a request key, a second insert
    /// under the same (caller, request id) returns the first record instead.
    async fn insert_record(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: &AuditEvent,
    ) -> Result<InsertOutcome, StoreError>;

    /// A live record, or `None` when it never existed or was deleted.
    async fn get_record(&self, record_id: &str) -> Result<Option<StoredRecord>, StoreError>;

    /// Replaces a live record's fields and indexes, with its audit event, atomically.
    async fn update_record(
        &self,
        update: RecordUpdate,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError>;

    /// Crypto-shreds a live record: removes its wrapped key, ciphertexts and indexes, keeps a
    /// tombstone, and writes the audit event in the same transaction.
    async fn delete_record(
        &self,
        record_id: &str,
        deleted_at: Micros,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Live records whose document blind index equals `index`.
    async fn find_by_document(&self, index: &[u8]) -> Result<Vec<String>, StoreError>;

    /// Live records whose phone blind index equals `index`.
    async fn find_by_phone(&self, index: &[u8]) -> Result<Vec<String>, StoreError>;

    /// Whether the record exists and is live; reads no identity.
    async fn record_state(&self, record_id: &str) -> Result<Option<RecordState>, StoreError>;

    /// Durably appends audit events in one transaction.
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError>;

    /// Round trip to the database, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records the given key versions when the database knows none of `kind` yet (first start
    /// after the key-lifecycle migration). Concurrent first starts agree: the first wins.
    async fn seed_key_versions(
        &self,
        kind: &str,
        provider: &str,
        versions: &[(u32, &str)],
        now: Micros,
    ) -> Result<(), StoreError>;

    /// The active version of `kind`, if any.
    async fn active_key_version(&self, kind: &str) -> Result<Option<u32>, StoreError>;

    /// Every version of `kind`, oldest first, with the records each wraps.
    async fn key_versions(&self, kind: &str) -> Result<Vec<KeyVersionRow>, StoreError>;

    /// Creates version max+1 as active and makes `expected_active` decrypt-only, provided
    /// `expected_active` is still the active one once the key-admin lock is held.
    async fn rotate_key(
        &self,
        kind: &str,
        expected_active: u32,
        provider: &str,
        now: Micros,
        provision: &ProvisionFn<'_>,
    ) -> Result<Rotation, StoreError>;

    /// Marks a decrypt-only version retired, if no live record's key is wrapped under it.
    async fn retire_key_version(
        &self,
        kind: &str,
        version: u32,
        now: Micros,
    ) -> Result<KeyVersionRow, StoreError>;

    /// Destroys a retired version: `destroy` erases the material, then the state becomes
    /// DESTROYED, both under the key-admin lock.
    async fn destroy_key_version(
        &self,
        kind: &str,
        version: u32,
        now: Micros,
        destroy: &ProvisionFn<'_>,
    ) -> Result<KeyVersionRow, StoreError>;

    /// Starts a rewrap job's progress row.
    async fn start_rewrap_job(
        &self,
        job_id: &str,
        target: u32,
        now: Micros,
    ) -> Result<(), StoreError>;

    /// Rewraps up to `limit` live records under a version older than `target`, with ids
    /// after `after`, in one transaction that also advances the job's counters. Rows another
    /// job or a writer holds are skipped, not waited for.
    async fn rewrap_batch(
        &self,
        job_id: &str,
        target: u32,
        after: &str,
        limit: i64,
        now: Micros,
        rewrap: &RewrapFn<'_>,
    ) -> Result<RewrapBatch, StoreError>;

    /// Live records whose key is wrapped under a version older than `target`.
    async fn count_older_than(&self, target: u32) -> Result<i64, StoreError>;

    /// Closes a rewrap job with its final state.
    async fn finish_rewrap_job(
        &self,
        job_id: &str,
        state: &str,
        now: Micros,
    ) -> Result<(), StoreError>;

    /// Gives a live record a new data key: replaces its wrapped key and every ciphertext if
    /// its version is still `expected_version`, re-checking that `kek_version` is active.
    async fn rekey_record(
        &self,
        rekey: RecordRekey,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError>;

    /// Up to `limit` live records whose retention deadline is at or before `now`.
    async fn expired_records(&self, now: Micros, limit: i64) -> Result<Vec<String>, StoreError>;

    /// A job's (rewrapped, failed) counters and state.
    async fn rewrap_job(&self, job_id: &str) -> Result<Option<(i64, i64, String)>, StoreError>;
}

pub(crate) fn present_fields(fields: &[SealedField]) -> Vec<String> {
    fields.iter().map(|f| f.field.clone()).collect()
}

pub(crate) fn encode_json_list<T: serde::Serialize>(items: &T) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}
