//! Records: create, read for a purpose, update, delete and find.
//!
//! Each use case checks the request's strings first (`crate::domain::edge`), then the caller's
//! grants, then does its work; whatever refuses it, [`Vault::audited`] records the refusal.
//! A granted read commits its audit event before it returns anything; a write commits its
//! event in the change's transaction.
//!
//! Two rules keep writes from answering questions about stored data:
//! - Etags are opaque MACs of (record id, version) ([`crate::crypto::EtagKey`]): a writer
//!   must have been handed the current etag; a counter could be guessed. A malformed etag is
//!   `INVALID_ARGUMENT`, a stale one `ABORTED`.
//! - An update never compares a value it was sent with a stored one. Fields the stored
//!   document carries (date of birth and gender of a resident ID) are refused by rule,
//!   whatever the value; when the document itself is replaced, those fields are derived
//!   from the new one instead of being checked against the old values.

use std::borrow::Cow;
use std::collections::BTreeSet;

use zeroize::{Zeroize, Zeroizing};

use crate::audit::AuditEvent;
use crate::crypto::{BlindIndexKey, DataKey, EtagKey, PseudonymKey};
use crate::domain::edge::{
    FreeText, MAX_JUSTIFICATION_BYTES, MAX_POLICY_VERSION_BYTES, MAX_PURPOSE_BYTES,
    MAX_REFERENCE_BYTES, MIN_JUSTIFICATION_CHARS, RecordId, check_text,
};
use crate::domain::{
    FieldName, IdDocument, Identity, IdentityInput, PhoneNumber, generalize, mask,
};
use crate::policy::{Grant, Purpose, ReleaseLevel, Rpc};
use crate::store::{
    BatchInsert, CreateRequestKey, InsertOutcome, LookupMatch, NewRecord, RecordIndexes,
    RecordMeta, RecordUpdate, SealedField, StoreError, StoredRecord,
};

use super::decisions::AuditSubject;
use super::{
    CallContext, KEY_REFRESH_ATTEMPTS, LookupKey, Release, ReleasedValue, Vault, VaultError,
    violation,
};

/// Repeated request fields name identity fields, so more entries than fields is abuse.
const MAX_LISTED_FIELDS: usize = FieldName::ALL.len();

impl Vault {
    /// The etag a record's metadata is answered with.
    pub fn etag(&self, meta: &RecordMeta) -> String {
        self.etags.etag(meta.record_id.as_str(), meta.version)
    }

    pub async fn create_record(
        &self,
        ctx: &CallContext,
        input: IdentityInput,
        request_id: Option<String>,
        policy_version: Option<String>,
        retention_days: Option<u32>,
    ) -> Result<RecordMeta, VaultError> {
        let subject = AuditSubject::new(Rpc::CreateRecord.as_str());
        let result = self
            .insert(
                ctx,
                Rpc::CreateRecord,
                input,
                request_id,
                policy_version,
                retention_days,
            )
            .await;
        self.audited(ctx, subject, result).await
    }

    /// A create, by `rpc` (`CreateRecord`): checked and sealed, then written, wrapped and
    /// indexed again when another instance rotated a key meanwhile.
    pub(super) async fn insert(
        &self,
        ctx: &CallContext,
        rpc: Rpc,
        input: IdentityInput,
        request_id: Option<String>,
        policy_version: Option<String>,
        retention_days: Option<u32>,
    ) -> Result<RecordMeta, VaultError> {
        let create =
            self.seal_create(ctx, rpc, input, request_id, policy_version, retention_days)?;
        let audit = self.event(
            ctx,
            rpc.as_str(),
            vec![create.record_id.to_string()],
            "OK",
            None,
        );
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let BatchInsert { record, request } = self.store_form(ctx, &create)?;
            match self.store.insert_record(record, request, &audit).await {
                // Another instance rotated a key: learn its new version and write again.
                Err(
                    stale @ (StoreError::StaleKeyVersion(_) | StoreError::StaleIndexVersion(_)),
                ) if attempts < KEY_REFRESH_ATTEMPTS => {
                    self.refresh_stale(&stale).await?;
                }
                other => break other?,
            }
        };
        created(outcome)
    }

    /// A create's checks and sealing, done once however often its write is retried.
    pub(super) fn seal_create(
        &self,
        ctx: &CallContext,
        rpc: Rpc,
        input: IdentityInput,
        request_id: Option<String>,
        policy_version: Option<String>,
        retention_days: Option<u32>,
    ) -> Result<SealedCreate, VaultError> {
        if let Some(id) = &request_id {
            check_text("request_id", id, MAX_REFERENCE_BYTES)?;
        }
        if let Some(version) = &policy_version {
            check_text("policy_version", version, MAX_POLICY_VERSION_BYTES)?;
        }
        self.authorize(ctx, rpc)?;
        let identity = Identity::parse(input, self.today()).map_err(VaultError::InvalidArgument)?;
        if identity.is_empty() {
            return Err(violation(
                "identity",
                "at least one identity field is required",
            ));
        }
        let record_id = RecordId::generate()
            .map_err(|_| VaultError::Crypto(crate::crypto::CryptoError::Random))?;
        let dek = self.keys.generate_data_key()?;
        let fields = seal_all(&dek, &record_id, &identity.canonical_fields())?;
        let now = self.now_micros();
        let retain_until = self
            .retention
            .deadline(
                now,
                identity.id_document().map(|doc| doc.id_type()),
                retention_days,
            )
            .map_err(super::lifecycle::retention_violation)?;
        Ok(SealedCreate {
            identity,
            dek,
            record_id,
            fields,
            now,
            retain_until,
            request_id,
            policy_version,
        })
    }

    /// A sealed create as the store takes it, wrapped and indexed under the key versions
    /// this instance knows as active.
    pub(super) fn store_form(
        &self,
        ctx: &CallContext,
        create: &SealedCreate,
    ) -> Result<BatchInsert, VaultError> {
        let (wrapped_key, kek_version) = self.keys.wrap(&create.dek, create.record_id.as_str())?;
        let (indexes, age_gate) = self.write_indexes(&create.record_id, &create.identity)?;
        let request = match &create.request_id {
            Some(request_id) => Some(self.request_key(
                ctx,
                request_id,
                &create.identity.canonical_fields(),
                create.now,
            )?),
            None => None,
        };
        Ok(BatchInsert {
            record: NewRecord {
                wrapped_key,
                kek_version,
                indexes,
                fields: create.fields.clone(),
                age_gate,
                policy_version: create.policy_version.clone(),
                retain_until: create.retain_until,
                created_at: create.now,
                record_id: create.record_id.clone(),
            },
            request,
        })
    }

    /// After a write refused as stale (another instance rotated the KEK, or the index key),
    /// learns that key's new active version, so that the retry wraps or indexes under it.
    pub(super) async fn refresh_stale(&self, stale: &StoreError) -> Result<(), VaultError> {
        match stale {
            StoreError::StaleKeyVersion(_) => {
                self.keys.refresh_active().await?;
            }
            StoreError::StaleIndexVersion(_) => {
                self.keys.refresh_index().await?;
            }
            _ => {}
        }
        Ok(())
    }

    pub async fn get_record(
        &self,
        ctx: &CallContext,
        record_id: &str,
        purpose: &str,
        justification: &str,
        requested: &[String],
    ) -> Result<Release, VaultError> {
        let subject = AuditSubject::new(Rpc::GetRecord.as_str())
            .record(record_id)
            .purpose(&ctx.policy, purpose)
            .text(justification, MAX_JUSTIFICATION_BYTES);
        let result = async {
            let (release, mut event) = self
                .release(ctx, record_id, purpose, justification, requested)
                .await?;
            event.released = release
                .fields
                .iter()
                .map(|(field, value)| (field.as_str().to_owned(), value.level.as_str().to_owned()))
                .collect();
            self.commit_before_answer(event).await?;
            Ok(release)
        }
        .await;
        self.audited(ctx, subject, result).await
    }

    /// Everything a read does before its audit event: checks, grants, decryption, levels.
    async fn release(
        &self,
        ctx: &CallContext,
        record_id: &str,
        purpose_name: &str,
        justification: &str,
        requested: &[String],
    ) -> Result<(Release, AuditEvent), VaultError> {
        let record_id = RecordId::parse("record_id", record_id)?;
        let justification = read_strings(purpose_name, justification)?;
        let wanted = requested_fields(requested)?;
        self.authorize(ctx, Rpc::GetRecord)?;
        let purpose = self.granted_purpose(ctx, purpose_name, &justification)?;
        let release = self
            .open_release(&record_id, purpose, wanted.as_ref())
            .await?;
        let mut event = self.event(
            ctx,
            Rpc::GetRecord.as_str(),
            vec![record_id.into_string()],
            "OK",
            None,
        );
        event.purpose = Some(purpose.name.clone());
        event.justification = justification.non_empty();
        Ok((release, event))
    }

    /// One record's release under a purpose already granted: load, the account's gates,
    /// unwrap, open only the fields released, apply the levels. Nothing is audited here; the
    /// caller commits the event before it answers.
    pub(super) async fn open_release(
        &self,
        record_id: &RecordId,
        purpose: &Purpose,
        wanted: Option<&BTreeSet<FieldName>>,
    ) -> Result<Release, VaultError> {
        let stored = self.store.get_record(record_id).await?;
        self.release_stored(record_id, stored, purpose, wanted)
            .await
    }

    /// [`Vault::open_release`] of a record already read (`None`: no live record).
    pub(super) async fn release_stored(
        &self,
        record_id: &RecordId,
        stored: Option<StoredRecord>,
        purpose: &Purpose,
        wanted: Option<&BTreeSet<FieldName>>,
    ) -> Result<Release, VaultError> {
        let stored = stored.ok_or(VaultError::NotFound)?;
        self.check_release_allowed(record_id, purpose, &stored.account)?;
        let dek = self
            .keys
            .unwrap(&stored.wrapped_key, record_id.as_str())
            .await?;
        // Pseudonyms are always those of the active index version: they change when the
        // index key is rotated.
        let (_, index_keys) = self.keys.active_index()?;
        let mut fields = Vec::new();
        for sealed in &stored.fields {
            let field = FieldName::parse(&sealed.field)
                .ok_or_else(|| VaultError::Internal("stored field has an unknown name"))?;
            let level = purpose.level(field);
            if level == ReleaseLevel::None || !wanted.is_none_or(|w| w.contains(&field)) {
                continue;
            }
            let plaintext =
                dek.open_field(record_id.as_str(), &sealed.field, &sealed.ciphertext)?;
            let canonical = std::str::from_utf8(&plaintext).map_err(|_| VaultError::DataLoss)?;
            if let Some(value) =
                apply_level(&index_keys.pseudonym, purpose, field, level, canonical)
            {
                fields.push((field, ReleasedValue { value, level }));
            }
        }
        Ok(Release {
            record_id: record_id.clone(),
            etag: self.etag(&stored.meta),
            fields,
        })
    }

    /// The purpose, if the policy defines it and grants it to the caller, and the
    /// justification it requires, if it requires one.
    pub(super) fn granted_purpose<'c>(
        &self,
        ctx: &'c CallContext,
        purpose: &str,
        justification: &FreeText,
    ) -> Result<&'c Purpose, VaultError> {
        let granted = ctx
            .policy
            .purpose(purpose)
            .filter(|_| ctx.caller.has_purpose(purpose))
            .ok_or(VaultError::PurposeNotGranted)?;
        if granted.requires_justification {
            FreeText::required(
                "justification",
                justification.as_str(),
                MAX_JUSTIFICATION_BYTES,
                MIN_JUSTIFICATION_CHARS,
            )?;
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
        let subject = AuditSubject::new(Rpc::UpdateRecord.as_str()).record(record_id);
        let result = self
            .update(ctx, record_id, input, mask, etag, policy_version)
            .await;
        self.audited(ctx, subject, result).await
    }

    async fn update(
        &self,
        ctx: &CallContext,
        record_id: &str,
        input: IdentityInput,
        mask: &[String],
        etag: &str,
        policy_version: Option<String>,
    ) -> Result<RecordMeta, VaultError> {
        let record_id = &RecordId::parse("record_id", record_id)?;
        if !EtagKey::well_formed(etag) {
            return Err(violation(
                "etag",
                "is required and must be an etag returned by the vault",
            ));
        }
        if let Some(version) = &policy_version {
            check_text("policy_version", version, MAX_POLICY_VERSION_BYTES)?;
        }
        if mask.len() > MAX_LISTED_FIELDS {
            return Err(crate::domain::Violation::bounded(
                "update_mask",
                "must name at most {limit} fields",
                MAX_LISTED_FIELDS as u64,
            )
            .into());
        }
        self.authorize(ctx, Rpc::UpdateRecord)?;
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
        if !self
            .etags
            .matches(etag, record_id.as_str(), stored.meta.version)
        {
            return Err(VaultError::EtagMismatch);
        }
        let expected_version = stored.meta.version;
        let dek = self
            .keys
            .unwrap(&stored.wrapped_key, record_id.as_str())
            .await?;
        let mut current = Vec::with_capacity(stored.fields.len());
        for sealed in &stored.fields {
            let field = FieldName::parse(&sealed.field)
                .ok_or_else(|| VaultError::Internal("stored field has an unknown name"))?;
            let plaintext =
                dek.open_field(record_id.as_str(), &sealed.field, &sealed.ciphertext)?;
            let value = String::from_utf8(plaintext.to_vec()).map_err(|_| VaultError::DataLoss)?;
            current.push((field, value));
        }
        // Stored values were canonical when sealed; one that no longer parses is corruption.
        let merged = IdentityInput::try_from_canonical(&current).map_err(|_| VaultError::DataLoss);
        for (_, value) in current.iter_mut() {
            value.zeroize();
        }
        let mut merged = merged?;
        let today = self.today();
        let carried_before = carried_by_document(&merged, today);
        replace_fields(&mut merged, input, &replaced);
        derived_fields_follow_the_document(&mut merged, &replaced, carried_before, today)?;
        let identity = Identity::parse(merged, today).map_err(VaultError::InvalidArgument)?;
        if identity.is_empty() {
            return Err(violation("identity", "an update may not clear every field"));
        }
        let fields = seal_all(&dek, record_id, &identity.canonical_fields())?;
        let audit = self.event(
            ctx,
            Rpc::UpdateRecord.as_str(),
            vec![record_id.to_string()],
            "OK",
            None,
        );
        let updated_at = self.now_micros();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (indexes, age_gate) = self.write_indexes(record_id, &identity)?;
            let update = RecordUpdate {
                record_id: record_id.clone(),
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
    ) -> Result<i64, VaultError> {
        let subject = AuditSubject::new(Rpc::DeleteRecord.as_str())
            .record(record_id)
            .text(reason, MAX_JUSTIFICATION_BYTES);
        let result = async {
            let record_id = RecordId::parse("record_id", record_id)?;
            let reason = FreeText::parse("reason", reason, MAX_JUSTIFICATION_BYTES)?;
            self.authorize(ctx, Rpc::DeleteRecord)?;
            let now = self.now_micros();
            let mut audit = self.event(
                ctx,
                Rpc::DeleteRecord.as_str(),
                vec![record_id.to_string()],
                "OK",
                None,
            );
            audit.justification = reason.non_empty();
            let override_suspension = ctx.caller.has_grant(Grant::AccountsSuspend);
            self.store
                .delete_record(&record_id, now, override_suspension, &audit)
                .await?;
            Ok(now)
        }
        .await;
        self.audited(ctx, subject, result).await
    }

    pub async fn find_records(
        &self,
        ctx: &CallContext,
        purpose: &str,
        justification: &str,
        key: LookupKey,
    ) -> Result<Vec<String>, VaultError> {
        let subject = AuditSubject::new(Rpc::FindRecords.as_str())
            .purpose(&ctx.policy, purpose)
            .text(justification, MAX_JUSTIFICATION_BYTES);
        let result = async {
            let (record_ids, justification) = self.lookup(ctx, purpose, justification, key).await?;
            let mut event = self.event(
                ctx,
                Rpc::FindRecords.as_str(),
                record_ids.clone(),
                "OK",
                None,
            );
            event.purpose = Some(purpose.to_owned());
            event.justification = justification.non_empty();
            self.commit_before_answer(event).await?;
            Ok(record_ids)
        }
        .await;
        self.audited(ctx, subject, result).await
    }

    async fn lookup(
        &self,
        ctx: &CallContext,
        purpose: &str,
        justification: &str,
        key: LookupKey,
    ) -> Result<(Vec<String>, FreeText), VaultError> {
        let justification = read_strings(purpose, justification)?;
        self.authorize(ctx, Rpc::FindRecords)?;
        let purpose = self.granted_purpose(ctx, purpose, &justification)?;
        let today = self.today();
        let matches = match key {
            LookupKey::Document { id_type, id_number } => {
                let id_type =
                    id_type.ok_or_else(|| violation("document.id_type", "is required"))?;
                let document = IdDocument::parse(id_type, &id_number, today)
                    .map_err(|reason| violation("document.id_number", reason))?;
                self.find_by_document(&document).await?
            }
            LookupKey::Phone(raw) => {
                let phone =
                    PhoneNumber::parse(&raw).map_err(|reason| violation("phone", reason))?;
                self.find_indexed(IndexedKey::Phone, |key| key.phone(phone.e164()))
                    .await?
            }
        };
        for found in &matches {
            self.check_release_allowed(&found.record_id, purpose, &found.account)?;
        }
        Ok((
            matches
                .into_iter()
                .map(|m| m.record_id.into_string())
                .collect(),
            justification,
        ))
    }

    /// A write's blind indexes under the active index version (with the document's index
    /// under the other live versions, for the uniqueness check), and its age gate sealed
    /// under the active version's state key.
    fn write_indexes(
        &self,
        record_id: &RecordId,
        identity: &Identity,
    ) -> Result<(RecordIndexes, Option<Vec<u8>>), VaultError> {
        let live = self.keys.live_index_keys()?;
        let ((version, active), others) = live
            .split_first()
            .ok_or_else(|| VaultError::Internal("no live index version"))?;
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
    /// Keys issued before the configured time to live are expired.
    fn request_key(
        &self,
        ctx: &CallContext,
        request_id: &str,
        canonical: &[(FieldName, String)],
        now: i64,
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
            .ok_or_else(|| VaultError::Internal("no live index version"))?;
        Ok(CreateRequestKey {
            caller: ctx.caller.name.clone(),
            request_id: request_id.to_owned(),
            fingerprint,
            fingerprint_elsewhere: fingerprints.collect(),
            expired_before: self.request_ids_expire_before(now),
        })
    }

    /// Request ids issued before this instant no longer answer retries.
    pub(crate) fn request_ids_expire_before(&self, now: i64) -> i64 {
        self.request_id_ttl
            .map_or(i64::MIN, |ttl| now.saturating_sub(ttl))
    }

    /// Removes create request ids past their time to live; returns how many.
    pub async fn expire_request_ids(&self) -> Result<u64, VaultError> {
        if self.request_id_ttl.is_none() {
            return Ok(0);
        }
        let cutoff = self.request_ids_expire_before(self.now_micros());
        Ok(self.store.expire_create_requests(cutoff).await?)
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
}

/// Removes expired create request ids about every ten minutes, until `stop` is cancelled
/// (retries use only unexpired ones whether or not this has run; a round once begun
/// finishes). Failures are logged and retried on the next round.
pub async fn expire_request_ids_periodically(
    vault: std::sync::Arc<Vault>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(600));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match vault.expire_request_ids().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "expired create request ids"),
            Err(error) => tracing::warn!(%error, "could not expire create request ids"),
        }
    }
}

/// The strings of a read or lookup: the purpose's shape, and the justification as free text
/// (whether the purpose requires one is decided once the purpose is known to be granted).
pub(super) fn read_strings(purpose: &str, justification: &str) -> Result<FreeText, VaultError> {
    if purpose.is_empty() {
        return Err(violation("purpose", "is required"));
    }
    check_text("purpose", purpose, MAX_PURPOSE_BYTES)?;
    Ok(FreeText::parse(
        "justification",
        justification,
        MAX_JUSTIFICATION_BYTES,
    )?)
}

/// A create checked and sealed under its own data key, not yet written: what a retry after
/// another instance's key rotation wraps and indexes again.
pub(super) struct SealedCreate {
    identity: Identity,
    dek: DataKey,
    record_id: RecordId,
    fields: Vec<SealedField>,
    now: i64,
    retain_until: Option<i64>,
    request_id: Option<String>,
    policy_version: Option<String>,
}

/// What a create answers once the store decided: the record, or why not.
pub(super) fn created(outcome: InsertOutcome) -> Result<RecordMeta, VaultError> {
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
        InsertOutcome::ReplayedDeleted => Err(VaultError::RecordDeleted),
    }
}

pub(crate) fn seal_all(
    dek: &DataKey,
    record_id: &RecordId,
    canonical: &[(FieldName, String)],
) -> Result<Vec<SealedField>, VaultError> {
    let plaintexts: Vec<(&str, &[u8])> = canonical
        .iter()
        .map(|(field, value)| (field.as_str(), value.as_bytes()))
        .collect();
    let sealed = dek.seal_fields(record_id.as_str(), &plaintexts)?;
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
pub(super) fn apply_level(
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
        // NFC again: a value stored before identity text was normalised may be decomposed,
        // and its pseudonym must be the one its equivalent spelling gets.
        ReleaseLevel::Pseudonym => Some(match crate::domain::nfc(canonical) {
            Cow::Borrowed(text) => pseudonyms.pseudonym(&purpose.name, field.as_str(), text),
            Cow::Owned(text) => {
                let text = Zeroizing::new(text);
                pseudonyms.pseudonym(&purpose.name, field.as_str(), &text)
            }
        }),
        ReleaseLevel::None => None,
    }
}

/// Field names a read asks for; `None` means all the purpose allows.
pub(super) fn requested_fields(
    requested: &[String],
) -> Result<Option<BTreeSet<FieldName>>, VaultError> {
    if requested.is_empty() {
        return Ok(None);
    }
    if requested.len() > MAX_LISTED_FIELDS {
        return Err(crate::domain::Violation::bounded(
            "fields",
            "must name at most {limit} fields",
            MAX_LISTED_FIELDS as u64,
        )
        .into());
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

/// Which of the fields a document can carry (date of birth, gender) the input's document
/// carries. An input without a valid document carries neither.
#[derive(Clone, Copy, Debug, Default)]
struct Carried {
    date_of_birth: bool,
    gender: bool,
}

impl Carried {
    fn carries(self, field: FieldName) -> bool {
        match field {
            FieldName::DateOfBirth => self.date_of_birth,
            FieldName::Gender => self.gender,
            _ => false,
        }
    }
}

fn carried_by_document(input: &IdentityInput, today: chrono::NaiveDate) -> Carried {
    let (Some(id_type), Some(number)) = (input.id_type, input.id_number.as_deref()) else {
        return Carried::default();
    };
    match IdDocument::parse(id_type, number, today) {
        Ok(document) => Carried {
            date_of_birth: document.birth_date().is_some(),
            gender: document.gender().is_some(),
        },
        Err(_) => Carried::default(),
    }
}

/// The update rules for fields a document carries, which never compare a sent value with a
/// stored one (that would answer "is this the birth date?" to a caller that may not read it):
/// - naming such a field without replacing the document is refused when the stored document
///   carries it, whatever the value;
/// - replacing the document re-derives the fields the new document carries, unless the same
///   update sends them too (then they are checked against the document sent with them).
fn derived_fields_follow_the_document(
    merged: &mut IdentityInput,
    replaced: &[FieldName],
    carried_before: Carried,
    today: chrono::NaiveDate,
) -> Result<(), VaultError> {
    const DERIVED: [FieldName; 2] = [FieldName::DateOfBirth, FieldName::Gender];
    let replaces_document = replaced
        .iter()
        .any(|field| matches!(field, FieldName::IdType | FieldName::IdNumber));
    if !replaces_document {
        let refused: Vec<_> = DERIVED
            .into_iter()
            .filter(|field| replaced.contains(field) && carried_before.carries(*field))
            .map(|field| {
                crate::domain::Violation::new(
                    field,
                    "is derived from id_number; update id_number instead",
                )
            })
            .collect();
        return if refused.is_empty() {
            Ok(())
        } else {
            Err(VaultError::InvalidArgument(refused))
        };
    }
    let carried_after = carried_by_document(merged, today);
    if carried_after.date_of_birth && !replaced.contains(&FieldName::DateOfBirth) {
        merged.date_of_birth = None;
    }
    if carried_after.gender && !replaced.contains(&FieldName::Gender) {
        merged.gender = None;
    }
    Ok(())
}
