//! SQLite backend: the embedded default.
//!
//! WAL lets readers run beside the single writer. `secure_delete` zeroes freed content, so
//! a crypto-shredded record's wrapped key does not survive in free pages of the live file.
//! `synchronous = FULL` makes every commit,
//! audit events included, durable before it returns. Write transactions start with
//! `BEGIN IMMEDIATE` so that a transaction that reads before it writes queues on the
//! busy timeout instead of failing with SQLITE_BUSY when it upgrades its lock.
//!
//! The database file is created mode 0600 before SQLite opens it (and an existing one is
//! closed to group and others), whatever the umask: SQLite gives the `-wal` and `-shm` files
//! the database file's permissions. [`SqliteStore::open_read_only`] opens an existing file
//! for reading only (`pdvault audit verify`): nothing created, nothing migrated.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::StoreError;
use super::shared::{Backend, impl_store};
use super::sqlite_direct::DirectConnections;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The request path (record and account reads, lookups, audit group commits); none on
    /// a read-only store, whose reads all go through the pool.
    direct: Option<Arc<DirectConnections>>,
}

impl Backend for SqliteStore {
    type Db = Sqlite;
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path, max_connections: u32) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::connect(options, max_connections).await
    }

    /// Opens an existing database from a `sqlite:` URL for reading only: a missing file is
    /// an error, not a new empty database, and no statement can write.
    pub async fn open_read_only(url: &str) -> Result<SqliteStore, StoreError> {
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(in_memory_refused());
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(false)
            .read_only(true)
            .busy_timeout(Duration::from_secs(10));
        let path = options.get_filename().to_owned();
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!(
                "database file {} does not exist",
                path.display()
            )));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool, direct: None })
    }

    /// Opens a database from a `sqlite:` URL.
    pub async fn open_url(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
        // The request path opens the file itself (`sqlite_direct`), and an audit trail held
        // only in memory would not be durable anyway.
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(in_memory_refused());
        }
        let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        Self::connect(options, max_connections).await
    }

    async fn connect(
        options: SqliteConnectOptions,
        max_connections: u32,
    ) -> Result<SqliteStore, StoreError> {
        prepare_private_file(options.get_filename())?;
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // A deleted record's wrapped key must not linger in free pages, where the live
            // KEK could still open it: overwrite freed content with zeros.
            .pragma("secure_delete", "ON")
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // No ping before each acquire: a SQLite connection is a file handle that cannot go
        // stale, and the ping is a round trip to the connection's worker thread per query.
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let direct = Arc::new(DirectConnections::open(options.get_filename())?);
        Ok(SqliteStore {
            pool,
            direct: Some(direct),
        })
    }

    // SQLite has a single writer and every write transaction begins IMMEDIATE, holding the
    // write lock from its first statement: the same statements need no row locks.
    const LOCK_KEY_ADMIN: &'static str = "SELECT key_kind FROM key_admin_locks WHERE key_kind = $1";
    pub(super) const LOCK_ACTIVE_KEK: &'static str = "SELECT version FROM key_versions \
         WHERE key_kind = 'kek' AND version = $1 AND state = 'ACTIVE'";
    const SELECT_REWRAP_BATCH: &'static str = "SELECT record_id, wrapped_key FROM records \
         WHERE kek_version < $1 AND record_id > $2 AND deleted_at IS NULL \
         ORDER BY record_id LIMIT $3";
    const LOCK_RECORD_KEY: &'static str = "SELECT record_id FROM records \
         WHERE record_id = $1 AND wrapped_key = $2 AND deleted_at IS NULL";
    pub(super) const LOCK_ACTIVE_INDEX: &'static str = "SELECT version FROM key_versions \
         WHERE key_kind = 'index' AND version = $1 AND state = 'ACTIVE'";
    const SELECT_REINDEX_BATCH: &'static str = "SELECT record_id, version, index_version, \
         wrapped_key, age_gate FROM records \
         WHERE index_version < $1 AND record_id > $2 AND deleted_at IS NULL \
         ORDER BY record_id LIMIT $3";

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn close_request_path(&self) {
        if let Some(direct) = &self.direct {
            direct.close().await;
        }
    }

    /// The request path this backend runs outside sqlx (see `sqlite_direct`).
    fn direct(&self) -> Option<&DirectConnections> {
        self.direct.as_deref()
    }

    /// Unused on SQLite, whose audit batches go to the request path's writer thread; the
    /// shared code needs it for PostgreSQL.
    async fn begin_audit_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.begin_write().await
    }
}

/// Creates the database file empty with mode 0600 (an empty file is an empty SQLite
/// database), or takes group and others' access away from an existing one and from its
/// `-wal` and `-shm` files: SQLite creates those with the database file's mode, so the
/// trail and the sealed records never land in a file another user can read, whatever the
/// umask.
fn prepare_private_file(path: &Path) -> Result<(), StoreError> {
    let unavailable =
        |error: std::io::Error| StoreError::Unavailable(format!("{}: {error}", path.display()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(unavailable(error)),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut files = vec![path.to_owned()];
        for suffix in ["-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            files.push(name.into());
        }
        for file in files {
            let Ok(metadata) = std::fs::metadata(&file) else {
                continue;
            };
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))
                    .map_err(unavailable)?;
            }
        }
    }
    Ok(())
}

fn in_memory_refused() -> StoreError {
    StoreError::Unavailable(
        "an in-memory SQLite database cannot hold a durable audit trail; give database.url a file"
            .into(),
    )
}

impl_store!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_databases_are_refused() {
        for url in ["sqlite::memory:", "sqlite://vault.db?mode=memory"] {
            let refused = SqliteStore::open_url(url, 1).await.unwrap_err();
            assert!(
                refused.to_string().contains("in-memory"),
                "{url}: {refused}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_store_refuses_reads_and_writes_of_the_request_path() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        assert!(store.account_state("rec_none").await.unwrap().is_none());
        store.close().await;
        let read = store.account_state("rec_none").await.unwrap_err();
        assert!(read.to_string().contains("closed"), "{read}");
        let write = store.append_audit(&[]).await.unwrap_err();
        assert!(matches!(write, StoreError::Unavailable(_)), "{write}");
    }
}
