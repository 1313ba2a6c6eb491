//! Record-level key lifecycle: re-keying a record under a fresh data key, and the retention
//! purge. These live beside the vault's other use cases because they open and reseal
//! records with the same care (plaintext only in wiping buffers, never in errors).

use zeroize::Zeroizing;

use crate::crypto::DataKey;
use crate::domain::edge::{FreeText, MAX_JUSTIFICATION_BYTES, RecordId};
use crate::policy::Grant;
use crate::policy::retention::RetentionError;
use crate::store::{BoundCiphertexts, RecordMeta, RecordRekey, SealedField, StoreError};

use super::decisions::AuditSubject;
use super::{CallContext, Vault, VaultError, violation};

/// Records a purge looks at per query; it loops until nothing due is left (or `limit`).
const PURGE_BATCH: i64 = 500;

impl Vault {
    /// Gives a record a fresh data key: every ciphertext bound to the record (its fields,
    /// its account events' notes, the identities of guardians given inline for it: whatever
    /// [`crate::store::BoundCiphertexts`] lists) is opened, resealed under the new key, the new
    /// key is wrapped under the active KEK, and all of it replaces the old in one
    /// transaction, so nothing the old data key opens remains. The etag changes; a concurrent
    /// update made with the old etag is refused rather than written under the old key.
    pub async fn rekey_record(
        &self,
        ctx: &CallContext,
        record_id: &str,
        reason: &str,
    ) -> Result<(RecordMeta, u32), VaultError> {
        let subject = AuditSubject::new("RekeyRecord")
            .record(record_id)
            .text(reason, MAX_JUSTIFICATION_BYTES);
        let result = self.rekey(ctx, record_id, reason).await;
        self.audited(ctx, subject, result).await
    }

    async fn rekey(
        &self,
        ctx: &CallContext,
        record_id: &str,
        reason: &str,
    ) -> Result<(RecordMeta, u32), VaultError> {
        let record_id = RecordId::parse("record_id", record_id)?;
        let reason = FreeText::parse("reason", reason, MAX_JUSTIFICATION_BYTES)?;
        self.require_grant(ctx, Grant::KeysRotate)?;
        let record_id = record_id.as_str();
        let stored = self
            .store
            .get_record(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        let bound = self.store.bound_ciphertexts(record_id).await?;
        let old = self.keys.unwrap(&stored.wrapped_key, record_id).await?;
        // The configured suite: re-keying is how a record moves from one suite to another.
        let fresh = self.keys.generate_data_key()?;
        let mut fields = Vec::with_capacity(stored.fields.len());
        for sealed in &stored.fields {
            fields.push(SealedField {
                field: sealed.field.clone(),
                ciphertext: reseal(&old, &fresh, record_id, &sealed.field, &sealed.ciphertext)?,
            });
        }
        let mut resealed = BoundCiphertexts::default();
        for (event_id, note) in &bound.notes {
            let new = reseal(
                &old,
                &fresh,
                record_id,
                crate::vault::accounts::NOTE_FIELD,
                note,
            )?;
            resealed.notes.push((event_id.clone(), new));
        }
        for (consent_id, guardian) in &bound.guardians {
            let name = crate::vault::accounts::guardian_field(consent_id);
            let new = reseal(&old, &fresh, record_id, &name, guardian)?;
            resealed.guardians.push((consent_id.clone(), new));
        }
        drop(old);
        let mut audit = self.event(ctx, "RekeyRecord", vec![record_id.to_owned()], "OK", None);
        audit.justification = reason.non_empty();
        let mut refreshed = false;
        loop {
            let (wrapped_key, kek_version) = self.keys.wrap(&fresh, record_id)?;
            let rekey = RecordRekey {
                record_id: record_id.to_owned(),
                expected_version: stored.meta.version,
                updated_at: self.now_micros(),
                wrapped_key,
                kek_version,
                fields: fields.clone(),
                bound: bound.clone(),
                resealed: resealed.clone(),
            };
            match self.store.rekey_record(rekey, &audit).await {
                Err(StoreError::StaleKeyVersion(_)) if !refreshed => {
                    refreshed = true;
                    self.keys.refresh_active().await?;
                }
                Err(StoreError::VersionConflict) => {
                    // Changed between the read and the write; the caller may simply retry.
                    return Err(VaultError::EtagMismatch);
                }
                other => return Ok((other?, kek_version)),
            }
        }
    }

    /// Crypto-shreds live records whose retention deadline has passed, each in its own
    /// transaction with its own audit event, leaving tombstones. Safe beside normal traffic
    /// and beside another purge: a record deleted meanwhile is simply skipped.
    pub async fn purge_expired(
        &self,
        ctx: &CallContext,
        limit: Option<u32>,
    ) -> Result<Vec<String>, VaultError> {
        let result = self.purge(ctx, limit).await;
        self.audited(ctx, AuditSubject::new("PurgeExpiredRecords"), result)
            .await
    }

    async fn purge(
        &self,
        ctx: &CallContext,
        limit: Option<u32>,
    ) -> Result<Vec<String>, VaultError> {
        self.require_grant(ctx, Grant::RecordsPurge)?;
        let now = self.now_micros();
        let mut purged = Vec::new();
        loop {
            let room = limit.map_or(PURGE_BATCH, |l| {
                (i64::from(l) - purged.len() as i64).min(PURGE_BATCH)
            });
            if room <= 0 {
                break;
            }
            let due = self.store.expired_records(now, room).await?;
            if due.is_empty() {
                break;
            }
            for record_id in due {
                let mut audit = self.event(
                    ctx,
                    "PurgeExpiredRecords",
                    vec![record_id.clone()],
                    "OK",
                    None,
                );
                audit.reason = Some("RETENTION_DEADLINE_PASSED".to_owned());
                match self
                    .store
                    .delete_record(&record_id, now, true, &audit)
                    .await
                {
                    Ok(()) => purged.push(record_id),
                    // Deleted meanwhile, by its owner or another purge.
                    Err(StoreError::NotFound) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        if !purged.is_empty() {
            tracing::info!(
                count = purged.len(),
                "purged records past their retention deadline"
            );
        }
        Ok(purged)
    }
}

/// `sealed` (bound to `record_id` and `name`) opened with `old` and sealed again with `new`;
/// the plaintext lives only in a wiping buffer meanwhile.
fn reseal(
    old: &DataKey,
    new: &DataKey,
    record_id: &str,
    name: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, VaultError> {
    let plaintext: Zeroizing<Vec<u8>> = old.open_field(record_id, name, sealed)?;
    Ok(new.seal_field(record_id, name, &plaintext)?)
}

/// The violation a refused retention period becomes.
pub(super) fn retention_violation(error: RetentionError) -> VaultError {
    const FIELD: &str = "retention_days";
    match error {
        RetentionError::CallerRetentionDisabled => {
            violation(FIELD, "may not be set: no retention limit is configured")
        }
        RetentionError::OutOfRange { max } => crate::domain::Violation::bounded(
            FIELD,
            "must be between 1 and {limit} days",
            max.into(),
        )
        .into(),
        RetentionError::UnknownIdType(_) => violation(FIELD, "is not valid"),
    }
}
