//! The vault's use cases, independent of gRPC. This is where the policy meets the data.
//! `Vault` is defined here with what every use case shares (the call context, errors,
//! audit events); the use cases live beside it by aggregate, each file an `impl Vault`:
//!
//! - `records.rs`: create, read for a purpose, update, delete, find; etags.
//! - `batch.rs`, `export.rs`: the many-records calls (`BatchGetRecords`,
//!   `BatchCreateRecords`; the k-anonymous `ExportRecords`).
//! - `accounts.rs`: account state (suspension, minors, consent, policy versions) and the
//!   release gate every read passes.
//! - `trail.rs`: reads of the audit trail; `decisions.rs`: every decision audited.
//! - `lifecycle.rs`: record keys (re-keying) and retention (purge).
//! - `key_admin.rs`: key administration (rotate, rewrap, retire, destroy), with the rewrap
//!   job (`rewrap.rs`) and its re-index pass (`reindex.rs`).
//!
//! One pattern, one exception: key administration is [`key_admin::KeyAdmin`], a handle
//! holding an `Arc<Vault>` and nothing else, rather than `impl Vault` methods, because
//! `RewrapRecords` starts a job that outlives the call and needs its own `Arc<Vault>`, which
//! a `&self` method does not have. It uses the same call context, audit log, keys and
//! refusal auditing as every other use case here; read it as one more aggregate.
//!
//! Order of operations on a read is the heart of the design: the request's strings are
//! checked (`crate::domain::edge`), grants are checked, then the record is opened, the release
//! computed, the audit event durably committed, and only then is anything returned. If the
//! audit write fails, nothing is released ([`VaultError::AuditUnavailable`]). Every refusal
//! is audited too, with checked values only (see `decisions.rs`).
//!
//! Plaintext exists here only transiently, inside buffers that wipe themselves, and never
//! in an error: every error variant carries field names and reasons, not values.

use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, NaiveDate, Utc};

use crate::audit::{AuditEvent, AuditLog, CheckpointSigner};
use crate::crypto::{CryptoError, EtagKey};
use crate::domain::ids::{EventId, RecordId};
use crate::domain::{FieldName, IdType, Violation};
use crate::keys::{KeyError, KeyManager};
use crate::policy::retention::Retention;
use crate::policy::{Caller, Grant, Policy, ReleaseLevel, Rpc};
use crate::store::{Micros, Store, StoreError};
use crate::vault::accounts::AccountRules;

pub mod accounts;
mod batch;
mod decisions;
mod export;
pub mod key_admin;
mod lifecycle;
mod records;
pub mod reindex;
pub mod rewrap;
mod trail;

pub use batch::CreateItem;
pub use decisions::{AuditSubject, refusal_reason as refusal_outcome};
pub use export::{ExportItem, ExportRequest, ExportStream, ExportSummary};
pub use records::expire_request_ids_periodically;
pub use trail::{AuditFilters, TimeBound};

/// Request ids of creates answer retries for 24 hours unless configured otherwise.
const DEFAULT_REQUEST_ID_TTL_MICROS: Micros = 24 * 3_600 * 1_000_000;
/// How often a write or lookup catches up with a key rotation another instance made before
/// it gives up (one is the norm; more means rotations are racing it).
const KEY_REFRESH_ATTEMPTS: u32 = 3;
/// `limits.max_batch_size` unless configured.
const DEFAULT_MAX_BATCH_SIZE: usize = 100;
/// Label of the etag key derived from the keyring (see [`EtagKey`]).
const ETAG_KEY_LABEL: &[u8] = b"pdvault.etag-key.v1";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<Violation>),
    #[error("caller may not call {0}")]
    OperationNotGranted(&'static str),
    /// The message does not repeat the purpose: it may be anything the caller typed.
    #[error("the purpose is unknown or not granted to this caller")]
    PurposeNotGranted,
    #[error("record not found")]
    NotFound,
    /// A retried create whose record has been deleted since.
    #[error("the record this request id created has been deleted")]
    RecordDeleted,
    #[error("a live record already holds this identity document")]
    DuplicateIdentity,
    #[error("etag does not match the record's current version")]
    EtagMismatch,
    #[error("the account is suspended")]
    AccountSuspended,
    #[error("the person is a minor and no guardian consent is on record")]
    GuardianConsentRequired,
    #[error("the guardian is not an adult, or their age cannot be established")]
    GuardianNotAdult,
    #[error("the person is not a minor")]
    NotAMinor,
    /// The purpose is granted but not configured for exports.
    #[error("the purpose does not allow exports")]
    ExportNotAllowed,
    /// What an export would release or suppress changed since it began (records, their
    /// classes or gates, the pseudonym key, k): resuming would mix two data sets.
    #[error("the data changed since the export began; start it again")]
    ExportChanged,
    #[error("stored data failed authentication; refusing to release it")]
    DataLoss,
    #[error("the audit trail cannot be written; nothing is released")]
    AuditUnavailable,
    #[error("storage unavailable: {0}")]
    Storage(#[source] StoreError),
    #[error("keys: {0}")]
    Key(#[source] KeyError),
    /// A cipher or the random number generator failed; a stored ciphertext that does not
    /// authenticate is [`VaultError::DataLoss`] instead.
    #[error("crypto: {0}")]
    Crypto(#[source] CryptoError),
    /// A blocking task the call waited for panicked or was cancelled.
    #[error("a blocking task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// A value the vault builds itself could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[source] serde_json::Error),
    /// A bug: something the code relies on did not hold. Says what, never a value.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl VaultError {
    /// The reason clients see in this error's ErrorInfo (`grpc/status.rs` picks the code
    /// and builds the status) and the one a refused call's audit event records
    /// (`decisions.rs`; an invalid argument's event names the fields instead): written once,
    /// here, so the two cannot drift apart.
    pub fn reason(&self) -> &'static str {
        use VaultError as E;
        match self {
            E::InvalidArgument(_) => "FIELD_INVALID",
            E::OperationNotGranted(_) => "OPERATION_NOT_GRANTED",
            E::PurposeNotGranted => "PURPOSE_NOT_GRANTED",
            E::NotFound => "RECORD_NOT_FOUND",
            E::RecordDeleted => "RECORD_DELETED",
            E::DuplicateIdentity => "DUPLICATE_IDENTITY",
            E::EtagMismatch => "ETAG_MISMATCH",
            E::AccountSuspended => "ACCOUNT_SUSPENDED",
            E::GuardianConsentRequired => "GUARDIAN_CONSENT_REQUIRED",
            E::GuardianNotAdult => "GUARDIAN_NOT_ADULT",
            E::NotAMinor => "NOT_A_MINOR",
            E::ExportNotAllowed => "EXPORT_NOT_ALLOWED",
            E::ExportChanged => "EXPORT_CHANGED",
            E::DataLoss => "CIPHERTEXT_INVALID",
            E::AuditUnavailable => "AUDIT_UNAVAILABLE",
            E::Storage(_) => "STORAGE_UNAVAILABLE",
            E::Key(error) => error.reason(),
            E::Crypto(_) | E::Task(_) | E::Encode(_) | E::Internal(_) => "INTERNAL",
        }
    }
}

/// The reason of the [`VaultError`] a [`StoreError`] becomes, for errors that carry the
/// store's error itself (a rewrap job's).
pub(crate) fn store_reason(error: &StoreError) -> &'static str {
    match error {
        StoreError::NotFound => VaultError::NotFound.reason(),
        StoreError::DuplicateDocument => VaultError::DuplicateIdentity.reason(),
        StoreError::VersionConflict => VaultError::EtagMismatch.reason(),
        StoreError::Suspended => VaultError::AccountSuspended.reason(),
        _ => "STORAGE_UNAVAILABLE",
    }
}

impl From<StoreError> for VaultError {
    fn from(error: StoreError) -> VaultError {
        match error {
            StoreError::NotFound => VaultError::NotFound,
            StoreError::DuplicateDocument => VaultError::DuplicateIdentity,
            StoreError::VersionConflict => VaultError::EtagMismatch,
            StoreError::Suspended => VaultError::AccountSuspended,
            other => VaultError::Storage(other),
        }
    }
}

impl From<Violation> for VaultError {
    fn from(violation: Violation) -> VaultError {
        VaultError::InvalidArgument(vec![violation])
    }
}

impl From<KeyError> for VaultError {
    fn from(error: KeyError) -> VaultError {
        match error {
            KeyError::Crypto(error) => error.into(),
            KeyError::Store(error) => error.into(),
            other => VaultError::Key(other),
        }
    }
}

impl From<CryptoError> for VaultError {
    fn from(error: CryptoError) -> VaultError {
        match error {
            CryptoError::Integrity => VaultError::DataLoss,
            other => VaultError::Crypto(other),
        }
    }
}

fn describe_violations(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn violation(field: &str, reason: &'static str) -> VaultError {
    VaultError::InvalidArgument(vec![Violation::at(field, reason)])
}

/// Wall-clock time, injectable so tests can stand on any date.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Who is asking, from where: everything about a call except its arguments.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub caller: Arc<Caller>,
    /// The policy the caller was authenticated against; the whole call is judged by it even
    /// if a reload swaps in another meanwhile.
    pub policy: Arc<Policy>,
    pub peer: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
}

/// A released field: the value at the level the purpose allows.
#[derive(Clone)]
pub struct ReleasedValue {
    pub value: String,
    pub level: ReleaseLevel,
}

pub struct Release {
    pub record_id: RecordId,
    pub etag: String,
    pub fields: Vec<(FieldName, ReleasedValue)>,
}

/// What `FindRecords` looks up by.
pub enum LookupKey {
    Document {
        id_type: Option<IdType>,
        id_number: String,
    },
    Phone(String),
}

pub struct Vault {
    pub(crate) store: Arc<dyn Store>,
    /// Makes and checks etags; derived from the keyring, so every instance agrees.
    etags: EtagKey,
    /// How long a create's request id keeps answering retries; `None`: until deleted.
    request_id_ttl: Option<Micros>,
    pub(crate) keys: Arc<KeyManager>,
    /// Swapped whole by a live reload; calls take a snapshot when they authenticate.
    policy: ArcSwap<Policy>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) audit: AuditLog,
    /// Suspension, minors and policy-version rules; swapped whole by a live reload.
    rules: ArcSwap<AccountRules>,
    retention: Retention,
    /// This instance's checkpoint signer; its sink, when a file, is the witness verification
    /// reads.
    checkpoint_signer: Option<Arc<CheckpointSigner>>,
    /// `limits.max_batch_size`, which a live reload changes.
    max_batch_size: std::sync::atomic::AtomicUsize,
    /// Seals and opens export cursors; derived from the keyring, so every instance agrees.
    export_cursors: export::CursorKey,
    /// The background tasks the vault's use cases start (rewrap jobs, export streams) and
    /// the application's periodic ones; cancelled first at shutdown (`crate::tasks`).
    tasks: crate::tasks::Tasks,
}

impl Vault {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<KeyManager>,
        policy: Arc<Policy>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        rules: AccountRules,
    ) -> Vault {
        let etags = EtagKey::new(
            keys.audit_signing().derive_key(ETAG_KEY_LABEL),
            keys.index_suite(),
        );
        let export_cursors = export::CursorKey::new(&keys);
        Vault {
            store,
            etags,
            max_batch_size: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_BATCH_SIZE),
            export_cursors,
            request_id_ttl: Some(DEFAULT_REQUEST_ID_TTL_MICROS),
            keys,
            policy: ArcSwap::new(policy),
            clock,
            audit,
            rules: ArcSwap::from_pointee(rules),
            retention: Retention::default(),
            checkpoint_signer: None,
            tasks: crate::tasks::Tasks::new(),
        }
    }

    /// The background tasks that stop first at shutdown (see [`crate::tasks`]).
    pub fn tasks(&self) -> &crate::tasks::Tasks {
        &self.tasks
    }

    /// Sets the signer of this instance's audit checkpoints.
    pub fn with_checkpoint_signer(mut self, signer: Arc<CheckpointSigner>) -> Vault {
        self.checkpoint_signer = Some(signer);
        self
    }

    pub fn checkpoint_signer(&self) -> Option<&Arc<CheckpointSigner>> {
        self.checkpoint_signer.as_ref()
    }

    /// Sets the retention rules records get their deadlines from (none by default).
    pub fn with_retention(mut self, retention: Retention) -> Vault {
        self.retention = retention;
        self
    }

    /// Sets how long a create's request id answers retries (`None`: until its record is
    /// deleted).
    pub fn with_request_id_ttl(mut self, ttl: Option<std::time::Duration>) -> Vault {
        self.request_id_ttl = ttl.map(|ttl| i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        self
    }

    /// Puts `limits.max_batch_size` in force (at start and on a live reload).
    pub fn set_max_batch_size(&self, max: usize) {
        self.max_batch_size
            .store(max.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn max_batch_size(&self) -> usize {
        self.max_batch_size
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force for every call that authenticates from now on.
    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    /// The account rules (suspension, minors, privacy-policy version) in force now.
    pub(crate) fn rules(&self) -> Arc<AccountRules> {
        self.rules.load_full()
    }

    /// Puts `rules` in force for every decision from now on (a live reload).
    pub fn replace_rules(&self, rules: AccountRules) {
        self.rules.store(Arc::new(rules));
    }

    pub fn keys(&self) -> &Arc<KeyManager> {
        &self.keys
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Who owns the jobs this process runs: the instance (its checkpoint signer) and this
    /// process (its audit chain).
    pub fn job_owner(&self) -> crate::store::JobOwner {
        crate::store::JobOwner {
            instance: self
                .checkpoint_signer()
                .map(|signer| signer.signer().to_string()),
            process: self.audit().chain_id().to_string(),
        }
    }

    pub(crate) fn now_micros(&self) -> Micros {
        self.clock.now().timestamp_micros()
    }

    /// Today's date where birthdays turn over (the configured zone, Asia/Shanghai by default).
    pub(crate) fn today(&self) -> NaiveDate {
        self.clock
            .now()
            .with_timezone(&self.rules().zone)
            .date_naive()
    }

    pub(crate) fn authorize(&self, ctx: &CallContext, rpc: Rpc) -> Result<(), VaultError> {
        if ctx.caller.may_call(rpc) {
            Ok(())
        } else {
            Err(VaultError::OperationNotGranted(rpc.as_str()))
        }
    }

    /// Records an operator action that has no call of its own behind it (a signal, a job)
    /// or that happens outside the Vault services (a policy reload).
    pub(crate) async fn audit_operation(
        &self,
        actor: &str,
        operation: &str,
        outcome: &str,
        reason: Option<String>,
    ) -> Result<(), VaultError> {
        let event = AuditEvent {
            event_id: EventId::generate().into_string(),
            occurred_at: self.now_micros(),
            chain_id: self.audit.chain_id().to_string(),
            caller: actor.to_owned(),
            peer: None,
            rpc: operation.to_owned(),
            record_ids: Vec::new(),
            purpose: None,
            justification: None,
            released: Vec::new(),
            outcome: outcome.to_owned(),
            reason,
            request_id: None,
            trace_id: None,
        };
        self.audit
            .record(event)
            .await
            .map_err(|_| VaultError::AuditUnavailable)
    }

    pub(crate) fn require_grant(&self, ctx: &CallContext, grant: Grant) -> Result<(), VaultError> {
        if ctx.caller.has_grant(grant) {
            Ok(())
        } else {
            Err(VaultError::OperationNotGranted(grant.as_str()))
        }
    }

    pub(crate) fn event(
        &self,
        ctx: &CallContext,
        rpc: &str,
        record_ids: Vec<String>,
        outcome: &str,
        reason: Option<String>,
    ) -> AuditEvent {
        AuditEvent {
            event_id: EventId::generate().into_string(),
            occurred_at: self.now_micros(),
            // A write appends it in its own transaction, on one of the process's write
            // chains; handed to the audit writer it joins the process's own chain instead.
            chain_id: self.audit.write_chain().to_string(),
            caller: ctx.caller.name.clone(),
            peer: ctx.peer.clone(),
            rpc: rpc.to_owned(),
            record_ids,
            purpose: None,
            justification: None,
            released: Vec::new(),
            outcome: outcome.to_owned(),
            reason,
            request_id: ctx.request_id.clone(),
            trace_id: ctx.trace_id.clone(),
        }
    }
}

pub(crate) fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}
