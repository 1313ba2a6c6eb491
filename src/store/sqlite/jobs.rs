//! SQLite SQL of the jobs aggregate: rewrap job rows and their leases, and the rewrap and
//! re-index batches.
//!
//! A batch is read on a reader thread, computed by the caller (unwrapping and wrapping keys,
//! re-computing indexes: crypto, possibly in a hardware module, never on the writer thread,
//! where it would hold up every other write), and written by one writer job. Every row's
//! update is a compare-and-swap on what the batch read, so a record re-keyed, updated or
//! deleted in between keeps what its writer gave it; the job re-checks in its transaction
//! that the target version is still active.

use crate::domain::ids::{JobId, RecordId};
use rusqlite::Connection;

use super::driver::{execute, first, rows, scalar};
use super::keys::{index_active, kek_active};
use crate::store::rules::{self, Columns};
use crate::store::{
    JobOwner, ReindexRow, Reindexed, RewrapBatch, RewrapJobRow, StoreError, queries,
};

pub(super) fn start(
    conn: &Connection,
    job_id: &JobId,
    target: u32,
    owner: &JobOwner,
    now: i64,
    lease_until: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::INSERT_REWRAP_JOB,
        &[
            &job_id,
            &i64::from(target),
            &now,
            &owner.instance,
            &owner.process,
            &lease_until,
        ],
    )?;
    Ok(())
}

pub(super) fn renew(
    conn: &Connection,
    job_id: &JobId,
    lease_until: i64,
) -> Result<bool, StoreError> {
    Ok(execute(conn, queries::RENEW_REWRAP_LEASE, &[&job_id, &lease_until])? > 0)
}

pub(super) fn interrupt_abandoned(
    conn: &Connection,
    me: &JobOwner,
    now: i64,
    legacy_lease: i64,
) -> Result<u64, StoreError> {
    execute(
        conn,
        queries::INTERRUPT_ABANDONED_JOBS,
        &[&now, &legacy_lease, &me.instance, &me.process],
    )
}

pub(super) fn list(conn: &Connection, limit: i64) -> Result<Vec<RewrapJobRow>, StoreError> {
    rows(conn, queries::SELECT_REWRAP_JOBS, &[&limit], |row| {
        rules::rewrap_job(row)
    })
}

pub(super) fn finish(
    conn: &Connection,
    job_id: &JobId,
    state: &str,
    now: i64,
) -> Result<(), StoreError> {
    execute(conn, queries::FINISH_REWRAP_JOB, &[&job_id, &state, &now])?;
    Ok(())
}

pub(super) fn get(
    conn: &Connection,
    job_id: &JobId,
) -> Result<Option<(i64, i64, String)>, StoreError> {
    first(conn, queries::SELECT_REWRAP_JOB, &[&job_id], |row| {
        Ok((row.get("rewrapped")?, row.get("failed")?, row.get("state")?))
    })
}

pub(super) fn count_older(conn: &Connection, target: u32) -> Result<i64, StoreError> {
    scalar(conn, queries::COUNT_OLDER_THAN, &[&i64::from(target)])
}

pub(super) fn count_index_older(conn: &Connection, target: u32) -> Result<i64, StoreError> {
    scalar(conn, queries::COUNT_INDEX_OLDER_THAN, &[&i64::from(target)])
}

/// Up to `limit` live records under a KEK older than `target`, after `after`: (record id,
/// wrapped key).
pub(super) fn select_rewrap(
    conn: &Connection,
    target: u32,
    after: &str,
    limit: i64,
) -> Result<Vec<(RecordId, Vec<u8>)>, StoreError> {
    rows(
        conn,
        super::SELECT_REWRAP_BATCH,
        &[&i64::from(target), &after, &limit],
        |row| Ok((row.record_id("record_id")?, row.get("wrapped_key")?)),
    )
}

/// Writes a rewrap batch: `rewrapped` holds (record id, key as read, key re-wrapped).
pub(super) fn write_rewrap(
    conn: &Connection,
    job_id: &JobId,
    target: u32,
    rewrapped: &[(RecordId, Vec<u8>, Vec<u8>)],
    failed: u64,
    now: i64,
) -> Result<Option<u64>, StoreError> {
    if !kek_active(conn, target)? {
        return Ok(None);
    }
    let mut changed = 0;
    for (record_id, old, new) in rewrapped {
        changed += execute(
            conn,
            queries::REWRAP_RECORD,
            &[record_id, new, &i64::from(target), old],
        )?;
    }
    execute(
        conn,
        queries::ADVANCE_REWRAP_JOB,
        &[&job_id, &(changed as i64), &(failed as i64), &now],
    )?;
    Ok(Some(changed))
}

/// A re-index batch as read: each row with its record version (the compare-and-swap's).
pub(super) fn select_reindex(
    conn: &Connection,
    target: u32,
    after: &str,
    limit: i64,
) -> Result<Vec<(ReindexRow, i64)>, StoreError> {
    let selected: Vec<(ReindexRow, i64)> = rows(
        conn,
        super::SELECT_REINDEX_BATCH,
        &[&i64::from(target), &after, &limit],
        |row| {
            let wrapped_key: Option<Vec<u8>> = row.get("wrapped_key")?;
            Ok((
                ReindexRow {
                    record_id: row.record_id("record_id")?,
                    index_version: rules::to_version(row.get("index_version")?)?,
                    wrapped_key: wrapped_key.unwrap_or_default(),
                    fields: Vec::new(),
                    age_gate: row.get("age_gate")?,
                },
                row.get("version")?,
            ))
        },
    )?;
    selected
        .into_iter()
        .map(|(mut row, version)| {
            let encoded = first(conn, queries::SELECT_FIELDS, &[&row.record_id], |f| {
                Ok(f.get(0)?)
            })?;
            row.fields = rules::stored_fields(encoded, &rules::INDEXED_FIELDS)?;
            Ok((row, version))
        })
        .collect()
}

/// One re-indexed record: its id, the version and index version read, and the new values.
pub(super) type ReindexWrite = (RecordId, i64, u32, Reindexed);

pub(super) fn write_reindex(
    conn: &Connection,
    job_id: &JobId,
    target: u32,
    done: &[ReindexWrite],
    failed: u64,
    now: i64,
) -> Result<Option<u64>, StoreError> {
    if !index_active(conn, target)? {
        return Ok(None);
    }
    let mut changed = 0;
    for (record_id, version, index_version, new) in done {
        changed += execute(
            conn,
            queries::REINDEX_RECORD,
            &[
                record_id,
                &new.document_index,
                &new.phone_index,
                &new.age_gate,
                &i64::from(target),
                version,
                &i64::from(*index_version),
            ],
        )?;
    }
    execute(
        conn,
        queries::ADVANCE_REINDEX_JOB,
        &[
            &job_id,
            &(changed as i64),
            &(failed as i64),
            &now,
            &i64::from(target),
        ],
    )?;
    Ok(Some(changed))
}

/// A batch's outcome from what was selected and what the write did (`None`: the target was
/// no longer active, nothing written).
pub(super) fn outcome(
    selected: usize,
    last_record_id: Option<RecordId>,
    changed: Option<u64>,
    failed: u64,
) -> RewrapBatch {
    match changed {
        None => RewrapBatch {
            target_inactive: true,
            ..RewrapBatch::default()
        },
        Some(changed) => RewrapBatch {
            selected,
            rewrapped: changed,
            failed,
            last_record_id,
            target_inactive: false,
        },
    }
}
