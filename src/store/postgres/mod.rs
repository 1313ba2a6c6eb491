//! PostgreSQL backend on sqlx: the production store, which several vault instances may
//! share. A plain implementation: this module opens the pools and says which connection or
//! transaction each call runs on; the aggregate modules hold the SQL (`records`,
//! `accounts`, `audit`, `keys`, `jobs`), and `store::rules` every decision they share with
//! SQLite.
//!
//! Correctness never rests on this process's memory: uniqueness of live documents and of
//! request ids are unique indexes, updates are conditional on the row's version, the audit
//! append is a compare-and-swap on the chain's head (`audit`), and migrations take sqlx's
//! advisory lock so instances starting together apply them once.

mod accounts;
mod audit;
mod jobs;
mod keys;
mod records;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};

pub(crate) use self::audit::Heads;
use super::rules::{self, CheckpointParams, Column, Columns, CreateSteps};
use super::{
    AccountEventRow, AccountState, AuditQuery, BatchInsert, BoundCiphertexts, ConsentRow,
    CreateRequestKey, InsertOutcome, JobOwner, KeyAdmin, KeyAdminTx, KeyVersionRow, LookupMatch,
    Micros, NewRecord, RecordMeta, RecordRekey, RecordUpdate, ReindexFn, RewrapBatch, RewrapFn,
    RewrapJobRow, Store, StoreError, StoredRecord, queries,
};
use crate::domain::audit_chain::{AuditEvent, ChainHead, Checkpoint, ExpiryMarker, StoredEvent};
use crate::domain::ids::{ChainId, ConsentId, JobId, RecordId, SignerId};

/// The audit chains a process's writes spread over (`Store::write_chains`): as many writes
/// commit at once as there are chains, up to the pool's connections (measured in
/// BENCHMARKS.md, "PostgreSQL creates, one chain each"). Each process adds this many chains
/// to the trail; a checkpoint signs each chain's head.
const WRITE_CHAINS: usize = 8;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

impl Columns for PgRow {
    fn i64(&self, column: impl Column) -> Result<i64, StoreError> {
        // INTEGER columns (a checkpoint's format) decode as i32 only.
        match get::<i64>(self, column) {
            Ok(value) => Ok(value),
            Err(_) => Ok(i64::from(get::<i32>(self, column)?)),
        }
    }
    fn opt_i64(&self, column: impl Column) -> Result<Option<i64>, StoreError> {
        match get::<Option<i64>>(self, column) {
            Ok(value) => Ok(value),
            Err(_) => Ok(get::<Option<i32>>(self, column)?.map(i64::from)),
        }
    }
    fn text(&self, column: impl Column) -> Result<String, StoreError> {
        Ok(get(self, column)?)
    }
    fn opt_text(&self, column: impl Column) -> Result<Option<String>, StoreError> {
        Ok(get(self, column)?)
    }
    fn bytes(&self, column: impl Column) -> Result<Vec<u8>, StoreError> {
        Ok(get(self, column)?)
    }
    fn opt_bytes(&self, column: impl Column) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get(self, column)?)
    }
}

fn get<'r, T>(row: &'r PgRow, column: impl Column) -> Result<T, sqlx::Error>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    match column.position() {
        Some(at) => {
            debug_assert_eq!(
                row.columns().get(at).map(sqlx::Column::name),
                Some(column.name()),
                "a column read by position"
            );
            row.try_get(at)
        }
        None => row.try_get(column.name()),
    }
}

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The audit writer's own connection, so a group commit never queues behind reads.
    audit_pool: PgPool,
    heads: Arc<Heads>,
}

impl PostgresStore {
    /// Connects to a `postgres://` URL.
    pub async fn connect(url: &str, max_connections: u32) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("pdvault");
        // No ping before each acquire: it is a network round trip per query. A connection the
        // server dropped fails its next query, which the caller sees as UNAVAILABLE and
        // retries, and sqlx discards it; `max_lifetime` and `idle_timeout` recycle the rest.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let audit_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            pool,
            audit_pool,
            heads: Arc::default(),
        })
    }

    /// Connects for reading only (`pdvault audit verify`): every transaction of the session
    /// is read-only, so nothing, migrations included, can write.
    pub async fn connect_read_only(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("pdvault-verify")
            .options([("default_transaction_read_only", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            audit_pool: pool.clone(),
            pool,
            heads: Arc::default(),
        })
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, StoreError> {
        Ok(self.pool.acquire().await?)
    }
}

/// Runs `$body` with `$conn` bound to a new transaction of `$pool`, committing when it
/// returns `Ok` and rolling back (by dropping the transaction) when it returns `Err`.
async fn in_transaction<T>(
    pool: &PgPool,
    body: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut tx = pool.begin().await?;
    let outcome = body(&mut tx).await?;
    tx.commit().await?;
    Ok(outcome)
}

impl CreateSteps for PostgresStore {
    async fn replayed(
        &self,
        request: &CreateRequestKey,
    ) -> Result<Option<InsertOutcome>, StoreError> {
        records::replayed(&mut *self.conn().await?, request).await
    }

    async fn insert(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        in_transaction(&self.pool, async |conn| {
            records::insert(conn, &record, request.as_ref(), &audit, &self.heads).await
        })
        .await
    }
}

/// Key administration on PostgreSQL: a transaction holding the kind's row of
/// `key_admin_locks`.
struct PgKeyAdmin {
    tx: Transaction<'static, Postgres>,
    kind: String,
}

#[async_trait]
impl KeyAdminTx for PgKeyAdmin {
    async fn active(&mut self) -> Result<Option<u32>, StoreError> {
        keys::active(&mut self.tx, &self.kind).await
    }

    async fn state(&mut self, version: u32) -> Result<String, StoreError> {
        keys::state(&mut self.tx, &self.kind, version).await
    }

    async fn next_version(&mut self) -> Result<u32, StoreError> {
        rules::to_version(keys::max_version(&mut self.tx, &self.kind).await? + 1)
    }

    async fn records_under(&mut self, version: u32) -> Result<i64, StoreError> {
        keys::records_under(&mut self.tx, &self.kind, version).await
    }

    async fn set_state(&mut self, version: u32, state: &str) -> Result<(), StoreError> {
        keys::change(
            &mut self.tx,
            queries::SET_KEY_VERSION_STATE,
            &self.kind,
            version,
            state,
        )
        .await
    }

    async fn insert(
        &mut self,
        version: u32,
        state: &str,
        provider: &str,
        now: Micros,
    ) -> Result<(), StoreError> {
        keys::insert(&mut self.tx, &self.kind, version, state, provider, now).await
    }

    async fn retire(&mut self, version: u32, now: Micros) -> Result<(), StoreError> {
        keys::change(
            &mut self.tx,
            queries::RETIRE_KEY_VERSION,
            &self.kind,
            version,
            now,
        )
        .await
    }

    async fn destroy(&mut self, version: u32, now: Micros) -> Result<(), StoreError> {
        keys::change(
            &mut self.tx,
            queries::DESTROY_KEY_VERSION,
            &self.kind,
            version,
            now,
        )
        .await
    }

    async fn known_versions(&mut self) -> Result<i64, StoreError> {
        keys::count(&mut self.tx, &self.kind).await
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(self.tx.commit().await?)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn insert_record(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: &AuditEvent,
    ) -> Result<InsertOutcome, StoreError> {
        rules::create(self, record, request, audit).await
    }

    async fn insert_records(
        &self,
        items: Vec<BatchInsert>,
        audit: AuditEvent,
    ) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let outcomes = records::insert_all(&mut tx, &items, audit, &self.heads).await?;
        // Whatever fails here, nothing of the batch was written.
        tx.commit()
            .await
            .map_err(|error| StoreError::CommitFailed(Arc::new(error.into())))?;
        Ok(outcomes)
    }

    async fn get_record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>, StoreError> {
        records::get(&mut *self.conn().await?, record_id).await
    }

    async fn get_records(
        &self,
        record_ids: &[RecordId],
        fields: &[&'static str],
    ) -> Result<Vec<Option<StoredRecord>>, StoreError> {
        records::get_all(&mut *self.conn().await?, record_ids, fields).await
    }

    async fn scan_live_records(
        &self,
        after: Option<&RecordId>,
        created_before: Micros,
        limit: u32,
        fields: &[&str],
    ) -> Result<Vec<StoredRecord>, StoreError> {
        records::scan(
            &mut *self.conn().await?,
            after,
            created_before,
            limit,
            fields,
        )
        .await
    }

    async fn update_record(
        &self,
        update: RecordUpdate,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError> {
        in_transaction(&self.pool, async |conn| {
            records::update(conn, &update, audit, &self.heads).await
        })
        .await
    }

    async fn delete_record(
        &self,
        record_id: &RecordId,
        deleted_at: Micros,
        override_suspension: bool,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        in_transaction(&self.pool, async |conn| {
            records::delete(
                conn,
                record_id,
                deleted_at,
                override_suspension,
                audit,
                &self.heads,
            )
            .await
        })
        .await
    }

    async fn find_by_document(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError> {
        records::find_by_index(&mut *self.conn().await?, "document_index", indexes).await
    }

    async fn find_by_phone(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError> {
        records::find_by_index(&mut *self.conn().await?, "phone_index", indexes).await
    }

    async fn account_state(
        &self,
        record_id: &RecordId,
    ) -> Result<Option<AccountState>, StoreError> {
        records::account_state(&mut *self.conn().await?, record_id).await
    }

    async fn set_suspended(
        &self,
        record_id: &RecordId,
        suspended: bool,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        in_transaction(&self.pool, async |conn| {
            accounts::set_suspended(
                conn,
                record_id,
                suspended,
                history,
                sealed_under,
                audit,
                &self.heads,
            )
            .await
        })
        .await
    }

    async fn list_account_events(
        &self,
        record_id: &RecordId,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<AccountEventRow>, StoreError> {
        accounts::list_events(&mut *self.conn().await?, record_id, limit, after).await
    }

    async fn insert_consent(
        &self,
        consent: &ConsentRow,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        in_transaction(&self.pool, async |conn| {
            accounts::insert_consent(conn, consent, history, sealed_under, audit, &self.heads).await
        })
        .await
    }

    async fn revoke_consents(
        &self,
        record_id: &RecordId,
        consent_id: Option<&ConsentId>,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<Vec<ConsentId>, StoreError> {
        in_transaction(&self.pool, async |conn| {
            accounts::revoke_consents(
                conn,
                record_id,
                consent_id,
                history,
                sealed_under,
                audit,
                &self.heads,
            )
            .await
        })
        .await
    }

    async fn bound_ciphertexts(
        &self,
        record_id: &RecordId,
    ) -> Result<BoundCiphertexts, StoreError> {
        accounts::bound_ciphertexts(&mut *self.conn().await?, record_id).await
    }

    async fn expire_create_requests(&self, before: Micros) -> Result<u64, StoreError> {
        records::expire_create_requests(&mut *self.conn().await?, before).await
    }

    fn write_chains(&self) -> usize {
        WRITE_CHAINS
    }

    async fn register_chain(
        &self,
        chain_id: &ChainId,
        started_at: Micros,
        genesis: &[u8],
    ) -> Result<(), StoreError> {
        audit::register_chain(&mut *self.conn().await?, chain_id, started_at, genesis).await
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let mut conn = self.audit_pool.acquire().await?;
        // One statement, one round trip, when this process's view of its chain is right;
        // otherwise a transaction that reads the head under its lock.
        if audit::append_alone(&mut conn, events, &self.heads).await? {
            return Ok(());
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        audit::append(&mut tx, events, &self.heads).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredEvent>, StoreError> {
        audit::list(&mut *self.conn().await?, query).await
    }

    async fn list_disclosures(
        &self,
        record_id: &RecordId,
        purposes: &[String],
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        audit::disclosures(&mut *self.conn().await?, record_id, purposes, limit, after).await
    }

    async fn chain_ids(&self) -> Result<Vec<String>, StoreError> {
        audit::chain_ids(&mut *self.conn().await?).await
    }

    async fn chain_heads(&self) -> Result<Vec<ChainHead>, StoreError> {
        audit::chain_heads(&mut *self.conn().await?).await
    }

    async fn chain_events(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        audit::chain_events(&mut *self.conn().await?, chain_id, after_seq, limit).await
    }

    async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let params = CheckpointParams::of(checkpoint)?;
        audit::insert_checkpoint(&mut *self.conn().await?, &params).await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        audit::checkpoints(&mut *self.conn().await?).await
    }

    async fn latest_checkpoint(&self, signer: &SignerId) -> Result<Option<Checkpoint>, StoreError> {
        audit::latest_checkpoint(&mut *self.conn().await?, signer).await
    }

    async fn count_checkpoints(&self, signer: &SignerId) -> Result<i64, StoreError> {
        audit::count_checkpoints(&mut *self.conn().await?, signer).await
    }

    async fn has_chained_checkpoints(&self) -> Result<bool, StoreError> {
        audit::has_chained_checkpoints(&mut *self.conn().await?).await
    }

    async fn expiry_markers(&self) -> Result<Vec<ExpiryMarker>, StoreError> {
        audit::expiry_markers(&mut *self.conn().await?).await
    }

    async fn expire_chain_prefix(&self, marker: &ExpiryMarker) -> Result<u64, StoreError> {
        in_transaction(&self.pool, async |conn| {
            audit::expire_prefix(conn, marker).await
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
        self.audit_pool.close().await;
    }

    async fn key_admin(&self, kind: &str) -> Result<KeyAdmin, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(keys::LOCK_KEY_ADMIN)
            .bind(kind)
            .fetch_optional(&mut *tx)
            .await?;
        Ok(Box::new(PgKeyAdmin {
            tx,
            kind: kind.to_owned(),
        }))
    }

    async fn active_key_version(&self, kind: &str) -> Result<Option<u32>, StoreError> {
        keys::active(&mut *self.conn().await?, kind).await
    }

    async fn key_version_states(&self, kind: &str) -> Result<Vec<(u32, String)>, StoreError> {
        keys::states(&mut *self.conn().await?, kind).await
    }

    async fn key_versions(&self, kind: &str) -> Result<Vec<KeyVersionRow>, StoreError> {
        keys::versions(&mut *self.conn().await?, kind).await
    }

    async fn start_rewrap_job(
        &self,
        job_id: &JobId,
        target: u32,
        owner: &JobOwner,
        now: Micros,
        lease_until: Micros,
    ) -> Result<(), StoreError> {
        jobs::start(
            &mut *self.conn().await?,
            job_id,
            target,
            owner,
            now,
            lease_until,
        )
        .await
    }

    async fn renew_rewrap_lease(
        &self,
        job_id: &JobId,
        lease_until: Micros,
    ) -> Result<bool, StoreError> {
        jobs::renew(&mut *self.conn().await?, job_id, lease_until).await
    }

    async fn interrupt_abandoned_jobs(
        &self,
        me: &JobOwner,
        now: Micros,
        legacy_lease: Micros,
    ) -> Result<u64, StoreError> {
        jobs::interrupt_abandoned(&mut *self.conn().await?, me, now, legacy_lease).await
    }

    async fn rewrap_jobs(&self, limit: i64) -> Result<Vec<RewrapJobRow>, StoreError> {
        jobs::list(&mut *self.conn().await?, limit).await
    }

    async fn rewrap_batch(
        &self,
        job_id: &JobId,
        target: u32,
        after: Option<&RecordId>,
        limit: i64,
        now: Micros,
        rewrap: &RewrapFn<'_>,
    ) -> Result<RewrapBatch, StoreError> {
        in_transaction(&self.pool, async |conn| {
            jobs::rewrap(conn, job_id, target, after, limit, now, rewrap).await
        })
        .await
    }

    async fn count_older_than(&self, target: u32) -> Result<i64, StoreError> {
        jobs::count(&mut *self.conn().await?, queries::COUNT_OLDER_THAN, target).await
    }

    async fn reindex_batch(
        &self,
        job_id: &JobId,
        target: u32,
        after: Option<&RecordId>,
        limit: i64,
        now: Micros,
        reindex: &ReindexFn<'_>,
    ) -> Result<RewrapBatch, StoreError> {
        in_transaction(&self.pool, async |conn| {
            jobs::reindex(conn, job_id, target, after, limit, now, reindex).await
        })
        .await
    }

    async fn count_index_older_than(&self, target: u32) -> Result<i64, StoreError> {
        jobs::count(
            &mut *self.conn().await?,
            queries::COUNT_INDEX_OLDER_THAN,
            target,
        )
        .await
    }

    async fn finish_rewrap_job(
        &self,
        job_id: &JobId,
        state: &str,
        now: Micros,
    ) -> Result<(), StoreError> {
        jobs::finish(&mut *self.conn().await?, job_id, state, now).await
    }

    async fn rekey_record(
        &self,
        rekey: RecordRekey,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError> {
        in_transaction(&self.pool, async |conn| {
            records::rekey(conn, &rekey, audit, &self.heads).await
        })
        .await
    }

    async fn expired_records(&self, now: Micros, limit: i64) -> Result<Vec<RecordId>, StoreError> {
        records::expired(&mut *self.conn().await?, now, limit).await
    }

    async fn rewrap_job(&self, job_id: &JobId) -> Result<Option<(i64, i64, String)>, StoreError> {
        jobs::get(&mut *self.conn().await?, job_id).await
    }
}
