//! PostgreSQL backend: the production store, which several vault instances may share.
//!
//! Correctness never rests on this process's memory: uniqueness of live documents and of
//! request ids are unique indexes, updates are conditional on the row's version, and
//! migrations take sqlx's advisory lock so instances starting together apply them once.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;
use super::shared::{Backend, impl_store};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The audit writer's own connection, so a group commit never queues behind reads.
    audit_pool: PgPool,
}

impl Backend for PostgresStore {
    type Db = Postgres;
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
        Ok(PostgresStore { pool, audit_pool })
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
        })
    }

    // Row locks make instances sharing the database take turns: key administration locks
    // its kind's row in `key_admin_locks`; a write locks the active version's row in share
    // mode, so a rotation or retirement waits for writes in flight under that version; a
    // rewrap batch skips rows another job or a writer holds instead of waiting for them.
    const LOCK_KEY_ADMIN: &'static str =
        "SELECT key_kind FROM key_admin_locks WHERE key_kind = $1 FOR UPDATE";
    const LOCK_ACTIVE_KEK: &'static str = "SELECT version FROM key_versions \
         WHERE key_kind = 'kek' AND version = $1 AND state = 'ACTIVE' FOR SHARE";
    const SELECT_REWRAP_BATCH: &'static str = "SELECT record_id, wrapped_key FROM records \
         WHERE kek_version < $1 AND record_id > $2 AND deleted_at IS NULL \
         ORDER BY record_id LIMIT $3 FOR UPDATE SKIP LOCKED";
    /// A write that sealed under a record's data key share-locks the record's row while it
    /// checks the key is still the record's: a re-key (which updates the row) waits for it,
    /// or it waits for the re-key and finds the key changed.
    const LOCK_RECORD_KEY: &'static str = "SELECT record_id FROM records \
         WHERE record_id = $1 AND wrapped_key = $2 AND deleted_at IS NULL FOR SHARE";
    const LOCK_ACTIVE_INDEX: &'static str = "SELECT version FROM key_versions \
         WHERE key_kind = 'index' AND version = $1 AND state = 'ACTIVE' FOR SHARE";
    const SELECT_REINDEX_BATCH: &'static str = "SELECT record_id, version, index_version, \
         wrapped_key, age_gate FROM records \
         WHERE index_version < $1 AND record_id > $2 AND deleted_at IS NULL \
         ORDER BY record_id LIMIT $3 FOR UPDATE SKIP LOCKED";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    async fn close_request_path(&self) {
        self.audit_pool.close().await;
    }

    /// PostgreSQL runs every statement through sqlx.
    fn direct(&self) -> Option<&super::sqlite_direct::DirectConnections> {
        None
    }

    async fn begin_audit_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.audit_pool.begin().await
    }
}

impl_store!(PostgresStore);
