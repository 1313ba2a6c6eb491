//! SQLite SQL of the audit aggregate: appending to chains (inside whichever write's job
//! calls it, so a change and its event commit together), the trail's queries, chain heads,
//! checkpoints and expiry.

use rusqlite::{Connection, ToSql};

use super::driver::{execute, first, rows, scalar};
use crate::audit::{AuditEvent, ChainHead, Checkpoint, ExpiryMarker, StoredEvent};
use crate::store::rules::{self, CheckpointParams};
use crate::store::{AuditQuery, StoreError, queries};

/// Appends `events` to their chain inside the caller's transaction: reserves sequence
/// numbers on the chain's head row, links the events (`rules::link_events`), inserts them,
/// and moves the head.
pub(super) fn append(conn: &Connection, events: &[AuditEvent]) -> Result<(), StoreError> {
    let Some(first_event) = events.first() else {
        return Ok(());
    };
    let chain_id = first_event.chain_id.as_str();
    let (head_seq, head_hash): (i64, Vec<u8>) = first(
        conn,
        queries::ADVANCE_CHAIN,
        &[&chain_id, &(events.len() as i64)],
        |row| Ok((row.get("head_seq")?, row.get("head_hash")?)),
    )?
    .ok_or_else(|| StoreError::Corrupt(format!("audit chain {chain_id} is not registered")))?;
    let (linked, new_head) = rules::link_events(events, head_seq, &head_hash)?;
    for row in &linked {
        execute(
            conn,
            queries::INSERT_AUDIT_EVENT,
            &[
                &row.chain_id,
                &row.seq,
                &row.event_id,
                &row.occurred_at,
                &row.caller,
                &row.peer,
                &row.rpc,
                &row.record_id,
                &row.record_ids,
                &row.purpose,
                &row.justification,
                &row.released,
                &row.plaintext,
                &row.outcome,
                &row.reason,
                &row.request_id,
                &row.trace_id,
                &row.prev_hash,
                &row.hash,
            ],
        )?;
    }
    for (record_id, occurred_at, chain, seq) in rules::event_record_rows(events, &linked) {
        execute(
            conn,
            queries::INSERT_EVENT_RECORD,
            &[&record_id, &occurred_at, &chain, &seq],
        )?;
    }
    execute(conn, queries::SET_CHAIN_HASH, &[&chain_id, &new_head])?;
    Ok(())
}

pub(super) fn register_chain(
    conn: &Connection,
    chain_id: &str,
    started_at: i64,
    genesis: &[u8],
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::REGISTER_CHAIN,
        &[&chain_id, &started_at, &genesis],
    )?;
    Ok(())
}

pub(super) fn list(conn: &Connection, query: &AuditQuery) -> Result<Vec<StoredEvent>, StoreError> {
    let (cursor_time, cursor_id) = query.after.clone().unwrap_or((i64::MAX, String::new()));
    let from = query.from.unwrap_or(i64::MIN);
    let to = query.to.unwrap_or(i64::MAX);
    let limit = i64::from(query.limit);
    let decode = |row: &rusqlite::Row<'_>| rules::stored_event(row);
    match (&query.caller, query.plaintext_only) {
        (Some(caller), true) => rows(
            conn,
            &queries::plaintext_releases(),
            &[caller, &from, &to, &cursor_time, &cursor_id, &limit],
            decode,
        ),
        _ => {
            let sql = if query.record_id.is_some() {
                queries::list_audit_events_of_record()
            } else {
                queries::list_audit_events()
            };
            rows(
                conn,
                &sql,
                &[
                    &query.record_id,
                    &query.caller,
                    &query.purpose,
                    &query.outcome,
                    &from,
                    &to,
                    &cursor_time,
                    &cursor_id,
                    &limit,
                ],
                decode,
            )
        }
    }
}

pub(super) fn disclosures(
    conn: &Connection,
    record_id: &str,
    purposes: &[String],
    limit: u32,
    after: Option<(i64, String)>,
) -> Result<Vec<StoredEvent>, StoreError> {
    if purposes.is_empty() {
        return Ok(Vec::new());
    }
    let (cursor_time, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
    let limit = i64::from(limit);
    let mut params: Vec<&dyn ToSql> = vec![&record_id, &cursor_time, &cursor_id, &limit];
    params.extend(purposes.iter().map(|p| p as &dyn ToSql));
    rows(
        conn,
        &queries::disclosures(purposes.len()),
        &params,
        |row| rules::stored_event(row),
    )
}

pub(super) fn chain_ids(conn: &Connection) -> Result<Vec<String>, StoreError> {
    rows(conn, queries::CHAIN_IDS, &[], |row| Ok(row.get(0)?))
}

pub(super) fn chain_heads(conn: &Connection) -> Result<Vec<ChainHead>, StoreError> {
    rows(conn, queries::CHAIN_HEADS, &[], |row| {
        rules::chain_head(row)
    })
}

pub(super) fn chain_events(
    conn: &Connection,
    chain_id: &str,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    rows(
        conn,
        &queries::chain_events(),
        &[&chain_id, &after_seq, &i64::from(limit)],
        |row| rules::stored_event(row),
    )
}

pub(super) fn insert_checkpoint(
    conn: &Connection,
    params: &CheckpointParams,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::INSERT_CHECKPOINT,
        &[
            &params.created_at,
            &params.heads,
            &params.signature,
            &params.format,
            &params.signer,
            &params.counter,
            &params.key_id,
            &params.prev,
            &params.closed,
        ],
    )?;
    Ok(())
}

pub(super) fn checkpoints(conn: &Connection) -> Result<Vec<Checkpoint>, StoreError> {
    rows(conn, &queries::checkpoints(), &[], |row| {
        rules::checkpoint(row)
    })
}

pub(super) fn latest_checkpoint(
    conn: &Connection,
    signer: &str,
) -> Result<Option<Checkpoint>, StoreError> {
    first(
        conn,
        &queries::latest_signer_checkpoint(),
        &[&signer],
        |row| rules::checkpoint(row),
    )
}

pub(super) fn count_checkpoints(conn: &Connection, signer: &str) -> Result<i64, StoreError> {
    scalar(conn, queries::COUNT_SIGNER_CHECKPOINTS, &[&signer])
}

pub(super) fn has_chained_checkpoints(conn: &Connection) -> Result<bool, StoreError> {
    Ok(scalar::<i64>(conn, queries::CHAINED_CHECKPOINT_EXISTS, &[])? > 0)
}

pub(super) fn expiry_markers(conn: &Connection) -> Result<Vec<ExpiryMarker>, StoreError> {
    rows(conn, queries::EXPIRY_MARKERS, &[], |row| {
        rules::expiry_marker(row)
    })
}

pub(super) fn expire_prefix(conn: &Connection, marker: &ExpiryMarker) -> Result<u64, StoreError> {
    let deleted = execute(
        conn,
        queries::DELETE_CHAIN_PREFIX,
        &[&marker.chain_id, &marker.up_to_seq],
    )?;
    execute(
        conn,
        queries::DELETE_EVENT_RECORDS_PREFIX,
        &[&marker.chain_id, &marker.up_to_seq],
    )?;
    execute(
        conn,
        queries::UPSERT_EXPIRY_MARKER,
        &[
            &marker.chain_id,
            &marker.up_to_seq,
            &marker.hash,
            &marker.expired_at,
            &marker.signature,
        ],
    )?;
    Ok(deleted)
}
