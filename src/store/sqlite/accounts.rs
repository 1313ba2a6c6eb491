//! SQLite SQL of the accounts-and-consents aggregate: suspensions, account history,
//! guardian consents and the ciphertexts bound to a record outside its fields.

use crate::domain::ids::{ConsentId, RecordId};
use rusqlite::Connection;

use super::audit::append;
use super::driver::{execute, first, rows};
use super::records::account_state;
use crate::domain::audit_chain::AuditEvent;
use crate::store::rules;
use crate::store::{AccountEventRow, BoundCiphertexts, ConsentRow, StoreError, queries};

/// Whether the live record still has the wrapped data key `sealed_under` (`None`: nothing to
/// check). The write lock is held from BEGIN IMMEDIATE, so no re-key commits before this
/// transaction ends: what the caller sealed under that key stays openable, or the write is
/// refused.
fn record_key_is(
    conn: &Connection,
    record_id: &RecordId,
    sealed_under: Option<&[u8]>,
) -> Result<bool, StoreError> {
    let Some(wrapped_key) = sealed_under else {
        return Ok(true);
    };
    Ok(first(
        conn,
        super::LOCK_RECORD_KEY,
        &[&record_id, &wrapped_key],
        |_| Ok(()),
    )?
    .is_some())
}

fn insert_history(conn: &Connection, event: &AccountEventRow) -> Result<(), StoreError> {
    execute(
        conn,
        queries::INSERT_ACCOUNT_EVENT,
        &[
            &event.event_id,
            &event.record_id,
            &event.occurred_at,
            &event.kind,
            &event.actor,
            &event.reason,
            &event.note,
            &event.ticket,
            &event.consent_id,
        ],
    )?;
    Ok(())
}

pub(super) fn set_suspended(
    conn: &Connection,
    record_id: &RecordId,
    suspended: bool,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
) -> Result<bool, StoreError> {
    if !record_key_is(conn, record_id, sealed_under)? {
        return Err(StoreError::VersionConflict);
    }
    let changed = if suspended {
        execute(conn, queries::SUSPEND, &[&record_id, &history.occurred_at])?
    } else {
        execute(conn, queries::REINSTATE, &[&record_id])?
    };
    if changed == 0 {
        return rules::unchanged_suspension(account_state(conn, record_id)?);
    }
    insert_history(conn, history)?;
    append(conn, std::slice::from_ref(audit))?;
    Ok(true)
}

pub(super) fn list_events(
    conn: &Connection,
    record_id: &RecordId,
    limit: u32,
    after: Option<(i64, String)>,
) -> Result<Vec<AccountEventRow>, StoreError> {
    let (time, event_id) = after.unwrap_or((i64::MIN, String::new()));
    rows(
        conn,
        queries::LIST_ACCOUNT_EVENTS,
        &[&record_id, &time, &event_id, &i64::from(limit)],
        |row| rules::account_event(row),
    )
}

pub(super) fn insert_consent(
    conn: &Connection,
    consent: &ConsentRow,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    if !record_key_is(conn, &consent.record_id, sealed_under)? {
        return Err(StoreError::VersionConflict);
    }
    execute(
        conn,
        queries::INSERT_CONSENT,
        &[
            &consent.consent_id,
            &consent.record_id,
            &consent.guardian_record_id,
            &consent.guardian_sealed,
            &consent.relationship,
            &consent.evidence_ref,
            &consent.policy_version,
            &consent.granted_at,
            &consent.granted_by,
        ],
    )?;
    insert_history(conn, history)?;
    append(conn, std::slice::from_ref(audit))
}

pub(super) fn revoke_consents(
    conn: &Connection,
    record_id: &RecordId,
    consent_id: Option<&ConsentId>,
    history: &AccountEventRow,
    sealed_under: Option<&[u8]>,
    audit: &AuditEvent,
) -> Result<Vec<ConsentId>, StoreError> {
    if !record_key_is(conn, record_id, sealed_under)? {
        return Err(StoreError::VersionConflict);
    }
    let revoked: Vec<ConsentId> = rows(
        conn,
        queries::REVOKE_CONSENTS,
        &[
            &record_id,
            &consent_id,
            &history.occurred_at,
            &history.actor,
        ],
        |row| rules::stored_id("consent_id", &row.get::<_, String>(0)?, ConsentId::parse),
    )?;
    if revoked.is_empty() {
        return Ok(revoked);
    }
    for entry in rules::revocation_entries(history, &revoked) {
        insert_history(conn, &entry)?;
    }
    append(conn, &[rules::revocation_event(audit, record_id)])?;
    Ok(revoked)
}

pub(super) fn bound_ciphertexts(
    conn: &Connection,
    record_id: &RecordId,
) -> Result<BoundCiphertexts, StoreError> {
    let pair = |row: &rusqlite::Row<'_>| Ok((row.get(0)?, row.get(1)?));
    Ok(BoundCiphertexts {
        notes: rows(conn, queries::SELECT_BOUND_NOTES, &[&record_id], pair)?,
        guardians: rows(conn, queries::SELECT_BOUND_GUARDIANS, &[&record_id], pair)?,
    })
}
