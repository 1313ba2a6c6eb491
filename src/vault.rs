//! The vault's use cases, independent of gRPC: create, read for a purpose, update, delete,
//! find, and reading the audit trail. This is where the policy meets the data. Account
//! state (suspension, minors, consent) extends [`Vault`] from `crate::accounts`.
//!
//! Order of operations on a read is the heart of the design: grant checks first, then the
//! record is opened, the release computed, the audit event durably committed, and only then
//! is anything returned. If the audit write fails, nothing is released
//! ([`VaultError::AuditUnavailable`]). Denials are audited too, on a best-effort basis: a
//! denial releases nothing, so failing to record it must not turn it into an outage.
//!
//! Plaintext exists here only transiently, inside buffers that wipe themselves, and never
//! in an error: every error variant carries field names and reasons, not values.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, NaiveDate, Utc};
use zeroize::Zeroizing;

use crate::accounts::AccountRules;
use crate::audit::{AuditEvent, AuditLog, CheckpointSigner, StoredEvent, VerifyReport, Witness};
use crate::crypto::{BlindIndexKey, CryptoError, DataKey, PseudonymKey};
use crate::domain::{
    FieldName, IdDocument, IdType, Identity, IdentityInput, PhoneNumber, Violation, generalize,
    mask,
};
use crate::keys::{KeyError, KeyManager};
use crate::policy::{Caller, Grant, Policy, Purpose, ReleaseLevel, Rpc};
use crate::retention::Retention;
use crate::store::{
    AuditQuery, CreateRequestKey, InsertOutcome, LookupMatch, Micros, NewRecord, RecordIndexes,
    RecordMeta, RecordUpdate, SealedField, Store, StoreError,
};

mod lifecycle;

const MAX_REQUEST_ID_LEN: usize = 128;
const MAX_FREE_TEXT_LEN: usize = 512;
const RECORD_ID_PREFIX: &str = "rec_";
const MAX_POLICY_VERSION_LEN: usize = 64;
/// How often a write or lookup catches up with a key rotation another instance made before
/// it gives up (one is the norm; more means rotations are racing it).
const KEY_REFRESH_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<Violation>),
    #[error("caller may not call {0}")]
    OperationNotGranted(&'static str),
    #[error("purpose {0:?} is not granted to this caller")]
    PurposeNotGranted(String),
    #[error("record not found")]
    NotFound,
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
    #[error("stored data failed authentication; refusing to release it")]
    DataLoss,
    #[error("the audit trail cannot be written; nothing is released")]
    AuditUnavailable,
    #[error("storage unavailable: {0}")]
    Storage(StoreError),
    #[error("keys: {0}")]
    Key(KeyError),
    #[error("internal error: {0}")]
    Internal(String),
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
            other => VaultError::Internal(other.to_string()),
        }
    }
}

fn describe_violations(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn violation(field: &str, reason: &str) -> VaultError {
    VaultError::InvalidArgument(vec![Violation {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }])
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
    pub record_id: String,
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
    pub(crate) keys: Arc<KeyManager>,
    /// Swapped whole by a live reload; calls take a snapshot when they authenticate.
    policy: ArcSwap<Policy>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) audit: AuditLog,
    /// Suspension, minors and policy-version rules.
    pub(crate) rules: AccountRules,
    retention: Retention,
    /// This instance's checkpoint signer; its sink, when a file, is the witness verification
    /// reads.
    checkpoint_signer: Option<Arc<CheckpointSigner>>,
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
        Vault {
            store,
            keys,
            policy: ArcSwap::new(policy),
            clock,
            audit,
            rules,
            retention: Retention::default(),
            checkpoint_signer: None,
        }
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

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force for every call that authenticates from now on.
    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
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

    pub(crate) fn now_micros(&self) -> Micros {
        self.clock.now().timestamp_micros()
    }

    /// Today's date where birthdays turn over (the configured zone, Asia/Shanghai by default).
    pub(crate) fn today(&self) -> NaiveDate {
        self.clock
            .now()
            .with_timezone(&self.rules.zone)
            .date_naive()
    }

    pub(crate) fn authorize(&self, ctx: &CallContext, rpc: Rpc) -> Result<(), VaultError> {
        if ctx.caller.may_call(rpc) {
            Ok(())
        } else {
            Err(VaultError::OperationNotGranted(rpc.as_str()))
        }
    }

    pub async fn create_record(
        &self,
        ctx: &CallContext,
        input: IdentityInput,
        request_id: Option<String>,
        policy_version: Option<String>,
        retention_days: Option<u32>,
    ) -> Result<RecordMeta, VaultError> {
        self.authorize(ctx, Rpc::CreateRecord)?;
        if let Some(id) = &request_id {
            check_free_text("request_id", id, MAX_REQUEST_ID_LEN)?;
        }
        if let Some(version) = &policy_version {
            check_free_text("policy_version", version, MAX_POLICY_VERSION_LEN)?;
        }
        let identity = Identity::parse(input, self.today()).map_err(VaultError::InvalidArgument)?;
        if identity.is_empty() {
            return Err(violation(
                "identity",
                "at least one identity field is required",
            ));
        }
        let record_id = new_record_id()?;
        let dek = self.keys.generate_data_key()?;
        let canonical = identity.canonical_fields();
        let fields = seal_all(&dek, &record_id, &canonical)?;
        let now = self.now_micros();
        let retain_until = self
            .retention
            .deadline(
                now,
                identity.id_document().map(|doc| doc.id_type()),
                retention_days,
            )
            .map_err(lifecycle::retention_violation)?;
        let audit = self.event(
            ctx,
            Rpc::CreateRecord.as_str(),
            vec![record_id.clone()],
            "OK",
            None,
        );
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let (wrapped_key, kek_version) = self.keys.wrap(&dek, &record_id)?;
            let (indexes, age_gate) = self.write_indexes(&record_id, &identity)?;
            let request = match &request_id {
                Some(request_id) => Some(self.request_key(ctx, request_id, &canonical)?),
                None => None,
            };
            let record = NewRecord {
                wrapped_key,
                kek_version,
                indexes,
                fields: fields.clone(),
                age_gate,
                policy_version: policy_version.clone(),
                retain_until,
                created_at: now,
                record_id: record_id.clone(),
            };
            match self.store.insert_record(record, request, &audit).await {
                // Another instance rotated: learn the new active version and wrap again.
                Err(StoreError::StaleKeyVersion(_)) if attempts < KEY_REFRESH_ATTEMPTS => {
                    self.keys.refresh_active().await?;
                }
                // Another instance rotated the index key: index under the new version.
                Err(StoreError::StaleIndexVersion(_)) if attempts < KEY_REFRESH_ATTEMPTS => {
                    self.keys.refresh_index().await?;
                }
                other => break other?,
            }
        };
        match outcome {
            InsertOutcome::Inserted(meta) => Ok(meta),
            InsertOutcome::Replayed {
                meta,
                same_request: true,
            } => Ok(meta),
            InsertOutcome::Replayed {
                same_request: false,
                ..
            } => Err(violation(
                "request_id",
                "already used for a different identity by this caller",
            )),
        }
    }

    pub async fn get_record(
        &self,
        ctx: &CallContext,
        record_id: &str,
        purpose: &str,
        justification: &str,
        requested: &[String],
    ) -> Result<Release, VaultError> {
        let audit_ids = vec![record_id.to_owned()];
        let outcome = self
            .release(ctx, record_id, purpose, justification, requested)
            .await;
        match outcome {
            Ok((release, mut event)) => {
                event.released = release
                    .fields
                    .iter()
                    .map(|(field, value)| {
                        (field.as_str().to_owned(), value.level.as_str().to_owned())
                    })
                    .collect();
                self.audit.record(event).await.map_err(|error| {
                    tracing::error!(%error, "audit write failed; refusing to release");
                    VaultError::AuditUnavailable
                })?;
                Ok(release)
            }
            Err(error) => {
                self.audit_refusal(
                    ctx,
                    Rpc::GetRecord,
                    audit_ids,
                    purpose,
                    justification,
                    &error,
                )
                .await;
                Err(error)
            }
        }
    }

    /// Everything a read does before its audit event: grants, decryption, levels.
    async fn release(
        &self,
        ctx: &CallContext,
        record_id: &str,
        purpose_name: &str,
        justification: &str,
        requested: &[String],
    ) -> Result<(Release, AuditEvent), VaultError> {
        self.authorize(ctx, Rpc::GetRecord)?;
        check_record_id(record_id)?;
        let purpose = self.granted_purpose(ctx, purpose_name, justification)?;
        let wanted = requested_fields(requested)?;
        let stored = self
            .store
            .get_record(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        self.check_release_allowed(record_id, purpose, &stored.account)?;
        let dek = self.keys.unwrap(&stored.wrapped_key, record_id)?;
        // Pseudonyms are always those of the active index version: they change when the
        // index key is rotated.
        let (_, index_keys) = self.keys.active_index()?;
        let mut fields = Vec::new();
        for sealed in &stored.fields {
            let field = FieldName::parse(&sealed.field)
                .ok_or_else(|| VaultError::Internal("stored field has an unknown name".into()))?;
            let level = purpose.level(field);
            if level == ReleaseLevel::None || !wanted.as_ref().is_none_or(|w| w.contains(&field)) {
                continue;
            }
            let plaintext = dek.open_field(record_id, &sealed.field, &sealed.ciphertext)?;
            let canonical = std::str::from_utf8(&plaintext).map_err(|_| VaultError::DataLoss)?;
            if let Some(value) =
                apply_level(&index_keys.pseudonym, purpose, field, level, canonical)
            {
                fields.push((field, ReleasedValue { value, level }));
            }
        }
        let mut event = self.event(
            ctx,
            Rpc::GetRecord.as_str(),
            vec![record_id.to_owned()],
            "OK",
            None,
        );
        event.purpose = Some(purpose.name.clone());
        event.justification = non_empty(justification);
        Ok((
            Release {
                record_id: record_id.to_owned(),
                etag: stored.meta.version.to_string(),
                fields,
            },
            event,
        ))
    }

    fn granted_purpose<'c>(
        &self,
        ctx: &'c CallContext,
        purpose: &str,
        justification: &str,
    ) -> Result<&'c Purpose, VaultError> {
        if purpose.is_empty() {
            return Err(violation("purpose", "is required"));
        }
        let granted = ctx
            .policy
            .purpose(purpose)
            .filter(|_| ctx.caller.has_purpose(purpose))
            .ok_or_else(|| VaultError::PurposeNotGranted(truncate(purpose, 64)))?;
        check_free_text("justification", justification, MAX_FREE_TEXT_LEN)?;
        if granted.requires_justification && justification.trim().is_empty() {
            return Err(violation("justification", "is required for this purpose"));
        }
        Ok(granted)
    }

    pub async fn update_record(
        &self,
        ctx: &CallContext,
        record_id: &str,
        input: IdentityInput,
        mask: &[String],
        etag: &str,
        policy_version: Option<String>,
    ) -> Result<RecordMeta, VaultError> {
        self.authorize(ctx, Rpc::UpdateRecord)?;
        check_record_id(record_id)?;
        let expected_version: i64 = etag.parse().map_err(|_| {
            violation(
                "etag",
                "is required and must be an etag returned by the vault",
            )
        })?;
        if let Some(version) = &policy_version {
            check_free_text("policy_version", version, MAX_POLICY_VERSION_LEN)?;
        }
        // Accepting a new policy version alone is an update with nothing else to replace.
        let replaced =
            if mask.is_empty() && present_fields(&input).is_empty() && policy_version.is_some() {
                Vec::new()
            } else {
                update_paths(mask, &input)?
            };
        let override_suspension = ctx.caller.has_grant(Grant::AccountsSuspend);
        let stored = self
            .store
            .get_record(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        if stored.account.suspended && !override_suspension {
            return Err(VaultError::AccountSuspended);
        }
        if stored.meta.version != expected_version {
            return Err(VaultError::EtagMismatch);
        }
        let dek = self.keys.unwrap(&stored.wrapped_key, record_id)?;
        let mut current = Vec::with_capacity(stored.fields.len());
        for sealed in &stored.fields {
            let field = FieldName::parse(&sealed.field)
                .ok_or_else(|| VaultError::Internal("stored field has an unknown name".into()))?;
            let plaintext = dek.open_field(record_id, &sealed.field, &sealed.ciphertext)?;
            let value = String::from_utf8(plaintext.to_vec()).map_err(|_| VaultError::DataLoss)?;
            current.push((field, value));
        }
        // Stored values were canonical when sealed; one that no longer parses is corruption.
        let merged = IdentityInput::try_from_canonical(&current).map_err(|_| VaultError::DataLoss);
        for (_, value) in current.iter_mut() {
            zeroize::Zeroize::zeroize(value);
        }
        let mut merged = merged?;
        replace_fields(&mut merged, input, &replaced);
        let identity =
            Identity::parse(merged, self.today()).map_err(VaultError::InvalidArgument)?;
        if identity.is_empty() {
            return Err(violation("identity", "an update may not clear every field"));
        }
        let fields = seal_all(&dek, record_id, &identity.canonical_fields())?;
        let audit = self.event(
            ctx,
            Rpc::UpdateRecord.as_str(),
            vec![record_id.to_owned()],
            "OK",
            None,
        );
        let updated_at = self.now_micros();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (indexes, age_gate) = self.write_indexes(record_id, &identity)?;
            let update = RecordUpdate {
                record_id: record_id.to_owned(),
                expected_version,
                updated_at,
                indexes,
                fields: fields.clone(),
                age_gate,
                policy_version: policy_version.clone(),
                override_suspension,
            };
            match self.store.update_record(update, &audit).await {
                Err(StoreError::StaleIndexVersion(_)) if attempts < KEY_REFRESH_ATTEMPTS => {
                    self.keys.refresh_index().await?;
                }
                other => return Ok(other?),
            }
        }
    }

    pub async fn delete_record(
        &self,
        ctx: &CallContext,
        record_id: &str,
        reason: &str,
    ) -> Result<Micros, VaultError> {
        self.authorize(ctx, Rpc::DeleteRecord)?;
        check_record_id(record_id)?;
        check_free_text("reason", reason, MAX_FREE_TEXT_LEN)?;
        let now = self.now_micros();
        let mut audit = self.event(
            ctx,
            Rpc::DeleteRecord.as_str(),
            vec![record_id.to_owned()],
            "OK",
            None,
        );
        audit.justification = non_empty(reason);
        let override_suspension = ctx.caller.has_grant(Grant::AccountsSuspend);
        self.store
            .delete_record(record_id, now, override_suspension, &audit)
            .await?;
        Ok(now)
    }

    pub async fn find_records(
        &self,
        ctx: &CallContext,
        purpose: &str,
        justification: &str,
        key: LookupKey,
    ) -> Result<Vec<String>, VaultError> {
        let result = self.lookup(ctx, purpose, justification, key).await;
        match result {
            Ok(record_ids) => {
                let mut event = self.event(
                    ctx,
                    Rpc::FindRecords.as_str(),
                    record_ids.clone(),
                    "OK",
                    None,
                );
                event.purpose = Some(purpose.to_owned());
                event.justification = non_empty(justification);
                self.audit.record(event).await.map_err(|error| {
                    tracing::error!(%error, "audit write failed; refusing to answer");
                    VaultError::AuditUnavailable
                })?;
                Ok(record_ids)
            }
            Err(error) => {
                self.audit_refusal(
                    ctx,
                    Rpc::FindRecords,
                    Vec::new(),
                    purpose,
                    justification,
                    &error,
                )
                .await;
                Err(error)
            }
        }
    }

    async fn lookup(
        &self,
        ctx: &CallContext,
        purpose: &str,
        justification: &str,
        key: LookupKey,
    ) -> Result<Vec<String>, VaultError> {
        self.authorize(ctx, Rpc::FindRecords)?;
        let purpose = self.granted_purpose(ctx, purpose, justification)?;
        let today = self.today();
        let matches = match key {
            LookupKey::Document { id_type, id_number } => {
                let id_type =
                    id_type.ok_or_else(|| violation("document.id_type", "is required"))?;
                let document = IdDocument::parse(id_type, &id_number, today)
                    .map_err(|reason| violation("document.id_number", &reason))?;
                self.find_by_document(&document).await?
            }
            LookupKey::Phone(raw) => {
                let phone =
                    PhoneNumber::parse(&raw).map_err(|reason| violation("phone", &reason))?;
                self.find_indexed(IndexedKey::Phone, |key| key.phone(phone.e164()))
                    .await?
            }
        };
        for found in &matches {
            self.check_release_allowed(&found.record_id, purpose, &found.account)?;
        }
        Ok(matches.into_iter().map(|m| m.record_id).collect())
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
            event_id: new_event_id(),
            occurred_at: self.now_micros(),
            chain_id: self.audit.chain_id().to_owned(),
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

    /// Audit events for compliance staff. Reading the trail is itself audited.
    pub async fn list_audit_events(
        &self,
        ctx: &CallContext,
        query: AuditQuery,
    ) -> Result<Vec<StoredEvent>, VaultError> {
        self.require_grant(ctx, Grant::AuditRead)?;
        if query.plaintext_only && query.caller.is_none() {
            return Err(violation("caller", "is required with plaintext_only"));
        }
        let events = self.store.list_audit_events(&query).await?;
        self.audit_read(ctx, "ListAuditEvents", query.record_id)
            .await?;
        Ok(events)
    }

    /// Releases of one person's data under purposes flagged as disclosures.
    pub async fn list_disclosures(
        &self,
        ctx: &CallContext,
        record_id: &str,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<StoredEvent>, VaultError> {
        self.require_grant(ctx, Grant::AuditRead)?;
        check_record_id(record_id)?;
        let purposes = ctx.policy.disclosure_purposes();
        let events = self
            .store
            .list_disclosures(record_id, &purposes, limit, after)
            .await?;
        self.audit_read(ctx, "ListDisclosures", Some(record_id.to_owned()))
            .await?;
        Ok(events)
    }

    pub async fn verify_audit(&self, ctx: &CallContext) -> Result<VerifyReport, VaultError> {
        self.require_grant(ctx, Grant::AuditRead)?;
        let public = self.keys.audit_signing().public_key();
        let witness_file = self
            .checkpoint_signer
            .as_ref()
            .and_then(|signer| signer.witness_file())
            .map(ToOwned::to_owned);
        let witness = match witness_file {
            Some(path) => Some(
                tokio::task::spawn_blocking(move || {
                    Witness::read(&path).unwrap_or_else(|error| Witness::unreadable(&error))
                })
                .await
                .map_err(|e| VaultError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        let report =
            crate::audit::verify_with(self.store.as_ref(), &public, witness.as_ref()).await?;
        self.audit_read(ctx, "VerifyAuditChain", None).await?;
        Ok(report)
    }

    async fn audit_read(
        &self,
        ctx: &CallContext,
        rpc: &str,
        record_id: Option<String>,
    ) -> Result<(), VaultError> {
        let event = self.event(ctx, rpc, record_id.into_iter().collect(), "OK", None);
        self.audit
            .record(event)
            .await
            .map_err(|_| VaultError::AuditUnavailable)
    }

    /// A write's blind indexes under the active index version (with the document's index
    /// under the other live versions, for the uniqueness check), and its age gate sealed
    /// under the active version's state key.
    fn write_indexes(
        &self,
        record_id: &str,
        identity: &Identity,
    ) -> Result<(RecordIndexes, Option<Vec<u8>>), VaultError> {
        let live = self.keys.live_index_keys()?;
        let ((version, active), others) = live
            .split_first()
            .ok_or_else(|| VaultError::Internal("no live index version".into()))?;
        let document = |key: &BlindIndexKey| {
            identity
                .id_document()
                .map(|doc| key.document(doc.id_type().as_str(), doc.number()))
        };
        let indexes = RecordIndexes {
            version: *version,
            document: document(&active.blind_index),
            phone: identity.phone().map(|p| active.blind_index.phone(p.e164())),
            document_elsewhere: others
                .iter()
                .filter_map(|(_, keys)| document(&keys.blind_index))
                .collect(),
            computed_for: live.iter().map(|(v, _)| *v).collect(),
        };
        let age_gate = self.seal_age_gate(active, record_id, identity.date_of_birth())?;
        Ok((indexes, age_gate))
    }

    /// The idempotency key of a create: its content's MAC under the active index version,
    /// and under the other live ones so that a retry spanning a rotation still matches.
    fn request_key(
        &self,
        ctx: &CallContext,
        request_id: &str,
        canonical: &[(FieldName, String)],
    ) -> Result<CreateRequestKey, VaultError> {
        let parts: Vec<&[u8]> = canonical
            .iter()
            .flat_map(|(field, value)| [field.as_str().as_bytes(), value.as_bytes()])
            .collect();
        let mut fingerprints = self
            .keys
            .live_index_keys()?
            .into_iter()
            .map(|(_, keys)| keys.blind_index.fingerprint(&parts));
        let fingerprint = fingerprints
            .next()
            .ok_or_else(|| VaultError::Internal("no live index version".into()))?;
        Ok(CreateRequestKey {
            caller: ctx.caller.name.clone(),
            request_id: request_id.to_owned(),
            fingerprint,
            fingerprint_elsewhere: fingerprints.collect(),
        })
    }

    /// Live records holding this document under any live index version.
    pub(crate) async fn find_by_document(
        &self,
        document: &IdDocument,
    ) -> Result<Vec<LookupMatch>, VaultError> {
        self.find_indexed(IndexedKey::Document, |key| {
            key.document(document.id_type().as_str(), document.number())
        })
        .await
    }

    /// Looks a key up under every live index version in one statement, then checks that no
    /// index version became live meanwhile that the lookup did not compute for (another
    /// instance rotated, and the re-index may have moved records to it); if one did, looks
    /// up again with it.
    async fn find_indexed(
        &self,
        key: IndexedKey,
        index: impl Fn(&BlindIndexKey) -> Vec<u8>,
    ) -> Result<Vec<LookupMatch>, VaultError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let candidates: Vec<Vec<u8>> = self
                .keys
                .live_index_keys()?
                .iter()
                .map(|(_, keys)| index(&keys.blind_index))
                .collect();
            let matches = match key {
                IndexedKey::Document => self.store.find_by_document(&candidates).await?,
                IndexedKey::Phone => self.store.find_by_phone(&candidates).await?,
            };
            if self.keys.index_view_is_current().await? || attempts >= KEY_REFRESH_ATTEMPTS {
                return Ok(matches);
            }
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
            event_id: new_event_id(),
            occurred_at: self.now_micros(),
            chain_id: self.audit.chain_id().to_owned(),
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

    /// Records a refused read. Input errors carry field names only, never values.
    async fn audit_refusal(
        &self,
        ctx: &CallContext,
        rpc: Rpc,
        record_ids: Vec<String>,
        purpose: &str,
        justification: &str,
        error: &VaultError,
    ) {
        let (outcome, reason) = refusal_reason(error);
        let mut event = self.event(ctx, rpc.as_str(), record_ids, outcome, Some(reason));
        event.purpose = non_empty(&truncate(purpose, 64));
        event.justification = non_empty(&truncate(justification, MAX_FREE_TEXT_LEN));
        if let Err(error) = self.audit.record(event).await {
            tracing::error!(%error, "could not audit a refused request");
        }
    }
}

/// The outcome and reason an audit event records for a refusal.
fn refusal_reason(error: &VaultError) -> (&'static str, String) {
    match error {
        VaultError::InvalidArgument(violations) => (
            "INVALID_ARGUMENT",
            violations
                .iter()
                .map(|v| v.field.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        VaultError::OperationNotGranted(_) => ("DENIED", "OPERATION_NOT_GRANTED".into()),
        VaultError::PurposeNotGranted(_) => ("DENIED", "PURPOSE_NOT_GRANTED".into()),
        VaultError::NotFound => ("NOT_FOUND", "NOT_FOUND".into()),
        VaultError::DataLoss => ("ERROR", "DATA_LOSS".into()),
        VaultError::AuditUnavailable => ("ERROR", "AUDIT_UNAVAILABLE".into()),
        VaultError::DuplicateIdentity => ("ERROR", "DUPLICATE_IDENTITY".into()),
        VaultError::EtagMismatch => ("ERROR", "ETAG_MISMATCH".into()),
        VaultError::AccountSuspended => ("DENIED", "ACCOUNT_SUSPENDED".into()),
        VaultError::GuardianConsentRequired => ("DENIED", "GUARDIAN_CONSENT_REQUIRED".into()),
        VaultError::GuardianNotAdult => ("DENIED", "GUARDIAN_NOT_ADULT".into()),
        VaultError::NotAMinor => ("DENIED", "NOT_A_MINOR".into()),
        VaultError::Storage(_) | VaultError::Internal(_) => ("ERROR", "INTERNAL".into()),
        VaultError::Key(_) => ("ERROR", "KEY_UNAVAILABLE".into()),
    }
}

fn seal_all(
    dek: &DataKey,
    record_id: &str,
    canonical: &[(FieldName, String)],
) -> Result<Vec<SealedField>, VaultError> {
    let plaintexts: Vec<(&str, &[u8])> = canonical
        .iter()
        .map(|(field, value)| (field.as_str(), value.as_bytes()))
        .collect();
    let sealed = dek.seal_fields(record_id, &plaintexts)?;
    Ok(canonical
        .iter()
        .zip(sealed)
        .map(|((field, _), ciphertext)| SealedField {
            field: field.as_str().to_owned(),
            ciphertext,
        })
        .collect())
}

/// Which blind index a lookup reads.
#[derive(Clone, Copy)]
enum IndexedKey {
    Document,
    Phone,
}

/// The value released for `level`, or `None` when the value has no such form (for instance
/// an address whose region cannot be recognised): then nothing is released.
fn apply_level(
    pseudonyms: &PseudonymKey,
    purpose: &Purpose,
    field: FieldName,
    level: ReleaseLevel,
    canonical: &str,
) -> Option<String> {
    match level {
        ReleaseLevel::Plain => Some(canonical.to_owned()),
        ReleaseLevel::Masked => mask(field, canonical),
        ReleaseLevel::Generalized => generalize(field, canonical),
        ReleaseLevel::Pseudonym => {
            Some(pseudonyms.pseudonym(&purpose.name, field.as_str(), canonical))
        }
        ReleaseLevel::None => None,
    }
}

/// Field names a read asks for; `None` means all the purpose allows.
fn requested_fields(requested: &[String]) -> Result<Option<BTreeSet<FieldName>>, VaultError> {
    if requested.is_empty() {
        return Ok(None);
    }
    requested
        .iter()
        .map(|name| {
            FieldName::parse(name).ok_or_else(|| violation("fields", "names an unknown field"))
        })
        .collect::<Result<BTreeSet<_>, _>>()
        .map(Some)
}

/// The identity fields an update replaces: the mask's paths (`name` or `identity.name`), or
/// every field the request sets when the mask is empty.
fn update_paths(mask: &[String], input: &IdentityInput) -> Result<Vec<FieldName>, VaultError> {
    if mask.is_empty() {
        let set = present_fields(input);
        if set.is_empty() {
            return Err(violation("update_mask", "nothing to update"));
        }
        return Ok(set);
    }
    mask.iter()
        .map(|path| {
            let name = path.strip_prefix("identity.").unwrap_or(path);
            FieldName::parse(name)
                .ok_or_else(|| violation("update_mask", "names an unknown identity field"))
        })
        .collect()
}

fn present_fields(input: &IdentityInput) -> Vec<FieldName> {
    let IdentityInput {
        name,
        gender,
        id_type,
        id_number,
        date_of_birth,
        nationality,
        phone,
        email,
        address,
        postal_code,
    } = input;
    [
        (FieldName::Name, name.is_some()),
        (FieldName::Gender, gender.is_some()),
        (FieldName::IdType, id_type.is_some()),
        (FieldName::IdNumber, id_number.is_some()),
        (FieldName::DateOfBirth, date_of_birth.is_some()),
        (FieldName::Nationality, nationality.is_some()),
        (FieldName::Phone, phone.is_some()),
        (FieldName::Email, email.is_some()),
        (FieldName::Address, address.is_some()),
        (FieldName::PostalCode, postal_code.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, present)| present.then_some(field))
    .collect()
}

/// Copies `fields` from `source` into `target`; a field absent in `source` is cleared.
fn replace_fields(target: &mut IdentityInput, source: IdentityInput, fields: &[FieldName]) {
    let mut source = source;
    for field in fields {
        match field {
            FieldName::Name => target.name = source.name.take(),
            FieldName::Gender => target.gender = source.gender.take(),
            FieldName::IdType => target.id_type = source.id_type.take(),
            FieldName::IdNumber => target.id_number = source.id_number.take(),
            FieldName::DateOfBirth => target.date_of_birth = source.date_of_birth.take(),
            FieldName::Nationality => target.nationality = source.nationality.take(),
            FieldName::Phone => target.phone = source.phone.take(),
            FieldName::Email => target.email = source.email.take(),
            FieldName::Address => target.address = source.address.take(),
            FieldName::PostalCode => target.postal_code = source.postal_code.take(),
        }
    }
}

pub(crate) fn check_record_id(record_id: &str) -> Result<(), VaultError> {
    if record_id.is_empty() {
        return Err(violation("record_id", "is required"));
    }
    let well_formed = record_id
        .strip_prefix(RECORD_ID_PREFIX)
        .is_some_and(|rest| {
            rest.len() == 26 && rest.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'))
        });
    if well_formed {
        Ok(())
    } else {
        Err(violation(
            "record_id",
            "is not a record id issued by this vault",
        ))
    }
}

pub(crate) fn check_free_text(
    field: &str,
    value: &str,
    max_chars: usize,
) -> Result<(), VaultError> {
    if value.chars().count() > max_chars {
        return Err(violation(
            field,
            &format!("must be at most {max_chars} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(violation(field, "must not contain control characters"));
    }
    Ok(())
}

pub(crate) fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn truncate(value: &str, max_chars: usize) -> String {
    value.chars().take(max_chars).collect()
}

pub(crate) fn random_token() -> Result<String, VaultError> {
    let mut bytes = Zeroizing::new([0u8; 16]);
    getrandom::fill(bytes.as_mut())
        .map_err(|_| VaultError::Internal("random number generator failed".into()))?;
    Ok(data_encoding::BASE32_NOPAD
        .encode(bytes.as_ref())
        .to_lowercase())
}

/// A random record id: 128 bits, never derived from identity.
fn new_record_id() -> Result<String, VaultError> {
    Ok(format!("{RECORD_ID_PREFIX}{}", random_token()?))
}

pub(crate) fn new_event_id() -> String {
    // Time first, then randomness: ids sort by creation, so the unique index on event ids
    // grows at its right edge instead of costing a random page write per audit event.
    // Uniqueness comes from the random part; should the OS generator fail, a process-wide
    // counter stands in (and the read fails later anyway, needing the generator too).
    static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let micros = Utc::now().timestamp_micros().max(0);
    let token = random_token().unwrap_or_else(|_| {
        let n = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("n{n}")
    });
    format!("evt_{micros:013x}{token}")
}
