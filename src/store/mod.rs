//! Persistence behind one trait, [`Store`], with one driver per backend: SQLite on
//! rusqlite (the embedded default, `sqlite/`) and PostgreSQL on sqlx (production, possibly
//! shared by several vault instances, `postgres/`).
//!
//! Each backend is split by aggregate (records; accounts and consents; audit; key versions;
//! jobs), with its SQL in one place per aggregate; `queries` holds the statements both
//! dialects run unchanged. What is not SQL (decoding rows, linking audit events into their
//! chain, the order of a create's checks, idempotency replays, why a conditional write
//! changed nothing) is written once in `rules` and called by both.
//!
//! The store never sees plaintext: it moves sealed field bytes, wrapped keys, blind-index
//! MACs and audit events that carry no identity. Every multi-row change runs in one
//! transaction with its audit event, so a failure never leaves a half-written record or a
//! change without its event. Nothing here relies on in-process state for correctness:
//! uniqueness, idempotency and optimistic concurrency are enforced by the database, so
//! instances sharing one PostgreSQL agree.

mod field_set;
mod postgres;
mod queries;
mod rules;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::audit_chain::{AuditEvent, ChainHead, Checkpoint, ExpiryMarker, StoredEvent};
use crate::domain::ids::{AccountEventId, ChainId, ConsentId, JobId, RecordId, SignerId};

pub use postgres::PostgresStore;
pub use sqlite::{MigrationError, SqliteStore};

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
    /// The record is suspended and the write did not override it.
    #[error("the account is suspended")]
    Suspended,
    /// From PostgreSQL (sqlx).
    #[error("database error: {0}")]
    Postgres(#[from] sqlx::Error),
    /// From SQLite (rusqlite).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database could not be reached, is closed, or was opened read-only.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A file of the database could not be created or made private.
    #[error("database file {path}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A thread of the SQLite store could not be started.
    #[error("cannot start a database thread")]
    Thread(#[source] std::io::Error),
    /// The commit a write was part of (a SQLite group, or a batch's transaction) failed:
    /// nothing of it was written. Shared by every write of the group, hence the `Arc`.
    #[error("the group commit failed: {0}")]
    CommitFailed(#[source] Arc<StoreError>),
    #[error("PostgreSQL migration failed: {0}")]
    PostgresMigration(#[from] sqlx::migrate::MigrateError),
    #[error("SQLite migration failed: {0}")]
    SqliteMigration(#[from] MigrationError),
    /// What is wrong with a row, by column, id or version: never a stored value.
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    /// A value to be stored (a checkpoint's heads) could not be encoded as JSON.
    #[error("cannot encode a value to store: {0}")]
    Encode(#[source] serde_json::Error),
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
    /// The index versions a write computed its blind indexes for are no longer the live
    /// ones (another instance rotated the index key): the caller refreshes and retries.
    #[error("index key version {0} is no longer active, or another version is live")]
    StaleIndexVersion(u32),
}

/// Microseconds since the Unix epoch; the one time representation both backends share.
pub type Micros = i64;

/// A new record, already sealed.
#[derive(Debug)]
pub struct NewRecord {
    pub record_id: RecordId,
    pub created_at: Micros,
    pub wrapped_key: Vec<u8>,
    pub kek_version: u32,
    pub indexes: RecordIndexes,
    pub fields: Vec<SealedField>,
    /// The birth date sealed under the state key of `indexes.version`, when known.
    pub age_gate: Option<Vec<u8>>,
    pub policy_version: Option<String>,
    /// When the record must be crypto-shredded; `None` keeps it until deleted.
    pub retain_until: Option<Micros>,
}

/// A write's blind indexes, computed under the active index version, and what the database
/// needs to keep live documents unique across index versions.
///
/// Documents indexed under different versions have different index values, so the unique
/// index alone cannot see a duplicate across versions. The write therefore also carries the
/// document's index under every other live version, and the database refuses it when a
/// live record holds one of those; it re-checks, in the same transaction and under a share
/// lock on the active version's row, that `version` is still active and that no other
/// version is live (see the store backends). Two writers then either compute the same
/// active index (and meet at the unique index) or one sees the other's committed row.
#[derive(Debug, Clone, Default)]
pub struct RecordIndexes {
    pub version: u32,
    pub document: Option<Vec<u8>>,
    pub phone: Option<Vec<u8>>,
    /// The document's index under each live version other than `version`.
    pub document_elsewhere: Vec<Vec<u8>>,
    /// Every live index version the vault computed for, `version` included.
    pub computed_for: Vec<u32>,
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
    /// Stored with the request: the MAC under the active index version.
    pub fingerprint: Vec<u8>,
    /// The same MAC under the other live index versions: a retry spanning an index rotation
    /// still matches the fingerprint its first attempt stored.
    pub fingerprint_elsewhere: Vec<Vec<u8>>,
    /// Keys stored before this instant have expired: they answer no retry, and a new create
    /// may reuse the request id.
    pub expired_before: Micros,
}

/// Metadata of a live record: nothing here identifies the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub record_id: RecordId,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub present_fields: Vec<String>,
}

/// One create of a batch ([`Store::insert_records`]), or the record and request key a
/// single create hands [`Store::insert_record`].
#[derive(Debug)]
pub struct BatchInsert {
    pub record: NewRecord,
    pub request: Option<CreateRequestKey>,
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
    /// The caller already used this request id for a record that has since been deleted.
    ReplayedDeleted,
}

/// A live record as stored: still sealed.
#[derive(Debug)]
pub struct StoredRecord {
    pub meta: RecordMeta,
    pub wrapped_key: Vec<u8>,
    pub fields: Vec<SealedField>,
    pub account: AccountState,
}

/// What the login path and every release check need, read without opening identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountState {
    pub deleted: bool,
    pub suspended: bool,
    /// The birth date sealed under the state key of `index_version`.
    pub age_gate: Option<Vec<u8>>,
    /// The index version of the record's blind indexes and age gate.
    pub index_version: u32,
    pub policy_version: Option<String>,
    pub active_consents: i64,
}

/// A record a lookup matched, with its account state.
#[derive(Debug, Clone)]
pub struct LookupMatch {
    pub record_id: RecordId,
    pub account: AccountState,
}

/// One entry of an account's history.
#[derive(Debug, Clone)]
pub struct AccountEventRow {
    pub event_id: AccountEventId,
    pub record_id: RecordId,
    pub occurred_at: Micros,
    /// SUSPENDED, REINSTATED, CONSENT_RECORDED or CONSENT_REVOKED.
    pub kind: String,
    pub actor: String,
    pub reason: Option<String>,
    /// Sealed under the record's data key.
    pub note: Option<Vec<u8>>,
    pub ticket: Option<String>,
    pub consent_id: Option<ConsentId>,
}

/// A guardian's consent for a minor.
#[derive(Debug, Clone)]
pub struct ConsentRow {
    pub consent_id: ConsentId,
    pub record_id: RecordId,
    pub guardian_record_id: Option<RecordId>,
    /// A guardian without a record: their identity sealed under the minor's data key.
    pub guardian_sealed: Option<Vec<u8>>,
    pub relationship: String,
    pub evidence_ref: String,
    pub policy_version: String,
    pub granted_at: Micros,
    pub granted_by: String,
}

/// Every ciphertext sealed under a record's data key outside its fields: staff notes of its
/// account events (by event id) and identities of guardians given inline for it (by consent
/// id). Re-keying moves all of them; whatever is sealed under a record key later belongs
/// here too, so that no re-key leaves it under a destroyed key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundCiphertexts {
    pub notes: Vec<(String, Vec<u8>)>,
    pub guardians: Vec<(String, Vec<u8>)>,
}

/// A record's ciphertexts re-sealed under a fresh data key, and that key wrapped.
#[derive(Debug)]
pub struct RecordRekey {
    pub record_id: RecordId,
    pub expected_version: i64,
    pub updated_at: Micros,
    pub wrapped_key: Vec<u8>,
    pub kek_version: u32,
    pub fields: Vec<SealedField>,
    /// The record's other ciphertexts as read before re-sealing...
    pub bound: BoundCiphertexts,
    /// ...and re-sealed, in the same order. The write replaces each only if it is still what
    /// was read, and refuses (`VersionConflict`) if the record has any it did not re-seal.
    pub resealed: BoundCiphertexts,
}

/// Replaces a record's sealed fields and indexes if its version is still `expected_version`.
#[derive(Debug)]
pub struct RecordUpdate {
    pub record_id: RecordId,
    pub expected_version: i64,
    pub updated_at: Micros,
    pub indexes: RecordIndexes,
    pub fields: Vec<SealedField>,
    /// Sealed under the state key of `indexes.version`.
    pub age_gate: Option<Vec<u8>>,
    /// `None` keeps the accepted policy version as it is.
    pub policy_version: Option<String>,
    /// Let the write through a suspension (the account-security role).
    pub override_suspension: bool,
}

/// Filters of an audit listing; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub record_id: Option<RecordId>,
    pub caller: Option<String>,
    pub purpose: Option<String>,
    pub outcome: Option<String>,
    /// Inclusive lower and exclusive upper bound on `occurred_at`.
    pub from: Option<Micros>,
    pub to: Option<Micros>,
    /// Only events that released plaintext; needs `caller` (the breach question).
    pub plaintext_only: bool,
    pub limit: u32,
    /// Keyset cursor: continue after this (occurred_at, event_id), newest first.
    pub after: Option<(Micros, String)>,
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

/// Key administration of one kind (`kek` or `index`) inside one write transaction that
/// holds the kind's key-admin lock from [`Store::key_admin`] until [`KeyAdminTx::commit`]
/// (dropped without a commit, it rolls back). The key layer runs its steps and calls its
/// key provider between them: material is created before the state that names it commits,
/// and erased before the state that says so. On SQLite the transaction holds the writer
/// thread (and with it the write lock); on PostgreSQL it holds the kind's row lock.
#[async_trait]
pub trait KeyAdminTx: Send {
    /// The active version, read under the lock: a rotation that committed while this one
    /// waited is visible.
    async fn active(&mut self) -> Result<Option<u32>, StoreError>;
    /// A version's state (`NotFound` when there is no such version).
    async fn state(&mut self, version: u32) -> Result<String, StoreError>;
    /// One more than the highest version of the kind.
    async fn next_version(&mut self) -> Result<u32, StoreError>;
    /// Live records the version still wraps (KEKs) or indexes (index keys).
    async fn records_under(&mut self, version: u32) -> Result<i64, StoreError>;
    async fn set_state(&mut self, version: u32, state: &str) -> Result<(), StoreError>;
    async fn insert(
        &mut self,
        version: u32,
        state: &str,
        provider: &str,
        now: Micros,
    ) -> Result<(), StoreError>;
    async fn retire(&mut self, version: u32, now: Micros) -> Result<(), StoreError>;
    async fn destroy(&mut self, version: u32, now: Micros) -> Result<(), StoreError>;
    /// How many versions of the kind the database knows (none before the first start after
    /// the key-lifecycle migration, when the key layer seeds them under this lock, so
    /// concurrent first starts agree: the first wins).
    async fn known_versions(&mut self) -> Result<i64, StoreError>;
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// An open key-administration transaction.
pub type KeyAdmin = Box<dyn KeyAdminTx>;

/// Re-wraps one data key for a record under the target version; `None` when it cannot be
/// unwrapped (the record is left as it is and counted as failed).
pub type RewrapFn<'a> = dyn Fn(&RecordId, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'a;

/// A live record under an older index version, as a re-index batch reads it: still
/// sealed. `fields` holds only what indexes are computed from (`id_type`, `id_number`,
/// `phone`).
#[derive(Debug)]
pub struct ReindexRow {
    pub record_id: RecordId,
    pub index_version: u32,
    pub wrapped_key: Vec<u8>,
    pub fields: Vec<SealedField>,
    pub age_gate: Option<Vec<u8>>,
}

/// A record's blind indexes and age gate re-computed under the target index version.
#[derive(Debug)]
pub struct Reindexed {
    pub document_index: Option<Vec<u8>>,
    pub phone_index: Option<Vec<u8>>,
    pub age_gate: Option<Vec<u8>>,
}

/// Re-computes one record's indexes; `None` when it cannot (left as it is, counted failed).
pub type ReindexFn<'a> = dyn Fn(&ReindexRow) -> Option<Reindexed> + Send + Sync + 'a;

/// Who runs a rewrap job: the instance (its checkpoint signer id, stable across restarts;
/// `None` when the vault has no signer) and this process (its audit chain id, new at every
/// start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOwner {
    pub instance: Option<String>,
    pub process: String,
}

/// A rewrap job as `keys status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapJobRow {
    pub job_id: JobId,
    /// RUNNING, DONE, FAILED, CANCELLED or INTERRUPTED.
    pub state: String,
    pub target_version: i64,
    pub target_index_version: Option<i64>,
    pub started_at: Micros,
    pub updated_at: Micros,
    pub rewrapped: i64,
    pub reindexed: i64,
    pub failed: i64,
    pub owner_instance: Option<String>,
}

/// What one rewrap batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewrapBatch {
    /// Rows the batch looked at; zero means the pass is over.
    pub selected: usize,
    pub rewrapped: u64,
    pub failed: u64,
    /// Where the next batch of this pass starts.
    pub last_record_id: Option<RecordId>,
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

    /// Inserts a batch's records in ONE transaction (one commit), in order, each with its
    /// request key, with the decisions of [`Store::insert_record`]: an item refused (a
    /// duplicate document, an earlier item's included; a stale key or index version) writes
    /// nothing and is its `Err` (PostgreSQL: each item under its own savepoint; SQLite: every
    /// check before the item's first write, ARCHITECTURE.md); an item
    /// repeating an earlier item's request key replays it. The batch's creates are audited
    /// by ONE event, `audit` with its `record_ids` set to the records inserted (in item
    /// order), appended in the same transaction after the items (none when nothing was
    /// inserted): each person's trail shows it, as it shows a batch read's. The outer
    /// `Err`: the transaction did not commit, and nothing of the batch was written.
    async fn insert_records(
        &self,
        items: Vec<BatchInsert>,
        audit: AuditEvent,
    ) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError>;

    /// A live record, or `None` when it never existed or was deleted.
    async fn get_record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>, StoreError>;

    /// [`Store::get_record`] of each of `record_ids` (distinct), in their order, read by one
    /// statement, with only the fields named in `fields` (a batch read's records: the fields
    /// it would not open are not decoded or copied, and `meta.present_fields` lists only
    /// those returned).
    async fn get_records(
        &self,
        record_ids: &[RecordId],
        fields: &[&'static str],
    ) -> Result<Vec<Option<StoredRecord>>, StoreError>;

    /// Up to `limit` live records created at or before `created_before`, whose ids sort
    /// after `after`, in id order, each read as [`Store::get_record`] reads one except that
    /// only the fields named in `fields` are returned (in `fields` and `meta.present_fields`;
    /// a record holding none of them is still returned, with none): the keyset scan of an
    /// export, whose passes each use a few of a record's fields.
    async fn scan_live_records(
        &self,
        after: Option<&RecordId>,
        created_before: Micros,
        limit: u32,
        fields: &[&str],
    ) -> Result<Vec<StoredRecord>, StoreError>;

    /// Replaces a live record's fields and indexes, with its audit event, atomically.
    async fn update_record(
        &self,
        update: RecordUpdate,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError>;

    /// Crypto-shreds a live record: removes its wrapped key, ciphertexts, indexes, sealed
    /// guardian identities and the fingerprints of the create requests that made it, keeps a
    /// tombstone, and writes the audit event in the same transaction. A suspended record is refused (`Suspended`) unless `override_suspension`.
    async fn delete_record(
        &self,
        record_id: &RecordId,
        deleted_at: Micros,
        override_suspension: bool,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Live records whose document blind index is one of `indexes` (the same document
    /// under each live index version), in one statement so one snapshot answers.
    async fn find_by_document(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError>;

    /// Live records whose phone blind index is one of `indexes`, in record-id order.
    async fn find_by_phone(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError>;

    /// The account state of a record (live or deleted); reads no identity.
    async fn account_state(&self, record_id: &RecordId)
    -> Result<Option<AccountState>, StoreError>;

    /// Suspends (`true`) or reinstates a live record, with its history entry and audit event.
    /// `Ok(false)` when it already was in that state (nothing written). `sealed_under`: the
    /// wrapped data key the entry's note is sealed under; the write is refused
    /// (`VersionConflict`) if the record no longer has it (it was re-keyed meanwhile).
    async fn set_suspended(
        &self,
        record_id: &RecordId,
        suspended: bool,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError>;

    /// An account's history, oldest first, after the (occurred_at, event_id) cursor.
    async fn list_account_events(
        &self,
        record_id: &RecordId,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<AccountEventRow>, StoreError>;

    /// Records a consent with its history entry and audit event. `sealed_under`: as for
    /// [`Store::set_suspended`], for an inline guardian's sealed identity.
    async fn insert_consent(
        &self,
        consent: &ConsentRow,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;

    /// Revokes one active consent, or all of them when `consent_id` is `None`; writes one
    /// history entry per revoked consent (`history` naming the consent, the first under its
    /// id, each further one under a fresh id) and the audit event.
    async fn revoke_consents(
        &self,
        record_id: &RecordId,
        consent_id: Option<&ConsentId>,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<Vec<ConsentId>, StoreError>;

    /// A record's ciphertexts outside its fields (see [`BoundCiphertexts`]).
    async fn bound_ciphertexts(&self, record_id: &RecordId)
    -> Result<BoundCiphertexts, StoreError>;

    /// Removes create request keys stored before `before`; returns how many.
    async fn expire_create_requests(&self, before: Micros) -> Result<u64, StoreError>;

    /// How many audit chains a process spreads the events of its writes over. A write's
    /// event is appended inside the write's own transaction, which on PostgreSQL holds the
    /// chain's head row until it commits: on one chain every write of the process waits for
    /// the commit of the one before it. SQLite's one writer commits them together anyway.
    fn write_chains(&self) -> usize {
        1
    }

    /// Starts this process's audit chain at its genesis hash.
    async fn register_chain(
        &self,
        chain_id: &ChainId,
        started_at: Micros,
        genesis: &[u8],
    ) -> Result<(), StoreError>;

    /// Durably appends audit events, linked into their chain, in one transaction (one flush
    /// however many events: the group commit).
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError>;

    /// Audit events matching `query`, newest first.
    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredEvent>, StoreError>;

    /// Events that released fields of `record_id` under one of `purposes`, newest first.
    async fn list_disclosures(
        &self,
        record_id: &RecordId,
        purposes: &[String],
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Every chain known: registered, with events, or expired. Text, not [`ChainId`]s, as
    /// [`Store::chain_events`] takes: these are what verification walks, and a chain id
    /// edited in the database must show up as a chain whose hashes do not link (the id is
    /// in its genesis and every event hash), not as a row that fails to decode.
    async fn chain_ids(&self) -> Result<Vec<String>, StoreError>;

    /// Heads of all registered chains.
    async fn chain_heads(&self) -> Result<Vec<ChainHead>, StoreError>;

    /// Up to `limit` events of `chain_id` after `after_seq`, in sequence order.
    async fn chain_events(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError>;

    /// Every checkpoint, both formats, oldest first.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;

    /// The chained checkpoint of `signer` (this instance) with the highest counter.
    async fn latest_checkpoint(&self, signer: &SignerId) -> Result<Option<Checkpoint>, StoreError>;

    /// How many checkpoints `signer` (this instance) has in the database.
    async fn count_checkpoints(&self, signer: &SignerId) -> Result<i64, StoreError>;

    /// Whether any chained (format-2) checkpoint exists: none means the database predates
    /// them, and the first signer adopts the chains already there.
    async fn has_chained_checkpoints(&self) -> Result<bool, StoreError>;

    async fn expiry_markers(&self) -> Result<Vec<ExpiryMarker>, StoreError>;

    /// Deletes the chain's events up to the marker's sequence and records the marker, in
    /// one transaction.
    async fn expire_chain_prefix(&self, marker: &ExpiryMarker) -> Result<u64, StoreError>;

    /// Round trip to the database, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Closes the pool on shutdown, after the last call: waits for checked-out connections
    /// to come back, then closes them all so the database sees an orderly goodbye.
    async fn close(&self);
    /// Opens a key-administration transaction for `kind`, holding its lock.
    async fn key_admin(&self, kind: &str) -> Result<KeyAdmin, StoreError>;

    /// The active version of `kind`, if any.
    async fn active_key_version(&self, kind: &str) -> Result<Option<u32>, StoreError>;

    /// Every version of `kind` and its state, oldest first; cheap (counts nothing).
    async fn key_version_states(&self, kind: &str) -> Result<Vec<(u32, String)>, StoreError>;

    /// Every version of `kind`, oldest first, with the records each wraps.
    async fn key_versions(&self, kind: &str) -> Result<Vec<KeyVersionRow>, StoreError>;

    /// Starts a rewrap job's progress row, owned by `owner` with a lease until
    /// `lease_until`.
    async fn start_rewrap_job(
        &self,
        job_id: &JobId,
        target: u32,
        owner: &JobOwner,
        now: Micros,
        lease_until: Micros,
    ) -> Result<(), StoreError>;

    /// Extends a running job's lease; `false` when the job is no longer running.
    async fn renew_rewrap_lease(
        &self,
        job_id: &JobId,
        lease_until: Micros,
    ) -> Result<bool, StoreError>;

    /// Marks INTERRUPTED every RUNNING job whose owner is gone, as seen by `me` at `now`
    /// (see [`queries::INTERRUPT_ABANDONED_JOBS`]); a job without a lease counts as leased
    /// for `legacy_lease` after its last progress. Returns how many were marked.
    async fn interrupt_abandoned_jobs(
        &self,
        me: &JobOwner,
        now: Micros,
        legacy_lease: Micros,
    ) -> Result<u64, StoreError>;

    /// The newest `limit` rewrap jobs, newest first.
    async fn rewrap_jobs(&self, limit: i64) -> Result<Vec<RewrapJobRow>, StoreError>;

    /// Rewraps up to `limit` live records under a version older than `target`, with ids
    /// after `after`, in one transaction that also advances the job's counters. Rows another
    /// job or a writer holds are skipped, not waited for.
    async fn rewrap_batch(
        &self,
        job_id: &JobId,
        target: u32,
        after: Option<&RecordId>,
        limit: i64,
        now: Micros,
        rewrap: &RewrapFn<'_>,
    ) -> Result<RewrapBatch, StoreError>;

    /// Live records whose key is wrapped under a version older than `target`.
    async fn count_older_than(&self, target: u32) -> Result<i64, StoreError>;

    /// Re-indexes up to `limit` live records under an index version older than `target`,
    /// with ids after `after`, in one transaction that also advances the job's counters.
    /// Each update is a compare-and-swap on the record's version and index version; rows
    /// another job or a writer holds are skipped.
    async fn reindex_batch(
        &self,
        job_id: &JobId,
        target: u32,
        after: Option<&RecordId>,
        limit: i64,
        now: Micros,
        reindex: &ReindexFn<'_>,
    ) -> Result<RewrapBatch, StoreError>;

    /// Live records whose blind indexes are under an index version older than `target`.
    async fn count_index_older_than(&self, target: u32) -> Result<i64, StoreError>;

    /// Closes a rewrap job with its final state.
    async fn finish_rewrap_job(
        &self,
        job_id: &JobId,
        state: &str,
        now: Micros,
    ) -> Result<(), StoreError>;

    /// Gives a live record a new data key: replaces its wrapped key and every ciphertext
    /// bound to it (fields and [`BoundCiphertexts`]) if its version is still
    /// `expected_version`, re-checking that `kek_version` is active.
    async fn rekey_record(
        &self,
        rekey: RecordRekey,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError>;

    /// Up to `limit` live records whose retention deadline is at or before `now`.
    async fn expired_records(&self, now: Micros, limit: i64) -> Result<Vec<RecordId>, StoreError>;

    /// A job's (rewrapped, failed) counters and state.
    async fn rewrap_job(&self, job_id: &JobId) -> Result<Option<(i64, i64, String)>, StoreError>;
}

impl StoreError {
    /// Whether the database refused the data of a write (a value it cannot store, a broken
    /// constraint), as opposed to being unreachable or failing as a whole: the same data
    /// fails again, while other data in the same batch may well succeed. The audit writer
    /// isolates such an event instead of failing its whole group commit.
    pub fn is_refused_data(&self) -> bool {
        match self {
            StoreError::Postgres(sqlx::Error::Database(error)) => {
                // SQLSTATE classes 22 (data exception, e.g. a NUL byte in text), 23
                // (integrity constraint) and 54 (program limit exceeded).
                !matches!(error.kind(), sqlx::error::ErrorKind::Other)
                    || error
                        .code()
                        .is_some_and(|code| ["22", "23", "54"].iter().any(|c| code.starts_with(c)))
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(error, _)) => matches!(
                error.code,
                rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::TypeMismatch
            ),
            _ => false,
        }
    }
}

pub(crate) fn present_fields(fields: &[SealedField]) -> Vec<String> {
    fields.iter().map(|f| f.field.clone()).collect()
}

pub(crate) fn encode_json_list<T: serde::Serialize>(items: &T) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}
