//! PostgreSQL SQL of the jobs aggregate: rewrap job rows and their leases, and the rewrap
//! and re-index batches. A batch locks its rows (`FOR UPDATE SKIP LOCKED`: rows another job
//! or a writer holds are skipped, not waited for) in the transaction that writes them, so
//! concurrent jobs on several instances share the work.

use crate::domain::ids::{JobId, RecordId};
use sqlx::{PgConnection, Row};

use super::keys::{index_active, kek_active};
use crate::store::rules;
use crate::store::{
    JobOwner, ReindexFn, ReindexRow, RewrapBatch, RewrapFn, RewrapJobRow, StoreError, queries,
};

const SELECT_REWRAP_BATCH: &str = "SELECT record_id, wrapped_key FROM records \
     WHERE kek_version < $1 AND record_id > $2 AND deleted_at IS NULL \
     ORDER BY record_id LIMIT $3 FOR UPDATE SKIP LOCKED";
const SELECT_REINDEX_BATCH: &str = "SELECT record_id, version, index_version, \
     wrapped_key, age_gate FROM records \
     WHERE index_version < $1 AND record_id > $2 AND deleted_at IS NULL \
     ORDER BY record_id LIMIT $3 FOR UPDATE SKIP LOCKED";

pub(super) async fn start(
    conn: &mut PgConnection,
    job_id: &JobId,
    target: u32,
    owner: &JobOwner,
    now: i64,
    lease_until: i64,
) -> Result<(), StoreError> {
    sqlx::query(queries::INSERT_REWRAP_JOB)
        .bind(job_id.as_str())
        .bind(i64::from(target))
        .bind(now)
        .bind(owner.instance.as_deref())
        .bind(owner.process.as_str())
        .bind(lease_until)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn renew(
    conn: &mut PgConnection,
    job_id: &JobId,
    lease_until: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(queries::RENEW_REWRAP_LEASE)
        .bind(job_id.as_str())
        .bind(lease_until)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn interrupt_abandoned(
    conn: &mut PgConnection,
    me: &JobOwner,
    now: i64,
    legacy_lease: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(queries::INTERRUPT_ABANDONED_JOBS)
        .bind(now)
        .bind(legacy_lease)
        .bind(me.instance.as_deref())
        .bind(me.process.as_str())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn list(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<RewrapJobRow>, StoreError> {
    let rows = sqlx::query(queries::SELECT_REWRAP_JOBS)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(rules::rewrap_job).collect()
}

pub(super) async fn finish(
    conn: &mut PgConnection,
    job_id: &JobId,
    state: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(queries::FINISH_REWRAP_JOB)
        .bind(job_id.as_str())
        .bind(state)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn get(
    conn: &mut PgConnection,
    job_id: &JobId,
) -> Result<Option<(i64, i64, String)>, StoreError> {
    let row = sqlx::query(queries::SELECT_REWRAP_JOB)
        .bind(job_id.as_str())
        .fetch_optional(conn)
        .await?;
    row.map(|row| {
        Ok((
            row.try_get("rewrapped")?,
            row.try_get("failed")?,
            row.try_get("state")?,
        ))
    })
    .transpose()
}

pub(super) async fn count(
    conn: &mut PgConnection,
    sql: &'static str,
    target: u32,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(sql)
        .bind(i64::from(target))
        .fetch_one(conn)
        .await?)
}

fn inactive() -> RewrapBatch {
    RewrapBatch {
        target_inactive: true,
        ..RewrapBatch::default()
    }
}

/// One rewrap batch inside the caller's transaction; `None`: nothing to commit.
pub(super) async fn rewrap(
    conn: &mut PgConnection,
    job_id: &JobId,
    target: u32,
    after: Option<&RecordId>,
    limit: i64,
    now: i64,
    rewrap: &RewrapFn<'_>,
) -> Result<RewrapBatch, StoreError> {
    if !kek_active(conn, target).await? {
        return Ok(inactive());
    }
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(SELECT_REWRAP_BATCH)
        .bind(i64::from(target))
        .bind(after.map_or("", RecordId::as_str))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let mut batch = RewrapBatch {
        selected: rows.len(),
        ..RewrapBatch::default()
    };
    for (record_id, wrapped) in rows {
        let record_id = rules::stored_id("record_id", &record_id, RecordId::parse)?;
        match rewrap(&record_id, &wrapped) {
            Some(rewrapped) => {
                batch.rewrapped += sqlx::query(queries::REWRAP_RECORD)
                    .bind(record_id.as_str())
                    .bind(&rewrapped)
                    .bind(i64::from(target))
                    .bind(&wrapped)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            }
            None => batch.failed += 1,
        }
        batch.last_record_id = Some(record_id);
    }
    sqlx::query(queries::ADVANCE_REWRAP_JOB)
        .bind(job_id.as_str())
        .bind(batch.rewrapped as i64)
        .bind(batch.failed as i64)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(batch)
}

/// One re-index batch inside the caller's transaction.
pub(super) async fn reindex(
    conn: &mut PgConnection,
    job_id: &JobId,
    target: u32,
    after: Option<&RecordId>,
    limit: i64,
    now: i64,
    reindex: &ReindexFn<'_>,
) -> Result<RewrapBatch, StoreError> {
    if !index_active(conn, target).await? {
        return Ok(inactive());
    }
    let rows = sqlx::query(SELECT_REINDEX_BATCH)
        .bind(i64::from(target))
        .bind(after.map_or("", RecordId::as_str))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let mut batch = RewrapBatch {
        selected: rows.len(),
        ..RewrapBatch::default()
    };
    for row in &rows {
        let record_id: String = row.try_get("record_id")?;
        let record_id = rules::stored_id("record_id", &record_id, RecordId::parse)?;
        let version: i64 = row.try_get("version")?;
        let index_version: i64 = row.try_get("index_version")?;
        let wrapped_key: Option<Vec<u8>> = row.try_get("wrapped_key")?;
        let encoded: Option<Vec<u8>> = sqlx::query_scalar(queries::SELECT_FIELDS)
            .bind(record_id.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        let input = ReindexRow {
            record_id: record_id.clone(),
            index_version: rules::to_version(index_version)?,
            wrapped_key: wrapped_key.unwrap_or_default(),
            fields: rules::stored_fields(encoded, &rules::INDEXED_FIELDS)?,
            age_gate: row.try_get("age_gate")?,
        };
        match reindex(&input) {
            Some(done) => {
                batch.rewrapped += sqlx::query(queries::REINDEX_RECORD)
                    .bind(record_id.as_str())
                    .bind(&done.document_index)
                    .bind(&done.phone_index)
                    .bind(&done.age_gate)
                    .bind(i64::from(target))
                    .bind(version)
                    .bind(index_version)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            }
            None => batch.failed += 1,
        }
        batch.last_record_id = Some(record_id);
    }
    sqlx::query(queries::ADVANCE_REINDEX_JOB)
        .bind(job_id.as_str())
        .bind(batch.rewrapped as i64)
        .bind(batch.failed as i64)
        .bind(now)
        .bind(i64::from(target))
        .execute(conn)
        .await?;
    Ok(batch)
}
