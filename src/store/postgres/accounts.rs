//! PostgreSQL SQL of the accounts-and-consents aggregate: suspensions, account history,
//! guardian consents and the ciphertexts bound to a record outside its fields.

use crate::domain::ids::{ConsentId, RecordId};
use sqlx::PgConnection;

use super::audit::append;
use super::records::account_state;
use crate::domain::audit_chain::AuditEvent;
use crate::store::rules;
use crate::store::{AccountEventRow, BoundCiphertexts, ConsentRow, StoreError, queries};

/// A write that sealed under a record's data key share-locks the record's row while it
/// checks the key is still the record's: a re-key (which updates the row) waits for it, or
/// it waits for the re-key and finds the key changed.
const LOCK_RECORD_KEY: &str = "SELECT record_id FROM records \
     WHERE record_id = $1 AND wrapped_key = $2 AND deleted_at IS NULL FOR SHARE";

async fn record_key_is(
    conn: &mut PgConnection,
    record_id: &RecordId,
    sealed_under: Option<&[u8]>,
) -> Result<bool, StoreError> {
    let Some(wrapped_key) = sealed_under else {
        return Ok(true);
    };
    let found = sqlx::query(LOCK_RECORD_KEY)
        .bind(record_id.as_str())
        .bind(wrapped_key)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

async fn insert_history(
    conn: &mut PgConnection,
    event: &AccountEventRow,
) -> Result<(), StoreError> {
    sqlx::query(queries::INSERT_ACCOUNT_EVENT)
        .bind(event.event_id.as_str())
        .bind(event.record_id.as_str())
        .bind(event.occurred_at)
        .bind(&event.kind)
        .bind(&event.actor)
        .bind(&event.reason)
        .bind(&event.note)
        .bind(&event.ticket)
        .bind(event.consent_id.as_ref().map(ConsentId::as_str))
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn set_suspended(
    conn: &mut PgConnection,
    record_id: &RecordId,
    suspended: bool,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<bool, StoreError> {
    if !record_key_is(conn, record_id, sealed_under).await? {
        return Err(StoreError::VersionConflict);
    }
    let changed = if suspended {
        sqlx::query(queries::SUSPEND)
            .bind(record_id.as_str())
            .bind(history.occurred_at)
    } else {
        sqlx::query(queries::REINSTATE).bind(record_id.as_str())
    }
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if changed == 0 {
        return rules::unchanged_suspension(account_state(conn, record_id).await?);
    }
    insert_history(conn, history).await?;
    append(conn, std::slice::from_ref(audit), heads).await?;
    Ok(true)
}

pub(super) async fn list_events(
    conn: &mut PgConnection,
    record_id: &RecordId,
    limit: u32,
    after: Option<(i64, String)>,
) -> Result<Vec<AccountEventRow>, StoreError> {
    let (time, event_id) = after.unwrap_or((i64::MIN, String::new()));
    let rows = sqlx::query(queries::LIST_ACCOUNT_EVENTS)
        .bind(record_id.as_str())
        .bind(time)
        .bind(event_id)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await?;
    rows.iter().map(rules::account_event).collect()
}

pub(super) async fn insert_consent(
    conn: &mut PgConnection,
    consent: &ConsentRow,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<(), StoreError> {
    if !record_key_is(conn, &consent.record_id, sealed_under).await? {
        return Err(StoreError::VersionConflict);
    }
    sqlx::query(queries::INSERT_CONSENT)
        .bind(consent.consent_id.as_str())
        .bind(consent.record_id.as_str())
        .bind(consent.guardian_record_id.as_ref().map(RecordId::as_str))
        .bind(&consent.guardian_sealed)
        .bind(&consent.relationship)
        .bind(&consent.evidence_ref)
        .bind(&consent.policy_version)
        .bind(consent.granted_at)
        .bind(&consent.granted_by)
        .execute(&mut *conn)
        .await?;
    insert_history(conn, history).await?;
    append(conn, std::slice::from_ref(audit), heads).await
}

pub(super) async fn revoke_consents(
    conn: &mut PgConnection,
    record_id: &RecordId,
    consent_id: Option<&ConsentId>,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<Vec<ConsentId>, StoreError> {
    if !record_key_is(conn, record_id, sealed_under).await? {
        return Err(StoreError::VersionConflict);
    }
    let revoked: Vec<String> = sqlx::query_scalar(queries::REVOKE_CONSENTS)
        .bind(record_id.as_str())
        .bind(consent_id.map(ConsentId::as_str))
        .bind(history.occurred_at)
        .bind(&history.actor)
        .fetch_all(&mut *conn)
        .await?;
    let revoked = revoked
        .iter()
        .map(|raw| rules::stored_id("consent_id", raw, ConsentId::parse))
        .collect::<Result<Vec<_>, _>>()?;
    if revoked.is_empty() {
        return Ok(revoked);
    }
    for entry in rules::revocation_entries(history, &revoked) {
        insert_history(conn, &entry).await?;
    }
    append(conn, &[rules::revocation_event(audit, record_id)], heads).await?;
    Ok(revoked)
}

pub(super) async fn bound_ciphertexts(
    conn: &mut PgConnection,
    record_id: &RecordId,
) -> Result<BoundCiphertexts, StoreError> {
    let notes: Vec<(String, Vec<u8>)> = sqlx::query_as(queries::SELECT_BOUND_NOTES)
        .bind(record_id.as_str())
        .fetch_all(&mut *conn)
        .await?;
    let guardians: Vec<(String, Vec<u8>)> = sqlx::query_as(queries::SELECT_BOUND_GUARDIANS)
        .bind(record_id.as_str())
        .fetch_all(&mut *conn)
        .await?;
    Ok(BoundCiphertexts { notes, guardians })
}
