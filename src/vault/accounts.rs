//! Account state beside the identity: suspension (clause 3(3) of the privacy policy), the
//! history of actions taken on an account (clause 4(1)), minors and their guardians'
//! consent (clause 6), and the policy version each person accepted (clause 7).
//!
//! Everything here is decided at request time from the database, never from memory: a
//! suspension, consent or coming of age takes effect on the next call on every instance,
//! with nothing to run. The login path ([`Vault::check_account`]) reads account state only:
//! it unwraps no record key and opens no identity field. To tell minors it opens the record's
//! age gate, the birth date sealed under the record's own state key (derived per record from
//! the index version's, `crypto::StateKey`), one HKDF and one in-memory GCM open.
//!
//! # The state key and index-key rotation
//!
//! The state key is derived from a blind-index key (`BlindIndexKey::derive_state_key`), so
//! it is versioned with the index keys rather than being one more key to keep forever. A
//! record's age gate is sealed under the state key of the record's `index_version`, the
//! same version its blind indexes were computed with: a write seals it under the active
//! index version, and the re-index pass of the rewrap job (`reindex.rs`) opens it under
//! the old version and re-seals it under the new one in the same compare-and-swap that
//! replaces the indexes. Reading it takes the state key of the version the row names, so a
//! minor stays a minor before, during and after a re-index, and an index version can be
//! destroyed once nothing is indexed (or gated) under it. The alternative, a separate state
//! key that never rotates, would have left age gates sealed under a key that outlives
//! every rotation.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use chrono_tz::Tz;

use crate::audit::AuditEvent;
use crate::config::Config;
use crate::crypto::StateKey;
use crate::domain::age::has_reached;
use crate::domain::edge::{
    FreeText, MAX_NOTE_BYTES, MAX_POLICY_VERSION_BYTES, MAX_REFERENCE_BYTES,
    MIN_JUSTIFICATION_CHARS, RecordId,
};
use crate::domain::ids::{AccountEventId, ConsentId};
use crate::domain::{FieldName, Identity, IdentityInput};
use crate::keys::IndexKeyPair;
use crate::policy::{Grant, PolicyError, Purpose, ReleaseLevel, Rpc};
use crate::store::{AccountEventRow, AccountState, ConsentRow, Micros};
use crate::vault::{AuditSubject, CallContext, Vault, VaultError, non_empty, violation};
/// Associated-data name of the sealed birth date.
pub(crate) const AGE_GATE_FIELD: &str = "state.date_of_birth";

/// Suspension, minors and policy-version rules, validated against the configured purposes.
#[derive(Debug, Clone)]
pub struct AccountRules {
    pub suspended_allowed_purposes: BTreeSet<String>,
    pub consent_exempt_purposes: BTreeSet<String>,
    pub age_of_majority: u32,
    pub sensitive_age: u32,
    pub zone: Tz,
    pub current_policy_version: Option<String>,
}

impl AccountRules {
    pub fn from_config(config: &Config) -> Result<AccountRules, PolicyError> {
        let purposes = |key: &str, names: &[String]| {
            names
                .iter()
                .map(|name| {
                    if config.purposes.contains_key(name) {
                        Ok(name.clone())
                    } else {
                        Err(PolicyError::InvalidConfig {
                            key: key.to_owned(),
                            reason: format!("unknown purpose {name:?}"),
                        })
                    }
                })
                .collect::<Result<BTreeSet<_>, _>>()
        };
        let zone: Tz = config
            .minors
            .time_zone
            .parse()
            .map_err(|_| PolicyError::InvalidConfig {
                key: "minors.time_zone".into(),
                reason: "not an IANA time zone name".into(),
            })?;
        if config.minors.sensitive_age > config.minors.age_of_majority {
            return Err(PolicyError::InvalidConfig {
                key: "minors.sensitive_age".into(),
                reason: "must not exceed minors.age_of_majority".into(),
            });
        }
        Ok(AccountRules {
            suspended_allowed_purposes: purposes(
                "accounts.suspended_allowed_purposes",
                &config.accounts.suspended_allowed_purposes,
            )?,
            consent_exempt_purposes: purposes(
                "minors.consent_exempt_purposes",
                &config.minors.consent_exempt_purposes,
            )?,
            age_of_majority: config.minors.age_of_majority,
            sensitive_age: config.minors.sensitive_age,
            zone,
            current_policy_version: non_empty(config.privacy_policy.current_version.trim()),
        })
    }
}

/// What the login path learns about an account: never identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountView {
    pub status: AccountStatus,
    pub minor: bool,
    pub under_14: bool,
    pub guardian_consent_required: bool,
    pub policy_reconsent_required: bool,
}

impl AccountView {
    /// What `CheckAccount` released, as its audit event records it: the status and, for a
    /// live account, each flag (derived from the birth date, so sensitive for a minor), all
    /// released as plain values.
    pub fn released_flags(&self) -> Vec<(String, String)> {
        let mut released = vec!["status"];
        if self.status != AccountStatus::Deleted {
            released.extend([
                "minor",
                "under_14",
                "guardian_consent_required",
                "policy_reconsent_required",
            ]);
        }
        released
            .into_iter()
            .map(|flag| (flag.to_owned(), ReleaseLevel::Plain.as_str().to_owned()))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    Suspended,
    Deleted,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "ACTIVE",
            AccountStatus::Suspended => "SUSPENDED",
            AccountStatus::Deleted => "DELETED",
        }
    }
}

/// Why an account was suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspensionReason {
    UserRequest,
    CredentialCompromise,
    PolicyViolation,
    LegalOrder,
    Other,
}

impl SuspensionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspensionReason::UserRequest => "USER_REQUEST",
            SuspensionReason::CredentialCompromise => "CREDENTIAL_COMPROMISE",
            SuspensionReason::PolicyViolation => "POLICY_VIOLATION",
            SuspensionReason::LegalOrder => "LEGAL_ORDER",
            SuspensionReason::Other => "OTHER",
        }
    }
}

/// A staff member's action on an account, as the edge hands it in.
pub struct AccountAction {
    pub record_id: String,
    pub reason: Option<SuspensionReason>,
    pub note: String,
    pub ticket: String,
}

/// One history entry as released: the note opened when the record still exists.
pub struct AccountHistoryEntry {
    pub row: AccountEventRow,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relationship {
    Parent,
    LegalGuardian,
    Other,
}

impl Relationship {
    pub fn as_str(self) -> &'static str {
        match self {
            Relationship::Parent => "PARENT",
            Relationship::LegalGuardian => "LEGAL_GUARDIAN",
            Relationship::Other => "OTHER",
        }
    }
}

/// Who consents for a minor.
pub enum Guardian {
    Record(String),
    /// A guardian without a record: name, document and phone, validated like any identity.
    Identity(IdentityInput),
}

pub struct ConsentRequest {
    pub record_id: String,
    pub guardian: Guardian,
    pub relationship: Relationship,
    pub evidence_ref: String,
    pub policy_version: String,
}

impl Vault {
    /// Seals a birth date under the state key of `index_keys` (the active index version's,
    /// which the write also stores as the record's index version), bound to the record.
    pub(crate) fn seal_age_gate(
        &self,
        index_keys: &IndexKeyPair,
        record_id: &RecordId,
        birth: Option<NaiveDate>,
    ) -> Result<Option<Vec<u8>>, VaultError> {
        let Some(birth) = birth else {
            return Ok(None);
        };
        let sealed = index_keys.blind_index.derive_state_key().seal(
            record_id.as_str(),
            AGE_GATE_FIELD,
            birth.format("%Y-%m-%d").to_string().as_bytes(),
        )?;
        Ok(Some(sealed))
    }

    /// The state key a record's age gate is sealed under: its index version's.
    fn state_key(&self, state: &AccountState) -> Result<StateKey, VaultError> {
        Ok(self
            .keys
            .index_keys(state.index_version)?
            .blind_index
            .derive_state_key())
    }

    fn birth_date(
        &self,
        record_id: &RecordId,
        state: &AccountState,
    ) -> Result<Option<NaiveDate>, VaultError> {
        let Some(gate) = &state.age_gate else {
            return Ok(None);
        };
        let opened = self
            .state_key(state)?
            .open(record_id.as_str(), AGE_GATE_FIELD, gate)?;
        let text = std::str::from_utf8(&opened).map_err(|_| VaultError::DataLoss)?;
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| VaultError::DataLoss)
    }

    fn is_minor(&self, record_id: &RecordId, state: &AccountState) -> Result<bool, VaultError> {
        Ok(self
            .birth_date(record_id, state)?
            .is_some_and(|birth| !has_reached(birth, self.rules().age_of_majority, self.today())))
    }

    /// Refuses a release the account's state forbids: a suspension (unless the purpose is
    /// allowed on suspended accounts), or a minor without a guardian's consent (unless the
    /// purpose is exempt).
    pub(crate) fn check_release_allowed(
        &self,
        record_id: &RecordId,
        purpose: &Purpose,
        state: &AccountState,
    ) -> Result<(), VaultError> {
        if state.suspended
            && !self
                .rules()
                .suspended_allowed_purposes
                .contains(&purpose.name)
        {
            return Err(VaultError::AccountSuspended);
        }
        if state.active_consents == 0
            && !self.rules().consent_exempt_purposes.contains(&purpose.name)
            && self.is_minor(record_id, state)?
        {
            return Err(VaultError::GuardianConsentRequired);
        }
        Ok(())
    }

    /// The login path: status and flags, from account state alone. Audited like a read (the
    /// flags are what it releases), through the group-commit writer, one event per call.
    pub async fn check_account(
        &self,
        ctx: &CallContext,
        record_id: &str,
    ) -> Result<AccountView, VaultError> {
        let subject = AuditSubject::new(Rpc::CheckAccount.as_str()).record(record_id);
        let result = async {
            let record_id = RecordId::parse("record_id", record_id)?;
            self.authorize(ctx, Rpc::CheckAccount)?;
            let view = self.account_view(&record_id).await?;
            let mut event = self.event(
                ctx,
                Rpc::CheckAccount.as_str(),
                vec![record_id.into_string()],
                "OK",
                None,
            );
            event.released = view.released_flags();
            self.commit_before_answer(event).await?;
            Ok(view)
        }
        .await;
        self.audited(ctx, subject, result).await
    }

    async fn account_view(&self, record_id: &RecordId) -> Result<AccountView, VaultError> {
        let state = self
            .store
            .account_state(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        if state.deleted {
            return Ok(AccountView {
                status: AccountStatus::Deleted,
                minor: false,
                under_14: false,
                guardian_consent_required: false,
                policy_reconsent_required: false,
            });
        }
        let birth = self.birth_date(record_id, &state)?;
        let today = self.today();
        let minor = birth.is_some_and(|b| !has_reached(b, self.rules().age_of_majority, today));
        let under_14 = birth.is_some_and(|b| !has_reached(b, self.rules().sensitive_age, today));
        Ok(AccountView {
            status: if state.suspended {
                AccountStatus::Suspended
            } else {
                AccountStatus::Active
            },
            minor,
            under_14,
            guardian_consent_required: minor && state.active_consents == 0,
            policy_reconsent_required: self
                .rules()
                .current_policy_version
                .as_ref()
                .is_some_and(|current| state.policy_version.as_ref() != Some(current)),
        })
    }

    /// Suspends (`suspend = true`) or reinstates an account. Returns whether anything changed.
    pub async fn set_suspension(
        &self,
        ctx: &CallContext,
        action: AccountAction,
        suspend: bool,
    ) -> Result<bool, VaultError> {
        let rpc = if suspend {
            "SuspendAccount"
        } else {
            "ReinstateAccount"
        };
        let subject = AuditSubject::new(rpc)
            .record(&action.record_id)
            .text(&action.ticket, MAX_REFERENCE_BYTES);
        let result = self.suspension(ctx, rpc, action, suspend).await;
        self.audited(ctx, subject, result).await
    }

    async fn suspension(
        &self,
        ctx: &CallContext,
        rpc: &str,
        action: AccountAction,
        suspend: bool,
    ) -> Result<bool, VaultError> {
        let record_id = &RecordId::parse("record_id", &action.record_id)?;
        let note = FreeText::parse("note", &action.note, MAX_NOTE_BYTES)?;
        let ticket = FreeText::parse("ticket", &action.ticket, MAX_REFERENCE_BYTES)?;
        self.require_grant(ctx, Grant::AccountsSuspend)?;
        if suspend && action.reason.is_none() {
            return Err(violation("reason", "is required"));
        }
        let sealed = self.seal_note(record_id, note.as_str()).await?;
        let now = self.now_micros();
        let reason = action.reason.map(|r| r.as_str().to_owned());
        let history = AccountEventRow {
            event_id: AccountEventId::generate(),
            record_id: record_id.clone(),
            occurred_at: now,
            kind: if suspend { "SUSPENDED" } else { "REINSTATED" }.to_owned(),
            actor: ctx.caller.name.clone(),
            reason: reason.clone(),
            note: sealed.note,
            ticket: ticket.non_empty(),
            consent_id: None,
        };
        let mut audit = self.event(ctx, rpc, vec![record_id.to_string()], "OK", reason);
        audit.justification = ticket.non_empty();
        let changed = self
            .store
            .set_suspended(
                record_id,
                suspend,
                &history,
                sealed.under.as_deref(),
                &audit,
            )
            .await?;
        if !changed {
            // Nothing was written with the change; the decision is still on record.
            audit.outcome = "UNCHANGED".into();
            self.audit
                .record(audit)
                .await
                .map_err(|_| VaultError::AuditUnavailable)?;
        }
        Ok(changed)
    }

    /// An account's history, oldest first, with notes opened while the record exists.
    pub async fn account_history(
        &self,
        ctx: &CallContext,
        record_id: &str,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<AccountHistoryEntry>, VaultError> {
        let subject = AuditSubject::new("ListAccountEvents").record(record_id);
        let result = self.history(ctx, record_id, limit, after).await;
        self.audited(ctx, subject, result).await
    }

    async fn history(
        &self,
        ctx: &CallContext,
        record_id: &str,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<AccountHistoryEntry>, VaultError> {
        let record_id = &RecordId::parse("record_id", record_id)?;
        self.require_grant(ctx, Grant::AccountsSuspend)?;
        if self.store.account_state(record_id).await?.is_none() {
            return Err(VaultError::NotFound);
        }
        let rows = self
            .store
            .list_account_events(record_id, limit, after)
            .await?;
        let dek = match self.store.get_record(record_id).await? {
            Some(stored) => Some(
                self.keys
                    .unwrap(&stored.wrapped_key, record_id.as_str())
                    .await?,
            ),
            None => None,
        };
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let note = match (&dek, &row.note) {
                (Some(dek), Some(sealed)) => {
                    let opened = dek.open_field(record_id.as_str(), NOTE_FIELD, sealed)?;
                    Some(String::from_utf8(opened.to_vec()).map_err(|_| VaultError::DataLoss)?)
                }
                _ => None,
            };
            entries.push(AccountHistoryEntry { row, note });
        }
        let event = self.event(
            ctx,
            "ListAccountEvents",
            vec![record_id.to_string()],
            "OK",
            None,
        );
        self.audit
            .record(event)
            .await
            .map_err(|_| VaultError::AuditUnavailable)?;
        Ok(entries)
    }

    /// Seals a staff note under the record's data key, so it is shredded with the record.
    /// Fails when the record is not live, note or no note.
    async fn seal_note(&self, record_id: &RecordId, note: &str) -> Result<SealedNote, VaultError> {
        let stored = self
            .store
            .get_record(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        if note.is_empty() {
            return Ok(SealedNote::default());
        }
        let dek = self
            .keys
            .unwrap(&stored.wrapped_key, record_id.as_str())
            .await?;
        Ok(SealedNote {
            note: Some(dek.seal_field(record_id.as_str(), NOTE_FIELD, note.as_bytes())?),
            under: Some(stored.wrapped_key),
        })
    }

    pub async fn record_guardian_consent(
        &self,
        ctx: &CallContext,
        request: ConsentRequest,
    ) -> Result<ConsentRow, VaultError> {
        let mut subject = AuditSubject::new(Rpc::RecordGuardianConsent.as_str())
            .record(&request.record_id)
            .text(&request.evidence_ref, MAX_REFERENCE_BYTES);
        if let Guardian::Record(guardian_id) = &request.guardian {
            subject = subject.record(guardian_id);
        }
        let result = self.consent(ctx, request).await;
        self.audited(ctx, subject, result).await
    }

    async fn consent(
        &self,
        ctx: &CallContext,
        request: ConsentRequest,
    ) -> Result<ConsentRow, VaultError> {
        let record_id = &RecordId::parse("record_id", &request.record_id)?;
        let guardian_record = match &request.guardian {
            Guardian::Record(id) => Some(RecordId::parse("guardian_record_id", id)?),
            Guardian::Identity(_) => None,
        };
        FreeText::required(
            "evidence_ref",
            &request.evidence_ref,
            MAX_REFERENCE_BYTES,
            MIN_JUSTIFICATION_CHARS,
        )?;
        FreeText::required(
            "policy_version",
            &request.policy_version,
            MAX_POLICY_VERSION_BYTES,
            1,
        )?;
        self.authorize(ctx, Rpc::RecordGuardianConsent)?;
        let minor = self
            .store
            .get_record(record_id)
            .await?
            .ok_or(VaultError::NotFound)?;
        if minor.account.suspended && !ctx.caller.has_grant(Grant::AccountsSuspend) {
            return Err(VaultError::AccountSuspended);
        }
        if !self.is_minor(record_id, &minor.account)? {
            return Err(VaultError::NotAMinor);
        }
        let consent_id = ConsentId::generate();
        let (guardian_record_id, guardian_sealed) = match (request.guardian, guardian_record) {
            (_, Some(guardian_id)) => {
                self.check_guardian_record(record_id, &guardian_id).await?;
                (Some(guardian_id), None)
            }
            (Guardian::Record(_), None) => {
                return Err(VaultError::Internal("guardian record id not parsed"));
            }
            (Guardian::Identity(input), None) => {
                let sealed = self
                    .seal_guardian_identity(record_id, &minor.wrapped_key, &consent_id, input)
                    .await?;
                (None, Some(sealed))
            }
        };
        let now = self.now_micros();
        let consent = ConsentRow {
            consent_id: consent_id.clone(),
            record_id: record_id.clone(),
            guardian_record_id,
            guardian_sealed,
            relationship: request.relationship.as_str().to_owned(),
            evidence_ref: request.evidence_ref,
            policy_version: request.policy_version,
            granted_at: now,
            granted_by: ctx.caller.name.clone(),
        };
        let history = AccountEventRow {
            event_id: AccountEventId::generate(),
            record_id: record_id.clone(),
            occurred_at: now,
            kind: "CONSENT_RECORDED".into(),
            actor: ctx.caller.name.clone(),
            reason: None,
            note: None,
            ticket: None,
            consent_id: Some(consent_id),
        };
        let mut record_ids = vec![record_id.to_string()];
        record_ids.extend(consent.guardian_record_id.as_ref().map(RecordId::to_string));
        let mut audit = self.event(
            ctx,
            Rpc::RecordGuardianConsent.as_str(),
            record_ids,
            "OK",
            None,
        );
        audit.justification = Some(consent.evidence_ref.clone());
        // An inline guardian is sealed under the minor's key: the write re-checks that key.
        let sealed_under = consent
            .guardian_sealed
            .as_ref()
            .map(|_| &minor.wrapped_key[..]);
        self.store
            .insert_consent(&consent, &history, sealed_under, &audit)
            .await?;
        Ok(consent)
    }

    async fn check_guardian_record(
        &self,
        minor_id: &RecordId,
        guardian_id: &RecordId,
    ) -> Result<(), VaultError> {
        if guardian_id == minor_id {
            return Err(violation(
                "guardian_record_id",
                "must not be the minor's own record",
            ));
        }
        let state = self
            .store
            .account_state(guardian_id)
            .await?
            .filter(|state| !state.deleted)
            .ok_or_else(|| violation("guardian_record_id", "names no live record"))?;
        let adult = self
            .birth_date(guardian_id, &state)?
            .is_some_and(|birth| has_reached(birth, self.rules().age_of_majority, self.today()));
        if adult {
            Ok(())
        } else {
            Err(VaultError::GuardianNotAdult)
        }
    }

    /// Validates a guardian given inline and seals their identity under the minor's key.
    async fn seal_guardian_identity(
        &self,
        minor_id: &RecordId,
        minor_wrapped_key: &[u8],
        consent_id: &ConsentId,
        input: IdentityInput,
    ) -> Result<Vec<u8>, VaultError> {
        let guardian = Identity::parse(input, self.today()).map_err(|violations| {
            VaultError::InvalidArgument(
                violations
                    .into_iter()
                    .map(|v| {
                        let field = format!("guardian_identity.{}", v.field);
                        v.moved_to(field)
                    })
                    .collect(),
            )
        })?;
        let document = guardian.id_document().ok_or_else(|| {
            violation(
                "guardian_identity.id_number",
                "is required to establish the guardian's age",
            )
        })?;
        let birth = document.birth_date().ok_or(VaultError::GuardianNotAdult)?;
        if !has_reached(birth, self.rules().age_of_majority, self.today()) {
            return Err(VaultError::GuardianNotAdult);
        }
        let same_person = self
            .find_by_document(document)
            .await?
            .iter()
            .any(|found| found.record_id == *minor_id);
        if same_person {
            return Err(violation(
                "guardian_identity.id_number",
                "is the minor's own document",
            ));
        }
        let canonical: Vec<(String, String)> = guardian
            .canonical_fields()
            .into_iter()
            .filter(|(field, _)| {
                matches!(
                    field,
                    FieldName::Name | FieldName::IdType | FieldName::IdNumber | FieldName::Phone
                )
            })
            .map(|(field, value)| (field.as_str().to_owned(), value))
            .collect();
        let plaintext =
            zeroize::Zeroizing::new(serde_json::to_vec(&canonical).map_err(VaultError::Encode)?);
        let dek = self
            .keys
            .unwrap(minor_wrapped_key, minor_id.as_str())
            .await?;
        Ok(dek.seal_field(
            minor_id.as_str(),
            &guardian_field(consent_id.as_str()),
            &plaintext,
        )?)
    }

    pub async fn revoke_guardian_consent(
        &self,
        ctx: &CallContext,
        record_id: &str,
        consent_id: Option<&str>,
        note: &str,
    ) -> Result<Vec<ConsentId>, VaultError> {
        let subject = AuditSubject::new(Rpc::RevokeGuardianConsent.as_str()).record(record_id);
        let result = self.revoke(ctx, record_id, consent_id, note).await;
        self.audited(ctx, subject, result).await
    }

    async fn revoke(
        &self,
        ctx: &CallContext,
        record_id: &str,
        consent_id: Option<&str>,
        note: &str,
    ) -> Result<Vec<ConsentId>, VaultError> {
        let record_id = &RecordId::parse("record_id", record_id)?;
        let note = FreeText::parse("note", note, MAX_NOTE_BYTES)?;
        let consent_id = consent_id
            .map(|raw| ConsentId::parse("consent_id", raw))
            .transpose()?;
        self.authorize(ctx, Rpc::RevokeGuardianConsent)?;
        let sealed = self.seal_note(record_id, note.as_str()).await?;
        let history = AccountEventRow {
            event_id: AccountEventId::generate(),
            record_id: record_id.clone(),
            occurred_at: self.now_micros(),
            kind: "CONSENT_REVOKED".into(),
            actor: ctx.caller.name.clone(),
            reason: None,
            note: sealed.note,
            ticket: None,
            consent_id: None,
        };
        let audit: AuditEvent = self.event(
            ctx,
            Rpc::RevokeGuardianConsent.as_str(),
            vec![record_id.to_string()],
            "OK",
            None,
        );
        let revoked = self
            .store
            .revoke_consents(
                record_id,
                consent_id.as_ref(),
                &history,
                sealed.under.as_deref(),
                &audit,
            )
            .await?;
        if revoked.is_empty() {
            return Err(violation(
                "consent_id",
                "names no active consent of this record",
            ));
        }
        Ok(revoked)
    }
}

/// Associated-data name of a staff note. Notes are bound to their record (and to being a
/// note), not to their history row, so one sealing serves every row an action writes.
pub(crate) const NOTE_FIELD: &str = "account.note";

/// Associated-data name of an inline guardian's identity, sealed under the minor's key.
pub(crate) fn guardian_field(consent_id: &str) -> String {
    format!("guardian.{consent_id}")
}

/// A note sealed under a record's data key, and that key as wrapped when it was sealed: the
/// write re-checks the record still has it (a re-key in between would strand the note).
#[derive(Default)]
struct SealedNote {
    note: Option<Vec<u8>>,
    under: Option<Vec<u8>>,
}
