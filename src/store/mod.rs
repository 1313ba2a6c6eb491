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
}

/// One identity field's ciphertext.
#[derive(Debug, Clone)]
pub struct SealedField {
    pub field: String,
    pub ciphertext: Vec<u8>,
}

/// A caller's idempotency key for a create, with a MAC of what it asked for.
#[derive(Debug)]
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

    /// Closes the pool on shutdown, after the last call: waits for checked-out connections
    /// to come back, then closes them all so the database sees an orderly goodbye.
    async fn close(&self);
}

pub(crate) fn present_fields(fields: &[SealedField]) -> Vec<String> {
    fields.iter().map(|f| f.field.clone()).collect()
}

pub(crate) fn encode_json_list<T: serde::Serialize>(items: &T) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}
