//! PostgreSQL SQL of the records aggregate: creates, reads, lookups, updates, deletes,
//! re-keys and retention. The decisions come from `store::rules`, as on SQLite.

use crate::domain::ids::RecordId;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::audit::append;
use super::keys::{index_refusal, kek_active};
use crate::domain::audit_chain::AuditEvent;
use crate::store::field_set;
use crate::store::rules;
use crate::store::{
    AccountState, BatchInsert, CreateRequestKey, InsertOutcome, LookupMatch, NewRecord, RecordMeta,
    RecordRekey, RecordUpdate, SealedField, StoreError, StoredRecord, queries,
};

pub(super) async fn get(
    conn: &mut PgConnection,
    record_id: &RecordId,
) -> Result<Option<StoredRecord>, StoreError> {
    let row = sqlx::query(queries::SELECT_LIVE_RECORD)
        .bind(record_id.as_str())
        .fetch_optional(conn)
        .await?;
    row.as_ref()
        .map(|row| rules::live_record(row, |_| true))
        .transpose()
}

/// A batch read's records (`Store::get_records`), from one statement per
/// [`queries::IDS_PER_STATEMENT`] ids.
pub(super) async fn get_all(
    conn: &mut PgConnection,
    record_ids: &[RecordId],
    fields: &[&str],
) -> Result<Vec<Option<StoredRecord>>, StoreError> {
    if record_ids.len() > queries::IDS_PER_STATEMENT {
        let mut found = Vec::with_capacity(record_ids.len());
        for chunk in record_ids.chunks(queries::IDS_PER_STATEMENT) {
            found.extend(Box::pin(get_all(&mut *conn, chunk, fields)).await?);
        }
        return Ok(found);
    }
    if record_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Placeholders only: the ids are bound.
    let mut query = sqlx::query(AssertSqlSafe(queries::select_live_records(
        record_ids.len(),
    )));
    for record_id in record_ids {
        query = query.bind(record_id.as_str());
    }
    let rows = query.fetch_all(conn).await?;
    let mut records = rules::RequestedRecords::new(record_ids);
    for row in &rows {
        records.push(rules::live_record(row, |name| fields.contains(&name))?)?;
    }
    Ok(records.finish())
}

/// A page of the export's keyset scan (`Store::scan_live_records`), from one statement;
/// of each record's sealed fields only those named in `fields` are decoded.
pub(super) async fn scan(
    conn: &mut PgConnection,
    after: Option<&RecordId>,
    created_before: i64,
    limit: u32,
    fields: &[&str],
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(queries::SCAN_LIVE_RECORDS)
        .bind(after.map_or("", RecordId::as_str))
        .bind(created_before)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await?;
    let mut page = rules::ScannedPage::default();
    for row in &rows {
        page.push(rules::live_record(row, |name| fields.contains(&name))?)?;
    }
    Ok(page.finish())
}

pub(super) async fn account_state(
    conn: &mut PgConnection,
    record_id: &RecordId,
) -> Result<Option<AccountState>, StoreError> {
    let row = sqlx::query(queries::SELECT_ACCOUNT_STATE)
        .bind(record_id.as_str())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(rules::account).transpose()
}

pub(super) async fn find_by_index(
    conn: &mut PgConnection,
    column: &str,
    indexes: &[Vec<u8>],
) -> Result<Vec<LookupMatch>, StoreError> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    // Built from a fixed column name and placeholders only; every value is bound.
    let sql = queries::find_by_index(column, indexes.len());
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for index in indexes {
        query = query.bind(index);
    }
    let rows = query.fetch_all(conn).await?;
    rows.iter().map(rules::lookup_match).collect()
}

async fn meta(
    conn: &mut PgConnection,
    record_id: &RecordId,
) -> Result<Option<RecordMeta>, StoreError> {
    let Some(row) = sqlx::query(queries::SELECT_META)
        .bind(record_id.as_str())
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let encoded: Option<Vec<u8>> = sqlx::query_scalar(queries::SELECT_FIELDS)
        .bind(record_id.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let present_fields = rules::stored_field_names(encoded)?;
    Ok(Some(RecordMeta {
        record_id: record_id.to_owned(),
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        present_fields,
    }))
}

pub(super) async fn replayed(
    conn: &mut PgConnection,
    request: &CreateRequestKey,
) -> Result<Option<InsertOutcome>, StoreError> {
    let Some(row) = sqlx::query(queries::SELECT_CREATE_REQUEST)
        .bind(&request.caller)
        .bind(&request.request_id)
        .bind(request.expired_before)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let record_id: String = row.try_get("record_id")?;
    let record_id = rules::stored_id("record_id", &record_id, RecordId::parse)?;
    let meta = meta(conn, &record_id).await?;
    rules::replay(
        request,
        row.try_get("deleted_at")?,
        row.try_get("fingerprint")?,
        || meta,
    )
    .map(Some)
}

/// An update's or a re-key's fields, in place of the record's set.
async fn replace_fields(
    conn: &mut PgConnection,
    record_id: &RecordId,
    fields: &[SealedField],
) -> Result<(), StoreError> {
    sqlx::query(queries::UPSERT_FIELDS)
        .bind(record_id.as_str())
        .bind(field_set::encode(fields)?)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn duplicate_as_refusal(error: sqlx::Error) -> StoreError {
    if error
        .as_database_error()
        .is_some_and(|e| e.is_unique_violation())
    {
        StoreError::DuplicateDocument
    } else {
        error.into()
    }
}

/// A create's statements inside its transaction; a refusal is an `Err` (rolled back).
pub(super) async fn insert(
    conn: &mut PgConnection,
    record: &NewRecord,
    request: Option<&CreateRequestKey>,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<(), StoreError> {
    write_record(conn, record, request).await?;
    append(conn, std::slice::from_ref(audit), heads).await
}

/// A create's rows without its audit event (the caller appends it: one per single create,
/// one per batch).
async fn write_record(
    conn: &mut PgConnection,
    record: &NewRecord,
    request: Option<&CreateRequestKey>,
) -> Result<(), StoreError> {
    let fields = field_set::encode(&record.fields)?;
    if !kek_active(conn, record.kek_version).await? {
        return Err(StoreError::StaleKeyVersion(record.kek_version));
    }
    if let Some(refused) = index_refusal(conn, record.record_id.as_str(), &record.indexes).await? {
        return Err(refused);
    }
    let indexes = &record.indexes;
    sqlx::query(queries::INSERT_RECORD)
        .bind(record.record_id.as_str())
        .bind(record.created_at)
        .bind(&record.wrapped_key)
        .bind(i64::from(record.kek_version))
        .bind(&indexes.document)
        .bind(&indexes.phone)
        .bind(&record.age_gate)
        .bind(&record.policy_version)
        .bind(record.retain_until)
        .bind(i64::from(indexes.version))
        .execute(&mut *conn)
        .await
        .map_err(duplicate_as_refusal)?;
    sqlx::query(queries::INSERT_FIELDS)
        .bind(record.record_id.as_str())
        .bind(fields)
        .execute(&mut *conn)
        .await?;
    if let Some(request) = request {
        sqlx::query(queries::DELETE_EXPIRED_CREATE_REQUEST)
            .bind(&request.caller)
            .bind(&request.request_id)
            .bind(request.expired_before)
            .execute(&mut *conn)
            .await?;
        sqlx::query(queries::INSERT_CREATE_REQUEST)
            .bind(&request.caller)
            .bind(&request.request_id)
            .bind(record.record_id.as_str())
            .bind(&request.fingerprint)
            .bind(record.created_at)
            .execute(&mut *conn)
            .await
            .map_err(duplicate_as_refusal)?;
    }
    Ok(())
}

/// A batch's creates in the caller's transaction, in order, each under its own savepoint
/// (a refusal aborts only its savepoint). The decisions are those of a single create
/// (`rules::create`), read in the transaction, which sees the batch's earlier items: a
/// later item with an earlier one's document is the duplicate, one with its request key
/// the replay. Then the batch's one audit event, naming the records inserted
/// (`rules::batch_event`). `Err`: a savepoint could not be taken or ended, or the event not
/// appended (the transaction is lost: nothing is written unaudited).
pub(super) async fn insert_all(
    conn: &mut PgConnection,
    items: &[BatchInsert],
    audit: AuditEvent,
    heads: &super::Heads,
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let first = in_savepoint(conn, async |conn| {
            if let Some(request) = &item.request
                && let Some(outcome) = replayed(conn, request).await?
            {
                return Ok(outcome);
            }
            write_record(conn, &item.record, item.request.as_ref()).await?;
            Ok(InsertOutcome::Inserted(rules::inserted_meta(&item.record)))
        })
        .await?;
        // A duplicate that is this request's own earlier attempt is its replay.
        let outcome = match (first, &item.request) {
            (Err(StoreError::DuplicateDocument), Some(request)) => {
                in_savepoint(conn, async |conn| {
                    replayed(conn, request)
                        .await?
                        .ok_or(StoreError::DuplicateDocument)
                })
                .await?
            }
            (other, _) => other,
        };
        outcomes.push(outcome);
    }
    if let Some(event) = rules::batch_event(audit, &outcomes) {
        append(conn, std::slice::from_ref(&event), heads).await?;
    }
    Ok(outcomes)
}

/// Runs `body` under a savepoint of the transaction, rolled back when it fails. The outer
/// `Err`: the savepoint itself failed.
async fn in_savepoint<T>(
    conn: &mut PgConnection,
    body: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, StoreError> {
    sqlx::raw_sql("SAVEPOINT batch_item")
        .execute(&mut *conn)
        .await?;
    let outcome = body(conn).await;
    sqlx::raw_sql(if outcome.is_ok() {
        "RELEASE SAVEPOINT batch_item"
    } else {
        "ROLLBACK TO SAVEPOINT batch_item; RELEASE SAVEPOINT batch_item"
    })
    .execute(&mut *conn)
    .await?;
    Ok(outcome)
}

pub(super) async fn update(
    conn: &mut PgConnection,
    update: &RecordUpdate,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<RecordMeta, StoreError> {
    if let Some(refused) = index_refusal(conn, update.record_id.as_str(), &update.indexes).await? {
        return Err(refused);
    }
    let created_at: Option<i64> = sqlx::query_scalar(queries::UPDATE_RECORD)
        .bind(update.record_id.as_str())
        .bind(update.expected_version)
        .bind(update.updated_at)
        .bind(&update.indexes.document)
        .bind(&update.indexes.phone)
        .bind(&update.age_gate)
        .bind(&update.policy_version)
        .bind(i64::from(update.override_suspension))
        .bind(i64::from(update.indexes.version))
        .fetch_optional(&mut *conn)
        .await
        .map_err(duplicate_as_refusal)?;
    let Some(created_at) = created_at else {
        let state = account_state(conn, &update.record_id).await?;
        return Err(rules::update_refusal(state, update.override_suspension));
    };
    replace_fields(conn, &update.record_id, &update.fields).await?;
    append(conn, std::slice::from_ref(audit), heads).await?;
    Ok(rules::meta_after(
        update.record_id.clone(),
        update.expected_version,
        created_at,
        update.updated_at,
        &update.fields,
    ))
}

pub(super) async fn delete(
    conn: &mut PgConnection,
    record_id: &RecordId,
    deleted_at: i64,
    override_suspension: bool,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<(), StoreError> {
    let shredded = sqlx::query(queries::SHRED_RECORD)
        .bind(record_id.as_str())
        .bind(deleted_at)
        .bind(i64::from(override_suspension))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if shredded == 0 {
        return Err(rules::delete_refusal(account_state(conn, record_id).await?));
    }
    for sql in [
        queries::DELETE_FIELDS,
        queries::SHRED_GUARDIANS,
        queries::FORGET_CREATE_REQUESTS,
    ] {
        sqlx::query(sql)
            .bind(record_id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    append(conn, std::slice::from_ref(audit), heads).await
}

pub(super) async fn rekey(
    conn: &mut PgConnection,
    rekey: &RecordRekey,
    audit: &AuditEvent,
    heads: &super::Heads,
) -> Result<RecordMeta, StoreError> {
    if !kek_active(conn, rekey.kek_version).await? {
        return Err(StoreError::StaleKeyVersion(rekey.kek_version));
    }
    let created_at: Option<i64> = sqlx::query_scalar(queries::REKEY_RECORD)
        .bind(rekey.record_id.as_str())
        .bind(rekey.expected_version)
        .bind(rekey.updated_at)
        .bind(&rekey.wrapped_key)
        .bind(i64::from(rekey.kek_version))
        .fetch_optional(&mut *conn)
        .await?;
    let Some(created_at) = created_at else {
        return Err(rules::rekey_refusal(
            account_state(conn, &rekey.record_id).await?,
        ));
    };
    // The record's row is locked now: a write sealing under its key waits for this
    // transaction (see `accounts::record_key_is`). Every other ciphertext bound to the
    // record moves with the fields, or nothing does.
    let mut moved = 0;
    let notes = rekey.bound.notes.iter().zip(&rekey.resealed.notes);
    for ((event_id, old), (_, new)) in notes {
        moved += sqlx::query(queries::RESEAL_NOTE)
            .bind(event_id)
            .bind(new)
            .bind(old)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    let guardians = rekey.bound.guardians.iter().zip(&rekey.resealed.guardians);
    for ((consent_id, old), (_, new)) in guardians {
        moved += sqlx::query(queries::RESEAL_GUARDIAN)
            .bind(consent_id)
            .bind(new)
            .bind(old)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    let bound: i64 = sqlx::query_scalar(queries::COUNT_BOUND)
        .bind(rekey.record_id.as_str())
        .fetch_one(&mut *conn)
        .await?;
    if !rules::rekey_complete(rekey, moved, bound) {
        return Err(StoreError::VersionConflict);
    }
    replace_fields(conn, &rekey.record_id, &rekey.fields).await?;
    append(conn, std::slice::from_ref(audit), heads).await?;
    Ok(rules::meta_after(
        rekey.record_id.clone(),
        rekey.expected_version,
        created_at,
        rekey.updated_at,
        &rekey.fields,
    ))
}

pub(super) async fn expired(
    conn: &mut PgConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<RecordId>, StoreError> {
    let found: Vec<String> = sqlx::query_scalar(queries::SELECT_EXPIRED)
        .bind(now)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    found
        .iter()
        .map(|raw| rules::stored_id("record_id", raw, RecordId::parse))
        .collect()
}

pub(super) async fn expire_create_requests(
    conn: &mut PgConnection,
    before: i64,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(queries::EXPIRE_CREATE_REQUESTS)
        .bind(before)
        .execute(conn)
        .await?
        .rows_affected())
}
