//! Reading the audit trail: listings for compliance staff, the disclosures one person can be
//! told about, and chain verification. Reading the trail is itself audited, and so is a
//! refused attempt to read it.
//!
//! Filters are checked like every request string (they reach the database's query and the
//! read's audit event), and time bounds must be real instants: a bound outside years
//! 1..=9999 or with nanoseconds outside `0..10^9` is `INVALID_ARGUMENT`, not a silently
//! clamped query.

use crate::audit::{StoredEvent, VerifyReport, Witness};
use crate::domain::Violation;
use crate::domain::edge::{FreeText, MAX_FILTER_BYTES, MAX_PURPOSE_BYTES, RecordId, check_text};
use crate::policy::Grant;
use crate::store::{AuditQuery, Micros};

use super::decisions::AuditSubject;
use super::{CallContext, Vault, VaultError, violation};

/// Seconds of 0001-01-01T00:00:00Z and of 9999-12-31T23:59:59Z: the range of
/// `google.protobuf.Timestamp`.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A time bound as the wire carries it: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeBound {
    pub seconds: i64,
    pub nanos: i32,
}

/// An audit listing as requested, before its strings and bounds are checked.
#[derive(Clone, Debug, Default)]
pub struct AuditFilters {
    pub record_id: String,
    pub caller: String,
    pub purpose: String,
    pub outcome: String,
    pub start: Option<TimeBound>,
    pub end: Option<TimeBound>,
    pub plaintext_only: bool,
    pub limit: u32,
    pub after: Option<(Micros, String)>,
}

impl Vault {
    /// Audit events for compliance staff, newest first.
    pub async fn list_audit_events(
        &self,
        ctx: &CallContext,
        filters: AuditFilters,
    ) -> Result<Vec<StoredEvent>, VaultError> {
        let subject = AuditSubject::new("ListAuditEvents").record(&filters.record_id);
        let result = self.read_audit_events(ctx, filters).await;
        self.audited(ctx, subject, result).await
    }

    async fn read_audit_events(
        &self,
        ctx: &CallContext,
        filters: AuditFilters,
    ) -> Result<Vec<StoredEvent>, VaultError> {
        let query = audit_query(filters)?;
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
        let subject = AuditSubject::new("ListDisclosures").record(record_id);
        let result = async {
            let record_id = RecordId::parse("record_id", record_id)?;
            self.require_grant(ctx, Grant::AuditRead)?;
            let purposes = ctx.policy.disclosure_purposes();
            let events = self
                .store
                .list_disclosures(&record_id, &purposes, limit, after)
                .await?;
            self.audit_read(ctx, "ListDisclosures", Some(record_id))
                .await?;
            Ok(events)
        }
        .await;
        self.audited(ctx, subject, result).await
    }

    pub async fn verify_audit(&self, ctx: &CallContext) -> Result<VerifyReport, VaultError> {
        let result = async {
            self.require_grant(ctx, Grant::AuditRead)?;
            let public = self.keys.audit_signing().public_key();
            let witness_file = self
                .checkpoint_signer()
                .and_then(|signer| signer.witness_file())
                .map(ToOwned::to_owned);
            let witness = match witness_file {
                Some(path) => Some(
                    tokio::task::spawn_blocking(move || {
                        Witness::read(&path).unwrap_or_else(|error| Witness::unreadable(&error))
                    })
                    .await
                    .map_err(VaultError::Task)?,
                ),
                None => None,
            };
            let report =
                crate::audit::verify_with(self.store.as_ref(), &public, witness.as_ref()).await?;
            self.audit_read(ctx, "VerifyAuditChain", None).await?;
            Ok(report)
        }
        .await;
        self.audited(ctx, AuditSubject::new("VerifyAuditChain"), result)
            .await
    }

    async fn audit_read(
        &self,
        ctx: &CallContext,
        rpc: &str,
        record_id: Option<RecordId>,
    ) -> Result<(), VaultError> {
        let record_ids = record_id.into_iter().map(RecordId::into_string).collect();
        let event = self.event(ctx, rpc, record_ids, "OK", None);
        self.audit
            .record(event)
            .await
            .map_err(|_| VaultError::AuditUnavailable)
    }
}

/// The store query of checked filters; every bad filter is named at once.
fn audit_query(filters: AuditFilters) -> Result<AuditQuery, VaultError> {
    let mut violations = Vec::new();
    let record_id = match optional(&filters.record_id, |raw| RecordId::parse("record_id", raw)) {
        Ok(record_id) => record_id,
        Err(refused) => {
            violations.push(refused);
            None
        }
    };
    let mut keep = |result: Result<Option<String>, Violation>| match result {
        Ok(value) => value,
        Err(refused) => {
            violations.push(refused);
            None
        }
    };
    let caller = keep(optional(&filters.caller, |raw| {
        check_text("caller", raw, MAX_FILTER_BYTES).map(|()| raw.to_owned())
    }));
    let purpose = keep(optional(&filters.purpose, |raw| {
        check_text("purpose", raw, MAX_PURPOSE_BYTES).map(|()| raw.to_owned())
    }));
    let outcome = keep(optional(&filters.outcome, |raw| {
        FreeText::parse("outcome", raw, MAX_FILTER_BYTES).map(FreeText::into_string)
    }));
    let from = filters.start.map(|bound| micros("start_time", bound));
    let to = filters.end.map(|bound| micros("end_time", bound));
    let mut bound = |result: Option<Result<Micros, Violation>>| match result {
        Some(Ok(micros)) => Some(micros),
        Some(Err(refused)) => {
            violations.push(refused);
            None
        }
        None => None,
    };
    let (from, to) = (bound(from), bound(to));
    if !violations.is_empty() {
        return Err(VaultError::InvalidArgument(violations));
    }
    Ok(AuditQuery {
        record_id,
        caller,
        purpose,
        outcome,
        from,
        to,
        plaintext_only: filters.plaintext_only,
        limit: filters.limit,
        after: filters.after,
    })
}

fn optional<T>(
    raw: &str,
    check: impl FnOnce(&str) -> Result<T, Violation>,
) -> Result<Option<T>, Violation> {
    if raw.is_empty() {
        Ok(None)
    } else {
        check(raw).map(Some)
    }
}

/// Microseconds since the epoch of a wire timestamp, if it is a real instant.
pub(crate) fn micros(field: &str, bound: TimeBound) -> Result<Micros, Violation> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&bound.seconds) {
        return Err(Violation::at(field, "must be between the years 1 and 9999"));
    }
    if !(0..1_000_000_000).contains(&bound.nanos) {
        return Err(Violation::at(
            field,
            "nanos must be between 0 and 999999999",
        ));
    }
    // In range by the checks above: |seconds| < 2^38, so the product fits in an i64.
    Ok(bound.seconds * 1_000_000 + i64::from(bound.nanos) / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bounds_must_be_real_instants() {
        let at = |seconds, nanos| micros("start_time", TimeBound { seconds, nanos });
        assert_eq!(at(1, 500_000_000).unwrap(), 1_500_000);
        assert_eq!(
            at(MIN_TIMESTAMP_SECONDS, 0).unwrap(),
            MIN_TIMESTAMP_SECONDS * 1_000_000
        );
        assert!(at(MAX_TIMESTAMP_SECONDS, 999_999_999).is_ok());
        assert!(at(MAX_TIMESTAMP_SECONDS + 1, 0).is_err());
        assert!(at(MIN_TIMESTAMP_SECONDS - 1, 0).is_err());
        assert!(at(i64::MAX, 0).is_err());
        assert!(at(0, -1).is_err());
        assert!(at(0, 1_000_000_000).is_err());
    }
}
