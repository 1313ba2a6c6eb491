//! Every decision is audited, refusals included: what a refused call's event may say, and
//! the one path that writes it.
//!
//! A granted call writes its own event (in the change's transaction for writes, through the
//! group-commit writer for reads). A refused call wrote nothing before: a refused write's
//! event was in the transaction that rolled back. Here every use case settles its outcome
//! through [`Vault::audited`], which writes a refusal event through the audit log in a write
//! of its own.
//!
//! A refusal event holds only values the vault has checked, because the caller may be
//! hostile: an [`AuditSubject`] is built from what the caller sent before the call runs, through
//! the edge's checks (`crate::domain::edge`), so a malformed record id becomes a placeholder with its
//! length and an unknown purpose a placeholder, whatever step refused the call. Free text (a
//! justification, a reason, a ticket) is kept only when it passed the checks and the caller
//! was allowed to make the call: a caller refused for its grants, or for bad input, does not
//! get to write prose into the trail.
//!
//! Writing a refusal event is best effort: a refusal releases nothing, so failing to record it
//! must not turn it into an outage; the failure is logged.

use crate::domain::edge::{FreeText, audit_purpose, audit_record_id};
use crate::keys::KeyError;
use crate::policy::Policy;

use super::{CallContext, Vault, VaultError};

/// What a call's audit event may say about its request, from checked values only.
#[derive(Clone, Debug)]
pub struct AuditSubject {
    rpc: String,
    record_ids: Vec<String>,
    purpose: Option<String>,
    text: Option<FreeText>,
}

impl AuditSubject {
    pub fn new(rpc: &str) -> AuditSubject {
        AuditSubject {
            rpc: rpc.to_owned(),
            record_ids: Vec::new(),
            purpose: None,
            text: None,
        }
    }

    /// A record id the caller named (none when it sent an empty one).
    pub fn record(mut self, raw: &str) -> AuditSubject {
        if !raw.is_empty() {
            self.record_ids.push(audit_record_id(raw));
        }
        self
    }

    /// The purpose the caller named, kept by name only when `policy` configures it.
    pub fn purpose(mut self, policy: &Policy, raw: &str) -> AuditSubject {
        self.purpose = audit_purpose(raw, policy.purpose(raw).is_some());
        self
    }

    /// The call's free text (justification, reason, ticket or evidence reference): kept when
    /// it passes the checks for a field of `max_bytes`.
    pub fn text(mut self, raw: &str, max_bytes: usize) -> AuditSubject {
        self.text = FreeText::parse("text", raw, max_bytes)
            .ok()
            .filter(|text| !text.is_empty());
        self
    }

    pub fn rpc(&self) -> &str {
        &self.rpc
    }
}

impl Vault {
    /// Settles a call: a refusal is audited (see the module header) and returned unchanged.
    pub async fn audited<T>(
        &self,
        ctx: &CallContext,
        subject: AuditSubject,
        result: Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        if let Err(error) = &result {
            self.audit_refusal(ctx, subject, error).await;
        }
        result
    }

    /// Commits the event of a granted read or lookup before its answer leaves: fails closed
    /// with [`VaultError::AuditUnavailable`] (the cause is logged, never returned).
    pub(crate) async fn commit_before_answer(
        &self,
        event: crate::audit::AuditEvent,
    ) -> Result<(), VaultError> {
        self.audit.record(event).await.map_err(|error| {
            tracing::error!(%error, "audit write failed; refusing to answer");
            VaultError::AuditUnavailable
        })
    }

    /// Writes the event of a refused call.
    pub async fn audit_refusal(
        &self,
        ctx: &CallContext,
        subject: AuditSubject,
        error: &VaultError,
    ) {
        if matches!(error, VaultError::AuditUnavailable) {
            // The call's own event could not be written; a second write would fail alike.
            return;
        }
        let (outcome, reason) = refusal_reason(error);
        self.write_refusal(ctx, subject, outcome, reason, may_keep_text(error))
            .await;
    }

    /// Writes a refusal event with the given outcome and reason. `keep_text`: whether the
    /// caller's checked free text may be kept.
    pub(crate) async fn write_refusal(
        &self,
        ctx: &CallContext,
        subject: AuditSubject,
        outcome: &str,
        reason: String,
        keep_text: bool,
    ) {
        let mut event = self.event(ctx, &subject.rpc, subject.record_ids, outcome, Some(reason));
        event.purpose = subject.purpose;
        event.justification = subject
            .text
            .filter(|_| keep_text)
            .map(FreeText::into_string);
        if let Err(error) = self.audit.record(event).await {
            tracing::error!(%error, rpc = subject.rpc, "could not audit a refused request");
        }
    }
}

/// Whether a refused call's free text may be kept: not when the caller lacked the grant or
/// the purpose, nor when its input was refused.
pub(crate) fn may_keep_text(error: &VaultError) -> bool {
    !matches!(
        error,
        VaultError::OperationNotGranted(_)
            | VaultError::PurposeNotGranted
            | VaultError::InvalidArgument(_)
    )
}

/// The outcome and reason an audit event records for a refusal. The reason is the one the
/// caller's status carries ([`VaultError::reason`]), except for bad input, whose event names
/// the fields (the status names them in its BadRequest), never values.
pub fn refusal_reason(error: &VaultError) -> (&'static str, String) {
    use VaultError as E;
    let outcome = match error {
        E::InvalidArgument(violations) => {
            let fields = violations.iter().map(|v| v.field.as_str());
            return ("INVALID_ARGUMENT", fields.collect::<Vec<_>>().join(","));
        }
        E::NotFound | E::RecordDeleted => "NOT_FOUND",
        E::OperationNotGranted(_)
        | E::PurposeNotGranted
        | E::DuplicateIdentity
        | E::EtagMismatch
        | E::AccountSuspended
        | E::GuardianConsentRequired
        | E::GuardianNotAdult
        | E::NotAMinor
        | E::ExportNotAllowed
        | E::ExportChanged
        | E::Key(KeyError::Destroyed { .. }) => "DENIED",
        E::DataLoss
        | E::AuditUnavailable
        | E::Storage(_)
        | E::Crypto(_)
        | E::Task(_)
        | E::Encode(_)
        | E::Internal(_)
        | E::Key(_) => "ERROR",
    };
    (outcome, error.reason().to_owned())
}
