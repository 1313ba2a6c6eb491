//! SQLite SQL of the records aggregate: creates, reads, lookups, updates, deletes, re-keys
//! and retention. Each function runs on a connection the driver hands it (a reader's, or
//! the writer's inside a job's savepoint); the decisions come from `store::rules`.

use crate::domain::ids::RecordId;
use rusqlite::{Connection, ToSql};

use super::audit::append;
use super::driver::{execute, first, rows, scalar};
use super::keys::{VersionChecks, index_refusal, index_refusal_in, kek_active};
use crate::domain::audit_chain::AuditEvent;
use crate::store::field_set;
use crate::store::rules::{self, Columns};
use crate::store::{
    AccountState, BatchInsert, CreateRequestKey, InsertOutcome, LookupMatch, NewRecord, RecordMeta,
    RecordRekey, RecordUpdate, SealedField, StoreError, StoredRecord, queries,
};

pub(super) fn get(
    conn: &Connection,
    record_id: &RecordId,
) -> Result<Option<StoredRecord>, StoreError> {
    first(conn, queries::SELECT_LIVE_RECORD, &[&record_id], |row| {
        rules::live_record(row, |_| true)
    })
}

/// A batch read's records (`Store::get_records`), from one statement per
/// [`queries::IDS_PER_STATEMENT`] ids.
pub(super) fn get_all(
    conn: &Connection,
    record_ids: &[RecordId],
    fields: &[&str],
) -> Result<Vec<Option<StoredRecord>>, StoreError> {
    if record_ids.len() > queries::IDS_PER_STATEMENT {
        let mut found = Vec::with_capacity(record_ids.len());
        for chunk in record_ids.chunks(queries::IDS_PER_STATEMENT) {
            found.extend(get_all(conn, chunk, fields)?);
        }
        return Ok(found);
    }
    if record_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut records = rules::RequestedRecords::new(record_ids);
    let params: Vec<&dyn ToSql> = record_ids.iter().map(|id| id as &dyn ToSql).collect();
    rows(
        conn,
        &queries::select_live_records(record_ids.len()),
        &params,
        |row| records.push(rules::live_record(row, |name| fields.contains(&name))?),
    )?;
    Ok(records.finish())
}

/// A page of the export's keyset scan (`Store::scan_live_records`): the page's records,
/// then the sealed-field sets of their id range in key order, in one read transaction (one
/// snapshot), merged by `rules::ScannedPage`. Two statements instead of a join: the join
/// looked each record's set up by key, the range scan reads them in order (an export of
/// 1,000,000 records: 52,000 rows/s by the join, 64,000 by the range scan, BENCHMARKS.md);
/// of each set only the fields the pass uses are decoded, from the row's bytes in place.
pub(super) fn scan(
    conn: &Connection,
    after: &str,
    created_before: i64,
    limit: u32,
    fields: &[String],
) -> Result<Vec<StoredRecord>, StoreError> {
    let tx = conn.unchecked_transaction()?;
    let mut page = rules::ScannedPage::default();
    rows(
        &tx,
        queries::SCAN_LIVE_RECORD_ROWS,
        &[&after, &created_before, &i64::from(limit)],
        |row| page.push(rules::live_record(row, |_| false)?),
    )?;
    let Some(last) = page.last().map(|id| id.as_str().to_owned()) else {
        return Ok(Vec::new());
    };
    if !fields.is_empty() {
        let mut statement = super::driver::statement(&tx, queries::SCAN_FIELD_SETS)?;
        let mut sets = statement.query([&after as &dyn ToSql, &last as &dyn ToSql].as_slice())?;
        while let Some(row) = sets.next()? {
            let record_id = row
                .get_ref(0)?
                .as_str()
                .map_err(|_| StoreError::Corrupt("column record_id: not text".into()))?;
            let encoded = row
                .get_ref(1)?
                .as_blob()
                .map_err(|_| StoreError::Corrupt("column fields: not a blob".into()))?;
            page.fields(record_id, encoded, |name| fields.iter().any(|f| f == name))?;
        }
    }
    tx.commit()?;
    Ok(page.finish())
}

pub(super) fn account_state(
    conn: &Connection,
    record_id: &RecordId,
) -> Result<Option<AccountState>, StoreError> {
    first(conn, queries::SELECT_ACCOUNT_STATE, &[&record_id], |row| {
        rules::account(row)
    })
}

pub(super) fn find_by_index(
    conn: &Connection,
    column: &str,
    indexes: &[Vec<u8>],
) -> Result<Vec<LookupMatch>, StoreError> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let sql = queries::find_by_index(column, indexes.len());
    let params: Vec<&dyn ToSql> = indexes.iter().map(|index| index as &dyn ToSql).collect();
    rows(conn, &sql, &params, |row| rules::lookup_match(row))
}

fn meta(conn: &Connection, record_id: &RecordId) -> Result<Option<RecordMeta>, StoreError> {
    let Some((version, created_at, updated_at)) =
        first(conn, queries::SELECT_META, &[&record_id], |row| {
            Ok((
                row.get("version")?,
                row.get("created_at")?,
                row.get("updated_at")?,
            ))
        })?
    else {
        return Ok(None);
    };
    let present_fields =
        rules::stored_field_names(first(conn, queries::SELECT_FIELDS, &[&record_id], |row| {
            Ok(row.get(0)?)
        })?)?;
    Ok(Some(RecordMeta {
        record_id: record_id.to_owned(),
        version,
        created_at,
        updated_at,
        present_fields,
    }))
}

/// What an earlier create with `request`'s key decides, if there was one.
pub(super) fn replayed(
    conn: &Connection,
    request: &CreateRequestKey,
) -> Result<Option<InsertOutcome>, StoreError> {
    let found = first(
        conn,
        queries::SELECT_CREATE_REQUEST,
        &[
            &request.caller,
            &request.request_id,
            &request.expired_before,
        ],
        |row| {
            Ok((
                row.get::<_, String>("record_id")?,
                row.get::<_, Option<i64>>("deleted_at")?,
                row.get::<_, Option<Vec<u8>>>("fingerprint")?,
            ))
        },
    )?;
    let Some((record_id, deleted_at, fingerprint)) = found else {
        return Ok(None);
    };
    let record_id = rules::stored_id("record_id", &record_id, RecordId::parse)?;
    let meta = meta(conn, &record_id)?;
    rules::replay(request, deleted_at, fingerprint, || meta).map(Some)
}

/// An update's or a re-key's fields, in place of the record's set.
fn replace_fields(
    conn: &Connection,
    record_id: &RecordId,
    fields: &[SealedField],
) -> Result<(), StoreError> {
    let encoded = field_set::encode(fields)?;
    execute(conn, queries::UPSERT_FIELDS, &[record_id, &encoded])?;
    Ok(())
}

/// A create, inside its job's savepoint; a refusal is an `Err` (the savepoint rolls back).
pub(super) fn insert(
    conn: &Connection,
    record: &NewRecord,
    request: Option<&CreateRequestKey>,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    write_record(conn, record, request, &mut VersionChecks::default())??;
    append(conn, std::slice::from_ref(audit))
}

/// A create's rows without its audit event (the caller appends it: one per single create,
/// one per batch), checked against the key versions of `checks`.
///
/// The inner `Err` is a refusal, and nothing of this record is written: the checks come
/// first, and the one refusal only a write can see (the live-document index's uniqueness)
/// is the record row's own INSERT, the record's first write, which SQLite undoes alone when
/// it fails. The outer `Err` means the record may be half written, so the caller's job must
/// roll back: a batch then fails whole rather than commit a record without its fields.
/// This is what lets a batch write its items without a savepoint each (a savepoint per item
/// copied every page each item touched into the statement journal: 18 % of the writer's
/// time in a batch create, BENCHMARKS.md).
fn write_record(
    conn: &Connection,
    record: &NewRecord,
    request: Option<&CreateRequestKey>,
    checks: &mut VersionChecks,
) -> Result<Result<(), StoreError>, StoreError> {
    let fields = match field_set::encode(&record.fields) {
        Ok(fields) => fields,
        Err(refused) => return Ok(Err(refused)),
    };
    // The write lock is held from BEGIN IMMEDIATE: these reads cannot go stale before commit.
    if !checks.kek_active(conn, record.kek_version)? {
        return Ok(Err(StoreError::StaleKeyVersion(record.kek_version)));
    }
    if let Some(refused) =
        index_refusal_in(conn, record.record_id.as_str(), &record.indexes, checks)?
    {
        return Ok(Err(refused));
    }
    let indexes = &record.indexes;
    let inserted = execute(
        conn,
        queries::INSERT_RECORD_OR_FAIL,
        &[
            &record.record_id,
            &record.created_at,
            &record.wrapped_key,
            &i64::from(record.kek_version),
            &indexes.document,
            &indexes.phone,
            &record.age_gate,
            &record.policy_version,
            &record.retain_until,
            &i64::from(indexes.version),
        ],
    );
    if let Err(error) = inserted {
        return match duplicate_as_refusal(error) {
            refused @ StoreError::DuplicateDocument => Ok(Err(refused)),
            other => Err(other),
        };
    }
    // From here on a failure leaves the record half written: it is the job's (outer) error.
    // A concurrent retry's request row is a refusal only for the single create, whose job
    // then rolls back whole; a batch reads its request keys first (`replayed`) on the one
    // writer, so no other row can be in the way.
    execute(conn, queries::INSERT_FIELDS, &[&record.record_id, &fields])?;
    if let Some(request) = request {
        execute(
            conn,
            queries::DELETE_EXPIRED_CREATE_REQUEST,
            &[
                &request.caller,
                &request.request_id,
                &request.expired_before,
            ],
        )?;
        execute(
            conn,
            queries::INSERT_CREATE_REQUEST,
            &[
                &request.caller,
                &request.request_id,
                &record.record_id,
                &request.fingerprint,
                &record.created_at,
            ],
        )
        .map_err(duplicate_as_refusal)?;
    }
    Ok(Ok(()))
}

/// A batch's creates, in one writer job (so in one transaction and one commit), in order,
/// then the batch's one audit event naming the records inserted (`rules::batch_event`).
/// The decisions are those of a single create (`rules::create`), read on the writer's
/// connection, which sees the batch's earlier items: a later item with an earlier one's
/// document is the duplicate, one with its request key the replay. A refused item writes
/// nothing (`write_record`), so the items need no savepoint of their own. `Err`: an item
/// could not be written whole, or the event not appended (the whole job rolls back:
/// nothing is written unaudited, no record is left half written).
pub(super) fn insert_all(
    conn: &Connection,
    items: &[BatchInsert],
    audit: AuditEvent,
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let mut checks = VersionChecks::default();
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        if let Some(request) = &item.request
            && let Some(outcome) = replayed(conn, request)?
        {
            outcomes.push(Ok(outcome));
            continue;
        }
        let outcome = write_record(conn, &item.record, item.request.as_ref(), &mut checks)?
            .map(|()| InsertOutcome::Inserted(rules::inserted_meta(&item.record)));
        outcomes.push(outcome);
    }
    if let Some(event) = rules::batch_event(audit, &outcomes) {
        append(conn, std::slice::from_ref(&event))?;
    }
    Ok(outcomes)
}

/// The live-document index (or a concurrent retry's request row) already holds it.
fn duplicate_as_refusal(error: StoreError) -> StoreError {
    match &error {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(failure, _))
            if matches!(
                failure.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ) =>
        {
            StoreError::DuplicateDocument
        }
        _ => error,
    }
}

pub(super) fn update(
    conn: &Connection,
    update: &RecordUpdate,
    audit: &AuditEvent,
) -> Result<RecordMeta, StoreError> {
    if let Some(refused) = index_refusal(conn, update.record_id.as_str(), &update.indexes)? {
        return Err(refused);
    }
    let created_at: Option<i64> = first(
        conn,
        queries::UPDATE_RECORD,
        &[
            &update.record_id,
            &update.expected_version,
            &update.updated_at,
            &update.indexes.document,
            &update.indexes.phone,
            &update.age_gate,
            &update.policy_version,
            &i64::from(update.override_suspension),
            &i64::from(update.indexes.version),
        ],
        |row| Ok(row.get(0)?),
    )
    .map_err(duplicate_as_refusal)?;
    let Some(created_at) = created_at else {
        let state = account_state(conn, &update.record_id)?;
        return Err(rules::update_refusal(state, update.override_suspension));
    };
    replace_fields(conn, &update.record_id, &update.fields)?;
    append(conn, std::slice::from_ref(audit))?;
    Ok(rules::meta_after(
        update.record_id.clone(),
        update.expected_version,
        created_at,
        update.updated_at,
        &update.fields,
    ))
}

pub(super) fn delete(
    conn: &Connection,
    record_id: &RecordId,
    deleted_at: i64,
    override_suspension: bool,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let shredded = execute(
        conn,
        queries::SHRED_RECORD,
        &[&record_id, &deleted_at, &i64::from(override_suspension)],
    )?;
    if shredded == 0 {
        return Err(rules::delete_refusal(account_state(conn, record_id)?));
    }
    execute(conn, queries::DELETE_FIELDS, &[&record_id])?;
    execute(conn, queries::SHRED_GUARDIANS, &[&record_id])?;
    execute(conn, queries::FORGET_CREATE_REQUESTS, &[&record_id])?;
    append(conn, std::slice::from_ref(audit))
}

pub(super) fn rekey(
    conn: &Connection,
    rekey: &RecordRekey,
    audit: &AuditEvent,
) -> Result<RecordMeta, StoreError> {
    if !kek_active(conn, rekey.kek_version)? {
        return Err(StoreError::StaleKeyVersion(rekey.kek_version));
    }
    let created_at: Option<i64> = first(
        conn,
        queries::REKEY_RECORD,
        &[
            &rekey.record_id,
            &rekey.expected_version,
            &rekey.updated_at,
            &rekey.wrapped_key,
            &i64::from(rekey.kek_version),
        ],
        |row| Ok(row.get(0)?),
    )?;
    let Some(created_at) = created_at else {
        return Err(rules::rekey_refusal(account_state(conn, &rekey.record_id)?));
    };
    // Every other ciphertext bound to the record moves with the fields, or nothing does.
    let mut moved = 0;
    let notes = rekey.bound.notes.iter().zip(&rekey.resealed.notes);
    for ((event_id, old), (_, new)) in notes {
        moved += execute(conn, queries::RESEAL_NOTE, &[event_id, new, old])?;
    }
    let guardians = rekey.bound.guardians.iter().zip(&rekey.resealed.guardians);
    for ((consent_id, old), (_, new)) in guardians {
        moved += execute(conn, queries::RESEAL_GUARDIAN, &[consent_id, new, old])?;
    }
    let bound: i64 = scalar(conn, queries::COUNT_BOUND, &[&rekey.record_id])?;
    if !rules::rekey_complete(rekey, moved, bound) {
        return Err(StoreError::VersionConflict);
    }
    replace_fields(conn, &rekey.record_id, &rekey.fields)?;
    append(conn, std::slice::from_ref(audit))?;
    Ok(rules::meta_after(
        rekey.record_id.clone(),
        rekey.expected_version,
        created_at,
        rekey.updated_at,
        &rekey.fields,
    ))
}

pub(super) fn expired(
    conn: &Connection,
    now: i64,
    limit: i64,
) -> Result<Vec<RecordId>, StoreError> {
    rows(conn, queries::SELECT_EXPIRED, &[&now, &limit], |row| {
        row.record_id("record_id")
    })
}

pub(super) fn expire_create_requests(conn: &Connection, before: i64) -> Result<u64, StoreError> {
    execute(conn, queries::EXPIRE_CREATE_REQUESTS, &[&before])
}
