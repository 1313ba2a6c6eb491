//! PostgreSQL SQL of the audit aggregate: appending to chains in ONE statement (inside
//! whichever write's transaction calls it, so a change and its event commit together, or
//! alone as the audit writer's whole flush), the trail's queries, chain heads, checkpoints
//! and expiry.
//!
//! One round trip per flush: the events are linked in Rust from the chain's head as this
//! process last left it (`Heads`: each process appends to its own chain), and one statement
//! moves the head only if it still is that (a compare-and-swap), inserts the events from
//! arrays (`UNNEST`) and their per-record index rows, all in data-modifying CTEs that see
//! whether the head moved. When another transaction moved the head first (or the cache is
//! cold or stale after a rollback), the statement writes nothing; the head is then read
//! under a row lock and the batch linked and written again.

use crate::domain::ids::{ChainId, RecordId, SignerId};
use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::{AssertSqlSafe, PgConnection, Row};

use crate::domain::audit_chain::{AuditEvent, ChainHead, Checkpoint, ExpiryMarker, StoredEvent};
use crate::store::rules::{self, CheckpointParams};
use crate::store::{AuditQuery, StoreError, queries};

/// The head (sequence, hash) of each chain as this process last wrote it. A hint only: the
/// append's compare-and-swap decides, so a stale entry costs one more round trip, never a
/// wrong link. Keyed by the chain id's text as the appended events carry it: an
/// [`AuditEvent`] holds the text that is hashed (see `domain::audit_chain`).
#[derive(Debug, Default)]
pub(crate) struct Heads(Mutex<HashMap<String, (i64, Vec<u8>)>>);

impl Heads {
    fn get(&self, chain_id: &str) -> Option<(i64, Vec<u8>)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(chain_id)
            .cloned()
    }

    fn set(&self, chain_id: &str, seq: i64, hash: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(chain_id.to_owned(), (seq, hash));
    }
}

const READ_HEAD: &str =
    "SELECT head_seq, head_hash FROM audit_chains WHERE chain_id = $1 FOR UPDATE";

/// The whole append: `$1` chain, `$2`/`$3` the head before, `$4`/`$5` the head after,
/// `$6..$23` the event columns as arrays, `$24..$26` the per-record index rows. Returns 1 when the
/// head was where the batch was linked from (and everything was written), else 0.
const APPEND: &str = "WITH moved AS ( \
       UPDATE audit_chains SET head_seq = $4, head_hash = $5 \
       WHERE chain_id = $1 AND head_seq = $2 AND head_hash = $3 RETURNING chain_id), \
     events AS ( \
       INSERT INTO audit_events (chain_id, seq, event_id, occurred_at, caller, peer, rpc, \
         record_id, record_ids, purpose, justification, released, plaintext, outcome, reason, \
         request_id, trace_id, prev_hash, hash) \
       SELECT $1, e.* FROM UNNEST($6::bigint[], $7::text[], $8::bigint[], $9::text[], \
         $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], \
         $16::text[], $17::bigint[], $18::text[], $19::text[], $20::text[], $21::text[], \
         $22::bytea[], $23::bytea[]) AS e \
       WHERE EXISTS (SELECT 1 FROM moved)), \
     records AS ( \
       INSERT INTO audit_event_records (record_id, occurred_at, chain_id, seq) \
       SELECT r.record_id, r.occurred_at, $1, r.seq \
       FROM UNNEST($24::text[], $25::bigint[], $26::bigint[]) AS r(record_id, occurred_at, seq) \
       WHERE EXISTS (SELECT 1 FROM moved) ON CONFLICT DO NOTHING) \
     SELECT COUNT(*) FROM moved";

/// Appends `events` (all of one chain) inside the caller's transaction: one statement when
/// the cached head is right, else the head is read under its row lock (held until the
/// transaction ends) and the batch written from it.
pub(super) async fn append(
    conn: &mut PgConnection,
    events: &[AuditEvent],
    heads: &Heads,
) -> Result<(), StoreError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    if let Some(head) = heads.get(&first.chain_id)
        && try_append(conn, events, head, heads).await?
    {
        return Ok(());
    }
    let head = read_head(conn, &first.chain_id).await?;
    if try_append(conn, events, head, heads).await? {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "audit chain {} moved under its row lock",
            first.chain_id
        )))
    }
}

/// Appends `events` as one statement on its own (its own transaction) when the cached head
/// is right; `false` when it is not (nothing written): the caller then appends inside a
/// transaction.
pub(super) async fn append_alone(
    conn: &mut PgConnection,
    events: &[AuditEvent],
    heads: &Heads,
) -> Result<bool, StoreError> {
    let Some(first) = events.first() else {
        return Ok(true);
    };
    match heads.get(&first.chain_id) {
        Some(head) => try_append(conn, events, head, heads).await,
        None => Ok(false),
    }
}

async fn read_head(conn: &mut PgConnection, chain_id: &str) -> Result<(i64, Vec<u8>), StoreError> {
    let row = sqlx::query(READ_HEAD)
        .bind(chain_id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("audit chain {chain_id} is not registered")))?;
    Ok((row.try_get("head_seq")?, row.try_get("head_hash")?))
}

/// One nullable text column of every row, as a `text[]` with NULLs.
fn optional<'a>(
    rows: &'a [rules::EventRow],
    column: impl Fn(&'a rules::EventRow) -> &'a Option<String>,
) -> Vec<Option<&'a str>> {
    rows.iter().map(|row| column(row).as_deref()).collect()
}

/// The one statement: links `events` after `head` and writes them if the chain's head is
/// still `head`. `false` when it was not (nothing written).
async fn try_append(
    conn: &mut PgConnection,
    events: &[AuditEvent],
    (seq, hash): (i64, Vec<u8>),
    heads: &Heads,
) -> Result<bool, StoreError> {
    let chain_id = events[0].chain_id.as_str();
    let new_seq = seq + events.len() as i64;
    let (rows, new_hash) = rules::link_events(events, new_seq, &hash)?;
    let index: Vec<_> = rules::event_record_rows(events, &rows).collect();
    let moved: i64 = sqlx::query_scalar(APPEND)
        .bind(chain_id)
        .bind(seq)
        .bind(&hash)
        .bind(new_seq)
        .bind(&new_hash)
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.caller.as_str()).collect::<Vec<_>>())
        .bind(optional(&rows, |r| &r.peer))
        .bind(rows.iter().map(|r| r.rpc.as_str()).collect::<Vec<_>>())
        .bind(optional(&rows, |r| &r.record_id))
        .bind(
            rows.iter()
                .map(|r| r.record_ids.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(optional(&rows, |r| &r.purpose))
        .bind(optional(&rows, |r| &r.justification))
        .bind(rows.iter().map(|r| r.released.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.plaintext).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>())
        .bind(optional(&rows, |r| &r.reason))
        .bind(optional(&rows, |r| &r.request_id))
        .bind(optional(&rows, |r| &r.trace_id))
        .bind(
            rows.iter()
                .map(|r| r.prev_hash.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.hash.as_slice()).collect::<Vec<_>>())
        .bind(index.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(index.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(index.iter().map(|r| r.3).collect::<Vec<_>>())
        .fetch_one(conn)
        .await?;
    if moved == 1 {
        // Right only once the transaction commits; if it rolls back, the next append's
        // compare-and-swap finds out and re-reads.
        heads.set(chain_id, new_seq, new_hash);
    }
    Ok(moved == 1)
}

pub(super) async fn register_chain(
    conn: &mut PgConnection,
    chain_id: &ChainId,
    started_at: i64,
    genesis: &[u8],
) -> Result<(), StoreError> {
    sqlx::query(queries::REGISTER_CHAIN)
        .bind(chain_id.as_str())
        .bind(started_at)
        .bind(genesis)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn list(
    conn: &mut PgConnection,
    query: &AuditQuery,
) -> Result<Vec<StoredEvent>, StoreError> {
    let (cursor_time, cursor_id) = query.after.clone().unwrap_or((i64::MAX, String::new()));
    let from = query.from.unwrap_or(i64::MIN);
    let to = query.to.unwrap_or(i64::MAX);
    let rows = match (&query.caller, query.plaintext_only) {
        (Some(caller), true) => {
            sqlx::query(AssertSqlSafe(queries::plaintext_releases()))
                .bind(caller)
                .bind(from)
                .bind(to)
                .bind(cursor_time)
                .bind(&cursor_id)
                .bind(i64::from(query.limit))
                .fetch_all(conn)
                .await?
        }
        _ => {
            let sql = if query.record_id.is_some() {
                queries::list_audit_events_of_record()
            } else {
                queries::list_audit_events()
            };
            sqlx::query(AssertSqlSafe(sql))
                .bind(query.record_id.as_ref().map(RecordId::as_str))
                .bind(&query.caller)
                .bind(&query.purpose)
                .bind(&query.outcome)
                .bind(from)
                .bind(to)
                .bind(cursor_time)
                .bind(&cursor_id)
                .bind(i64::from(query.limit))
                .fetch_all(conn)
                .await?
        }
    };
    rows.iter().map(rules::stored_event).collect()
}

pub(super) async fn disclosures(
    conn: &mut PgConnection,
    record_id: &RecordId,
    purposes: &[String],
    limit: u32,
    after: Option<(i64, String)>,
) -> Result<Vec<StoredEvent>, StoreError> {
    if purposes.is_empty() {
        return Ok(Vec::new());
    }
    let (cursor_time, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
    let mut query = sqlx::query(AssertSqlSafe(queries::disclosures(purposes.len())))
        .bind(record_id.as_str())
        .bind(cursor_time)
        .bind(cursor_id)
        .bind(i64::from(limit));
    for purpose in purposes {
        query = query.bind(purpose);
    }
    let rows = query.fetch_all(conn).await?;
    rows.iter().map(rules::stored_event).collect()
}

pub(super) async fn chain_ids(conn: &mut PgConnection) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(queries::CHAIN_IDS)
        .fetch_all(conn)
        .await?)
}

pub(super) async fn chain_heads(conn: &mut PgConnection) -> Result<Vec<ChainHead>, StoreError> {
    let rows = sqlx::query(queries::CHAIN_HEADS).fetch_all(conn).await?;
    rows.iter().map(rules::chain_head).collect()
}

pub(super) async fn chain_events(
    conn: &mut PgConnection,
    chain_id: &str,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(queries::chain_events()))
        .bind(chain_id)
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await?;
    rows.iter().map(rules::stored_event).collect()
}

pub(super) async fn insert_checkpoint(
    conn: &mut PgConnection,
    params: &CheckpointParams,
) -> Result<(), StoreError> {
    sqlx::query(queries::INSERT_CHECKPOINT)
        .bind(params.created_at)
        .bind(&params.heads)
        .bind(&params.signature)
        .bind(params.format)
        .bind(&params.signer)
        .bind(params.counter)
        .bind(&params.key_id)
        .bind(&params.prev)
        .bind(&params.closed)
        .execute(conn)
        .await?;
    Ok(())
}

pub(super) async fn checkpoints(conn: &mut PgConnection) -> Result<Vec<Checkpoint>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(queries::checkpoints()))
        .fetch_all(conn)
        .await?;
    rows.iter().map(rules::checkpoint).collect()
}

pub(super) async fn latest_checkpoint(
    conn: &mut PgConnection,
    signer: &SignerId,
) -> Result<Option<Checkpoint>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(queries::latest_signer_checkpoint()))
        .bind(signer.as_str())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(rules::checkpoint).transpose()
}

pub(super) async fn count_checkpoints(
    conn: &mut PgConnection,
    signer: &SignerId,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(queries::COUNT_SIGNER_CHECKPOINTS)
        .bind(signer.as_str())
        .fetch_one(conn)
        .await?)
}

pub(super) async fn has_chained_checkpoints(conn: &mut PgConnection) -> Result<bool, StoreError> {
    let found: i64 = sqlx::query_scalar(queries::CHAINED_CHECKPOINT_EXISTS)
        .fetch_one(conn)
        .await?;
    Ok(found > 0)
}

pub(super) async fn expiry_markers(
    conn: &mut PgConnection,
) -> Result<Vec<ExpiryMarker>, StoreError> {
    let rows = sqlx::query(queries::EXPIRY_MARKERS).fetch_all(conn).await?;
    rows.iter().map(rules::expiry_marker).collect()
}

pub(super) async fn expire_prefix(
    conn: &mut PgConnection,
    marker: &ExpiryMarker,
) -> Result<u64, StoreError> {
    let deleted = sqlx::query(queries::DELETE_CHAIN_PREFIX)
        .bind(&marker.chain_id)
        .bind(marker.up_to_seq)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query(queries::DELETE_EVENT_RECORDS_PREFIX)
        .bind(&marker.chain_id)
        .bind(marker.up_to_seq)
        .execute(&mut *conn)
        .await?;
    sqlx::query(queries::UPSERT_EXPIRY_MARKER)
        .bind(&marker.chain_id)
        .bind(marker.up_to_seq)
        .bind(&marker.hash)
        .bind(marker.expired_at)
        .bind(&marker.signature)
        .execute(conn)
        .await?;
    Ok(deleted)
}
