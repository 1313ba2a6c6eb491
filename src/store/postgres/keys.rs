//! PostgreSQL SQL of the key-versions aggregate: the states of KEK and index versions, the
//! checks every write makes against them (row locks in share mode, so a rotation or
//! retirement waits for writes in flight under the version), and key administration (the
//! kind's row of `key_admin_locks`, locked for the whole `KeyAdminTx`).

use sqlx::{AssertSqlSafe, PgConnection};

use crate::store::rules;
use crate::store::{KeyVersionRow, RecordIndexes, StoreError, queries};

pub(super) const LOCK_KEY_ADMIN: &str =
    "SELECT key_kind FROM key_admin_locks WHERE key_kind = $1 FOR UPDATE";
const LOCK_ACTIVE_KEK: &str = "SELECT version FROM key_versions \
     WHERE key_kind = 'kek' AND version = $1 AND state = 'ACTIVE' FOR SHARE";
const LOCK_ACTIVE_INDEX: &str = "SELECT version FROM key_versions \
     WHERE key_kind = 'index' AND version = $1 AND state = 'ACTIVE' FOR SHARE";

/// Whether `version` is still the active KEK, share-locking its row so that it stays
/// active until this transaction ends.
pub(super) async fn kek_active(conn: &mut PgConnection, version: u32) -> Result<bool, StoreError> {
    let found: Option<i64> = sqlx::query_scalar(LOCK_ACTIVE_KEK)
        .bind(i64::from(version))
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

pub(super) async fn index_active(
    conn: &mut PgConnection,
    version: u32,
) -> Result<bool, StoreError> {
    let found: Option<i64> = sqlx::query_scalar(LOCK_ACTIVE_INDEX)
        .bind(i64::from(version))
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// As `sqlite::keys::index_refusal`, with the active index version's row share-locked.
pub(super) async fn index_refusal(
    conn: &mut PgConnection,
    record_id: &str,
    indexes: &RecordIndexes,
) -> Result<Option<StoreError>, StoreError> {
    if !index_active(conn, indexes.version).await? {
        return Ok(Some(StoreError::StaleIndexVersion(indexes.version)));
    }
    let live: Vec<i64> = sqlx::query_scalar(queries::SELECT_LIVE_INDEX_VERSIONS)
        .fetch_all(&mut *conn)
        .await?;
    if let Some(refused) = rules::index_versions_refusal(indexes, &live) {
        return Ok(Some(refused));
    }
    if indexes.document.is_none() || indexes.document_elsewhere.is_empty() {
        return Ok(None);
    }
    // Placeholders only; every value is bound.
    let sql = queries::document_held_elsewhere(indexes.document_elsewhere.len());
    let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).bind(record_id);
    for index in &indexes.document_elsewhere {
        query = query.bind(index);
    }
    let held = query.fetch_one(conn).await?;
    Ok((held > 0).then_some(StoreError::DuplicateDocument))
}

pub(super) async fn active(conn: &mut PgConnection, kind: &str) -> Result<Option<u32>, StoreError> {
    let version: Option<i64> = sqlx::query_scalar(queries::SELECT_ACTIVE_KEY_VERSION)
        .bind(kind)
        .fetch_optional(conn)
        .await?;
    version.map(rules::to_version).transpose()
}

pub(super) async fn states(
    conn: &mut PgConnection,
    kind: &str,
) -> Result<Vec<(u32, String)>, StoreError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(queries::SELECT_KEY_VERSION_STATES)
        .bind(kind)
        .fetch_all(conn)
        .await?;
    rows.into_iter()
        .map(|(version, state)| Ok((rules::to_version(version)?, state)))
        .collect()
}

pub(super) async fn versions(
    conn: &mut PgConnection,
    kind: &str,
) -> Result<Vec<KeyVersionRow>, StoreError> {
    let rows = sqlx::query(queries::SELECT_KEY_VERSIONS)
        .bind(kind)
        .fetch_all(conn)
        .await?;
    rows.iter().map(rules::key_version).collect()
}

pub(super) async fn state(
    conn: &mut PgConnection,
    kind: &str,
    version: u32,
) -> Result<String, StoreError> {
    let state: Option<String> = sqlx::query_scalar(queries::SELECT_KEY_VERSION_STATE)
        .bind(kind)
        .bind(i64::from(version))
        .fetch_optional(conn)
        .await?;
    state.ok_or(StoreError::NotFound)
}

pub(super) async fn max_version(conn: &mut PgConnection, kind: &str) -> Result<i64, StoreError> {
    let max: Option<i64> = sqlx::query_scalar(queries::SELECT_MAX_KEY_VERSION)
        .bind(kind)
        .fetch_one(conn)
        .await?;
    Ok(max.unwrap_or(0))
}

pub(super) async fn records_under(
    conn: &mut PgConnection,
    kind: &str,
    version: u32,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(rules::count_under(kind))
        .bind(i64::from(version))
        .fetch_one(conn)
        .await?)
}

/// A statement of key administration on (kind, version) with one more parameter.
pub(super) async fn change(
    conn: &mut PgConnection,
    sql: &'static str,
    kind: &str,
    version: u32,
    third: impl sqlx::Encode<'_, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
) -> Result<(), StoreError> {
    sqlx::query(sql)
        .bind(kind)
        .bind(i64::from(version))
        .bind(third)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn insert(
    conn: &mut PgConnection,
    kind: &str,
    version: u32,
    state: &str,
    provider: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(queries::INSERT_KEY_VERSION)
        .bind(kind)
        .bind(i64::from(version))
        .bind(state)
        .bind(provider)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn count(conn: &mut PgConnection, kind: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(queries::COUNT_KEY_VERSIONS)
        .bind(kind)
        .fetch_one(conn)
        .await?)
}
