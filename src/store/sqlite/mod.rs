//! SQLite backend, the embedded default, entirely on rusqlite (a bundled SQLite).
//!
//! Every write runs on the one writer thread and every read on the reader threads of
//! `driver`; this module only says which, and the aggregate modules hold the SQL:
//! `records` (creates, reads, lookups, updates, deletes, re-keys, retention), `accounts`
//! (suspensions, history, consents), `audit` (chains, trail queries, checkpoints),
//! `keys` (key versions; key administration through [`KeyAdminTx`](crate::store::KeyAdminTx))
//! and `jobs` (rewrap jobs and batches). Migrations: `migrate`.
//!
//! WAL lets readers run beside the writer. `secure_delete` zeroes freed content, so a
//! crypto-shredded record's wrapped key does not survive in free pages of the live file.
//! `synchronous = FULL` makes every commit, audit events included, durable before its
//! callers are answered. Write transactions start with `BEGIN IMMEDIATE`, taking the write
//! lock up front, so the checks a write makes (key version still active, record key still
//! the record's) cannot go stale before it commits: no row locks are needed.
//!
//! The database file is created mode 0600 before SQLite opens it (and an existing one is
//! closed to group and others), whatever the umask: SQLite gives the `-wal` and `-shm` files
//! the database file's permissions. [`SqliteStore::open_read_only`] opens an existing file
//! for reading only (`pdvault audit verify`): nothing created, nothing migrated.

mod accounts;
mod audit;
mod driver;
mod jobs;
mod keys;
mod migrate;
mod records;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::Row;

use self::driver::{Access, Driver, WriteTx};
pub use self::migrate::MigrationError;
use super::rules::{self, CheckpointParams, Column, Columns, CreateSteps};
use super::{
    AccountEventRow, AccountState, AuditQuery, BatchInsert, BoundCiphertexts, ConsentRow,
    CreateRequestKey, InsertOutcome, JobOwner, KeyAdmin, KeyAdminTx, KeyVersionRow, LookupMatch,
    Micros, NewRecord, RecordMeta, RecordRekey, RecordUpdate, ReindexFn, RewrapBatch, RewrapFn,
    RewrapJobRow, Store, StoreError, StoredRecord,
};
use crate::domain::audit_chain::{AuditEvent, ChainHead, Checkpoint, ExpiryMarker, StoredEvent};
use crate::domain::ids::{AccountEventId, ChainId, ConsentId, JobId, RecordId, SignerId};

// SQLite has a single writer and every write transaction begins IMMEDIATE, holding the
// write lock from its first statement: the statements PostgreSQL runs with row locks need
// none here.
const LOCK_ACTIVE_KEK: &str = "SELECT version FROM key_versions \
     WHERE key_kind = 'kek' AND version = $1 AND state = 'ACTIVE'";
const LOCK_ACTIVE_INDEX: &str = "SELECT version FROM key_versions \
     WHERE key_kind = 'index' AND version = $1 AND state = 'ACTIVE'";
const LOCK_RECORD_KEY: &str = "SELECT record_id FROM records \
     WHERE record_id = $1 AND wrapped_key = $2 AND deleted_at IS NULL";
const SELECT_REWRAP_BATCH: &str = "SELECT record_id, wrapped_key FROM records \
     WHERE kek_version < $1 AND record_id > $2 AND deleted_at IS NULL \
     ORDER BY record_id LIMIT $3";
const SELECT_REINDEX_BATCH: &str = "SELECT record_id, version, index_version, \
     wrapped_key, age_gate FROM records \
     WHERE index_version < $1 AND record_id > $2 AND deleted_at IS NULL \
     ORDER BY record_id LIMIT $3";

impl Columns for Row<'_> {
    fn i64(&self, column: impl Column) -> Result<i64, StoreError> {
        get(self, column)
    }
    fn opt_i64(&self, column: impl Column) -> Result<Option<i64>, StoreError> {
        get(self, column)
    }
    fn text(&self, column: impl Column) -> Result<String, StoreError> {
        get(self, column)
    }
    fn opt_text(&self, column: impl Column) -> Result<Option<String>, StoreError> {
        get(self, column)
    }
    fn bytes(&self, column: impl Column) -> Result<Vec<u8>, StoreError> {
        get(self, column)
    }
    fn opt_bytes(&self, column: impl Column) -> Result<Option<Vec<u8>>, StoreError> {
        get(self, column)
    }
}

fn get<T: rusqlite::types::FromSql>(row: &Row<'_>, column: impl Column) -> Result<T, StoreError> {
    Ok(match column.position() {
        Some(at) => {
            debug_assert_eq!(
                row.as_ref().column_name(at).ok(),
                Some(column.name()),
                "a column read by position"
            );
            row.get(at)?
        }
        None => row.get(column.name())?,
    })
}

/// Reader threads per store: reads block on the disk, so more readers than cores keep the
/// cores busy; a few more are cheap (a thread and a connection each).
fn reader_count() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .clamp(4, 16)
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    driver: Arc<Driver>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`. `max_connections` bounds the
    /// reader threads.
    pub async fn open(path: &Path, max_connections: u32) -> Result<SqliteStore, StoreError> {
        prepare_private_file(path)?;
        let readers = reader_count().min(max_connections.max(1) as usize);
        let driver = Driver::open(path, Access::ReadWrite, readers)?;
        Ok(SqliteStore {
            driver: Arc::new(driver),
        })
    }

    /// Opens an existing database from a `sqlite:` URL for reading only: a missing file is
    /// an error, not a new empty database, and no statement can write.
    pub async fn open_read_only(url: &str) -> Result<SqliteStore, StoreError> {
        let path = path_of_url(url)?;
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!(
                "database file {} does not exist",
                path.display()
            )));
        }
        let driver = Driver::open(&path, Access::ReadOnly, 1)?;
        Ok(SqliteStore {
            driver: Arc::new(driver),
        })
    }

    /// Opens a database from a `sqlite:` URL.
    pub async fn open_url(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&path_of_url(url)?, max_connections).await
    }

    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.driver.read(read).await
    }

    async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.driver.write(write).await
    }

    /// A rewrap or re-index batch: the rows `selected` (read on a reader) are computed here,
    /// on the caller's task (`None`: that row failed), and written by one writer job (`None`
    /// from it: the target version is no longer active, nothing written).
    async fn batch<R, W: Send + 'static>(
        &self,
        selected: Vec<R>,
        record_id: impl Fn(&R) -> &RecordId,
        mut compute: impl FnMut(R) -> Option<W>,
        write: impl FnOnce(&rusqlite::Connection, &[W], u64) -> Result<Option<u64>, StoreError>
        + Send
        + 'static,
    ) -> Result<RewrapBatch, StoreError> {
        let count = selected.len();
        let last = selected.last().map(|row| record_id(row).clone());
        let mut failed = 0;
        let mut done = Vec::with_capacity(count);
        for row in selected {
            match compute(row) {
                Some(computed) => done.push(computed),
                None => failed += 1,
            }
        }
        let changed = self.write(move |conn| write(conn, &done, failed)).await?;
        Ok(jobs::outcome(count, last, changed, failed))
    }
}

/// Ids bind as the text they are, so statements take them as any other parameter.
macro_rules! id_to_sql {
    ($($id:ty),*) => {$(
        impl rusqlite::ToSql for $id {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
    )*};
}

id_to_sql!(
    RecordId,
    JobId,
    AccountEventId,
    ConsentId,
    ChainId,
    SignerId
);

/// The file a `sqlite:` URL names (`sqlite://path`, `sqlite:path`, with `?mode=rwc` or
/// `?mode=rw` allowed). In-memory databases are refused: the audit trail must be durable,
/// and the reader threads open the file themselves.
fn path_of_url(url: &str) -> Result<PathBuf, StoreError> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Err(StoreError::Unavailable(
            "an in-memory SQLite database cannot hold a durable audit trail; give database.url a file"
                .into(),
        ));
    }
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| StoreError::Unavailable("database.url: not a sqlite: URL".into()))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    for parameter in query.split('&').filter(|p| !p.is_empty()) {
        if !matches!(parameter, "mode=rwc" | "mode=rw" | "mode=ro") {
            return Err(StoreError::Unavailable(format!(
                "database.url: unsupported SQLite URL parameter {parameter:?}"
            )));
        }
    }
    if path.is_empty() {
        return Err(StoreError::Unavailable(
            "database.url: no file named".into(),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Creates the database file empty with mode 0600 (an empty file is an empty SQLite
/// database), or takes group and others' access away from an existing one and from its
/// `-wal` and `-shm` files: SQLite creates those with the database file's mode, so the
/// trail and the sealed records never land in a file another user can read, whatever the
/// umask.
fn prepare_private_file(path: &Path) -> Result<(), StoreError> {
    let failed = |source: std::io::Error| StoreError::File {
        path: path.to_owned(),
        source,
    };
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
        Err(error) => return Err(failed(error)),
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
                    .map_err(failed)?;
            }
        }
    }
    Ok(())
}

impl CreateSteps for SqliteStore {
    async fn replayed(
        &self,
        request: &CreateRequestKey,
    ) -> Result<Option<InsertOutcome>, StoreError> {
        let request = request.clone();
        self.read(move |conn| records::replayed(conn, &request))
            .await
    }

    async fn insert(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(move |conn| records::insert(conn, &record, request.as_ref(), &audit))
            .await
    }
}

/// Key administration on SQLite: one write transaction held on the writer thread.
struct SqliteKeyAdmin {
    tx: WriteTx,
    kind: String,
}

#[async_trait]
impl KeyAdminTx for SqliteKeyAdmin {
    async fn active(&mut self) -> Result<Option<u32>, StoreError> {
        let kind = self.kind.clone();
        self.tx.run(move |conn| keys::active(conn, &kind)).await
    }

    async fn state(&mut self, version: u32) -> Result<String, StoreError> {
        let kind = self.kind.clone();
        self.tx
            .run(move |conn| keys::state(conn, &kind, version))
            .await
    }

    async fn next_version(&mut self) -> Result<u32, StoreError> {
        let kind = self.kind.clone();
        self.tx
            .run(move |conn| rules::to_version(keys::max_version(conn, &kind)? + 1))
            .await
    }

    async fn records_under(&mut self, version: u32) -> Result<i64, StoreError> {
        let kind = self.kind.clone();
        self.tx
            .run(move |conn| keys::records_under(conn, &kind, version))
            .await
    }

    async fn set_state(&mut self, version: u32, state: &str) -> Result<(), StoreError> {
        let (kind, state) = (self.kind.clone(), state.to_owned());
        self.tx
            .run(move |conn| keys::set_state(conn, &kind, version, &state))
            .await
    }

    async fn insert(
        &mut self,
        version: u32,
        state: &str,
        provider: &str,
        now: Micros,
    ) -> Result<(), StoreError> {
        let (kind, state, provider) = (self.kind.clone(), state.to_owned(), provider.to_owned());
        self.tx
            .run(move |conn| keys::insert(conn, &kind, version, &state, &provider, now))
            .await
    }

    async fn retire(&mut self, version: u32, now: Micros) -> Result<(), StoreError> {
        let kind = self.kind.clone();
        self.tx
            .run(move |conn| keys::retire(conn, &kind, version, now))
            .await
    }

    async fn destroy(&mut self, version: u32, now: Micros) -> Result<(), StoreError> {
        let kind = self.kind.clone();
        self.tx
            .run(move |conn| keys::destroy(conn, &kind, version, now))
            .await
    }

    async fn known_versions(&mut self) -> Result<i64, StoreError> {
        let kind = self.kind.clone();
        self.tx.run(move |conn| keys::count(conn, &kind)).await
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.driver.exclusive(migrate::run).await.map(|_| ())
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
        // One job: the writer runs it whole in one group transaction.
        self.write(move |conn| records::insert_all(conn, &items, audit))
            .await
    }

    async fn get_record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>, StoreError> {
        let record_id = record_id.clone();
        self.read(move |conn| records::get(conn, &record_id)).await
    }

    async fn get_records(
        &self,
        record_ids: &[RecordId],
        fields: &[&'static str],
    ) -> Result<Vec<Option<StoredRecord>>, StoreError> {
        let record_ids = record_ids.to_vec();
        let fields = fields.to_vec();
        self.read(move |conn| records::get_all(conn, &record_ids, &fields))
            .await
    }

    async fn scan_live_records(
        &self,
        after: Option<&RecordId>,
        created_before: Micros,
        limit: u32,
        fields: &[&str],
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let after = after.map_or_else(String::new, |id| id.as_str().to_owned());
        let fields: Vec<String> = fields.iter().map(|field| (*field).to_owned()).collect();
        self.read(move |conn| records::scan(conn, &after, created_before, limit, &fields))
            .await
    }

    async fn update_record(
        &self,
        update: RecordUpdate,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError> {
        let audit = audit.clone();
        self.write(move |conn| records::update(conn, &update, &audit))
            .await
    }

    async fn delete_record(
        &self,
        record_id: &RecordId,
        deleted_at: Micros,
        override_suspension: bool,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let (record_id, audit) = (record_id.clone(), audit.clone());
        self.write(move |conn| {
            records::delete(conn, &record_id, deleted_at, override_suspension, &audit)
        })
        .await
    }

    async fn find_by_document(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError> {
        let indexes = indexes.to_vec();
        self.read(move |conn| records::find_by_index(conn, "document_index", &indexes))
            .await
    }

    async fn find_by_phone(&self, indexes: &[Vec<u8>]) -> Result<Vec<LookupMatch>, StoreError> {
        let indexes = indexes.to_vec();
        self.read(move |conn| records::find_by_index(conn, "phone_index", &indexes))
            .await
    }

    async fn account_state(
        &self,
        record_id: &RecordId,
    ) -> Result<Option<AccountState>, StoreError> {
        let record_id = record_id.clone();
        self.read(move |conn| records::account_state(conn, &record_id))
            .await
    }

    async fn set_suspended(
        &self,
        record_id: &RecordId,
        suspended: bool,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let (record_id, history, audit) = (record_id.clone(), history.clone(), audit.clone());
        let sealed_under = sealed_under.map(<[u8]>::to_vec);
        self.write(move |conn| {
            accounts::set_suspended(
                conn,
                &record_id,
                suspended,
                &history,
                sealed_under.as_deref(),
                &audit,
            )
        })
        .await
    }

    async fn list_account_events(
        &self,
        record_id: &RecordId,
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<AccountEventRow>, StoreError> {
        let record_id = record_id.clone();
        self.read(move |conn| accounts::list_events(conn, &record_id, limit, after))
            .await
    }

    async fn insert_consent(
        &self,
        consent: &ConsentRow,
        history: &AccountEventRow,
        sealed_under: Option<&[u8]>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let (consent, history, audit) = (consent.clone(), history.clone(), audit.clone());
        let sealed_under = sealed_under.map(<[u8]>::to_vec);
        self.write(move |conn| {
            accounts::insert_consent(conn, &consent, &history, sealed_under.as_deref(), &audit)
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
        let (record_id, history, audit) = (record_id.clone(), history.clone(), audit.clone());
        let consent_id = consent_id.cloned();
        let sealed_under = sealed_under.map(<[u8]>::to_vec);
        self.write(move |conn| {
            accounts::revoke_consents(
                conn,
                &record_id,
                consent_id.as_ref(),
                &history,
                sealed_under.as_deref(),
                &audit,
            )
        })
        .await
    }

    async fn bound_ciphertexts(
        &self,
        record_id: &RecordId,
    ) -> Result<BoundCiphertexts, StoreError> {
        let record_id = record_id.clone();
        self.read(move |conn| accounts::bound_ciphertexts(conn, &record_id))
            .await
    }

    async fn expire_create_requests(&self, before: Micros) -> Result<u64, StoreError> {
        self.write(move |conn| records::expire_create_requests(conn, before))
            .await
    }

    async fn register_chain(
        &self,
        chain_id: &ChainId,
        started_at: Micros,
        genesis: &[u8],
    ) -> Result<(), StoreError> {
        let (chain_id, genesis) = (chain_id.clone(), genesis.to_vec());
        self.write(move |conn| audit::register_chain(conn, &chain_id, started_at, &genesis))
            .await
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.write(move |conn| audit::append(conn, &events)).await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let query = query.clone();
        self.read(move |conn| audit::list(conn, &query)).await
    }

    async fn list_disclosures(
        &self,
        record_id: &RecordId,
        purposes: &[String],
        limit: u32,
        after: Option<(Micros, String)>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (record_id, purposes) = (record_id.clone(), purposes.to_vec());
        self.read(move |conn| audit::disclosures(conn, record_id.as_str(), &purposes, limit, after))
            .await
    }

    async fn chain_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(audit::chain_ids).await
    }

    async fn chain_heads(&self) -> Result<Vec<ChainHead>, StoreError> {
        self.read(audit::chain_heads).await
    }

    async fn chain_events(
        &self,
        chain_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let chain_id = chain_id.to_owned();
        self.read(move |conn| audit::chain_events(conn, &chain_id, after_seq, limit))
            .await
    }

    async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let params = CheckpointParams::of(checkpoint)?;
        self.write(move |conn| audit::insert_checkpoint(conn, &params))
            .await
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        self.read(audit::checkpoints).await
    }

    async fn latest_checkpoint(&self, signer: &SignerId) -> Result<Option<Checkpoint>, StoreError> {
        let signer = signer.clone();
        self.read(move |conn| audit::latest_checkpoint(conn, &signer))
            .await
    }

    async fn count_checkpoints(&self, signer: &SignerId) -> Result<i64, StoreError> {
        let signer = signer.clone();
        self.read(move |conn| audit::count_checkpoints(conn, &signer))
            .await
    }

    async fn has_chained_checkpoints(&self) -> Result<bool, StoreError> {
        self.read(audit::has_chained_checkpoints).await
    }

    async fn expiry_markers(&self) -> Result<Vec<ExpiryMarker>, StoreError> {
        self.read(audit::expiry_markers).await
    }

    async fn expire_chain_prefix(&self, marker: &ExpiryMarker) -> Result<u64, StoreError> {
        let marker = marker.clone();
        self.write(move |conn| audit::expire_prefix(conn, &marker))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| driver::scalar::<i64>(conn, "SELECT 1", &[]).map(|_| ()))
            .await
    }

    async fn close(&self) {
        self.driver.close().await;
    }

    async fn key_admin(&self, kind: &str) -> Result<KeyAdmin, StoreError> {
        let tx = self.driver.begin().await?;
        Ok(Box::new(SqliteKeyAdmin {
            tx,
            kind: kind.to_owned(),
        }))
    }

    async fn active_key_version(&self, kind: &str) -> Result<Option<u32>, StoreError> {
        let kind = kind.to_owned();
        self.read(move |conn| keys::active(conn, &kind)).await
    }

    async fn key_version_states(&self, kind: &str) -> Result<Vec<(u32, String)>, StoreError> {
        let kind = kind.to_owned();
        self.read(move |conn| keys::states(conn, &kind)).await
    }

    async fn key_versions(&self, kind: &str) -> Result<Vec<KeyVersionRow>, StoreError> {
        let kind = kind.to_owned();
        self.read(move |conn| keys::versions(conn, &kind)).await
    }

    async fn start_rewrap_job(
        &self,
        job_id: &JobId,
        target: u32,
        owner: &JobOwner,
        now: Micros,
        lease_until: Micros,
    ) -> Result<(), StoreError> {
        let (job_id, owner) = (job_id.clone(), owner.clone());
        self.write(move |conn| jobs::start(conn, &job_id, target, &owner, now, lease_until))
            .await
    }

    async fn renew_rewrap_lease(
        &self,
        job_id: &JobId,
        lease_until: Micros,
    ) -> Result<bool, StoreError> {
        let job_id = job_id.clone();
        self.write(move |conn| jobs::renew(conn, &job_id, lease_until))
            .await
    }

    async fn interrupt_abandoned_jobs(
        &self,
        me: &JobOwner,
        now: Micros,
        legacy_lease: Micros,
    ) -> Result<u64, StoreError> {
        let me = me.clone();
        self.write(move |conn| jobs::interrupt_abandoned(conn, &me, now, legacy_lease))
            .await
    }

    async fn rewrap_jobs(&self, limit: i64) -> Result<Vec<RewrapJobRow>, StoreError> {
        self.read(move |conn| jobs::list(conn, limit)).await
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
        let after = after.map_or_else(String::new, |id| id.as_str().to_owned());
        let selected = self
            .read(move |conn| jobs::select_rewrap(conn, target, &after, limit))
            .await?;
        let job_id = job_id.clone();
        self.batch(
            selected,
            |(record_id, _)| record_id,
            |(record_id, old)| rewrap(&record_id, &old).map(|new| (record_id, old, new)),
            move |conn, done, failed| jobs::write_rewrap(conn, &job_id, target, done, failed, now),
        )
        .await
    }

    async fn count_older_than(&self, target: u32) -> Result<i64, StoreError> {
        self.read(move |conn| jobs::count_older(conn, target)).await
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
        let after = after.map_or_else(String::new, |id| id.as_str().to_owned());
        let selected = self
            .read(move |conn| jobs::select_reindex(conn, target, &after, limit))
            .await?;
        let job_id = job_id.clone();
        self.batch(
            selected,
            |(row, _)| &row.record_id,
            |(row, version)| {
                reindex(&row).map(|new| (row.record_id, version, row.index_version, new))
            },
            move |conn, done, failed| jobs::write_reindex(conn, &job_id, target, done, failed, now),
        )
        .await
    }

    async fn count_index_older_than(&self, target: u32) -> Result<i64, StoreError> {
        self.read(move |conn| jobs::count_index_older(conn, target))
            .await
    }

    async fn finish_rewrap_job(
        &self,
        job_id: &JobId,
        state: &str,
        now: Micros,
    ) -> Result<(), StoreError> {
        let (job_id, state) = (job_id.clone(), state.to_owned());
        self.write(move |conn| jobs::finish(conn, &job_id, &state, now))
            .await
    }

    async fn rekey_record(
        &self,
        rekey: RecordRekey,
        audit: &AuditEvent,
    ) -> Result<RecordMeta, StoreError> {
        let audit = audit.clone();
        self.write(move |conn| records::rekey(conn, &rekey, &audit))
            .await
    }

    async fn expired_records(&self, now: Micros, limit: i64) -> Result<Vec<RecordId>, StoreError> {
        self.read(move |conn| records::expired(conn, now, limit))
            .await
    }

    async fn rewrap_job(&self, job_id: &JobId) -> Result<Option<(i64, i64, String)>, StoreError> {
        let job_id = job_id.clone();
        self.read(move |conn| jobs::get(conn, &job_id)).await
    }
}

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
    async fn a_closed_store_refuses_reads_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let none = RecordId::parse("record_id", "rec_nnnnnnnnnnnnnnnnnnnnnnnnnn").unwrap();
        assert!(store.account_state(&none).await.unwrap().is_none());
        store.close().await;
        let read = store.account_state(&none).await.unwrap_err();
        assert!(read.to_string().contains("closed"), "{read}");
        let write = store.append_audit(&[]).await.unwrap_err();
        assert!(matches!(write, StoreError::Unavailable(_)), "{write}");
    }

    #[tokio::test]
    async fn a_read_only_store_refuses_writes_and_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let store = SqliteStore::open(&path, 1).await.unwrap();
        store.migrate().await.unwrap();
        store.close().await;
        let url = format!("sqlite://{}", path.display());
        let read_only = SqliteStore::open_read_only(&url).await.unwrap();
        assert!(read_only.chain_heads().await.unwrap().is_empty());
        let refused = read_only
            .register_chain(&ChainId::generate(), 1, b"g")
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("read-only"), "{refused}");
        assert!(read_only.migrate().await.is_err());
    }

    /// A batch read of more ids than SQLite binds in one statement (32 766) is read in
    /// chunks (`queries::IDS_PER_STATEMENT`): one result per id, no error.
    #[tokio::test]
    async fn batch_reads_beyond_the_parameter_limit_are_chunked() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let ids: Vec<RecordId> = (0..33_000).map(|_| RecordId::generate().unwrap()).collect();
        let found = store.get_records(&ids, &["name"]).await.unwrap();
        assert_eq!(found.len(), ids.len());
        assert!(found.iter().all(Option::is_none));
    }

    /// Runs `sql` on a connection of the test's own, off the runtime's threads.
    async fn behind_the_store(path: &Path, sql: &'static str) {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap()
        })
        .await
        .unwrap();
    }

    /// A row whose id column holds something no vault issued (edited behind the vault's
    /// back) is a corrupt row: the read fails naming the column, never the value, and
    /// nothing panics.
    #[tokio::test]
    async fn a_row_with_a_malformed_id_is_a_corrupt_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let store = SqliteStore::open(&path, 1).await.unwrap();
        store.migrate().await.unwrap();
        behind_the_store(
            &path,
            "INSERT INTO records (record_id, version, created_at, updated_at, wrapped_key, \
             kek_version, retain_until) VALUES ('11010519491231002X', 1, 1, 1, x'00', 1, 5); \
             INSERT INTO rewrap_jobs (job_id, target_version, state, started_at, updated_at) \
             VALUES ('job 7', 1, 'DONE', 1, 1)",
        )
        .await;
        let refused = [
            store.expired_records(10, 10).await.map(|_| ()).unwrap_err(),
            store
                .scan_live_records(None, 10, 10, &[])
                .await
                .map(|_| ())
                .unwrap_err(),
            store.rewrap_jobs(10).await.map(|_| ()).unwrap_err(),
        ];
        for error in refused {
            let StoreError::Corrupt(what) = &error else {
                panic!("{error:?}");
            };
            assert!(what.contains("is not a"), "{what}");
            assert!(!what.contains("1101") && !what.contains("job 7"), "{what}");
        }
        store.close().await;
    }

    /// Account-history and consent ids of the shapes the old random-token generator issued
    /// (`acc_`/`con_` and 26 RFC 4648 base32 characters; a revocation's entries `<id>_<n>`)
    /// still decode, and an old consent is still revoked by its id, the new history entry
    /// getting an id from the one generator.
    #[tokio::test]
    async fn account_event_and_consent_ids_of_the_old_shapes_still_decode() {
        const RECORD: &str = "rec_mzxw6ytboi2dcnzrgq3tmojqgq";
        const CONSENT: &str = "con_mfrggzdfmztwq2lkmfrggzdfmy";
        const RECORDED: &str = "acc_mzxw6ytboi2dcnzrgq3tmojqga";
        const REVOKED: &str = "acc_mzxw6ytboi2dcnzrgq3tmojqgb_0";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let store = SqliteStore::open(&path, 1).await.unwrap();
        store.migrate().await.unwrap();
        behind_the_store(
            &path,
            "INSERT INTO records (record_id, version, created_at, updated_at, wrapped_key, \
             kek_version, retain_until) VALUES ('rec_mzxw6ytboi2dcnzrgq3tmojqgq', 1, 1, 1, x'00', 1, 5); \
             INSERT INTO guardian_consents (consent_id, record_id, relationship, evidence_ref, \
             policy_version, granted_at, granted_by) VALUES ('con_mfrggzdfmztwq2lkmfrggzdfmy', \
             'rec_mzxw6ytboi2dcnzrgq3tmojqgq', 'PARENT', 'EV-1', '2025-01', 1, 'app'); \
             INSERT INTO account_events (event_id, record_id, occurred_at, kind, actor, consent_id) \
             VALUES ('acc_mzxw6ytboi2dcnzrgq3tmojqga', 'rec_mzxw6ytboi2dcnzrgq3tmojqgq', 1, \
             'CONSENT_RECORDED', 'app', 'con_mfrggzdfmztwq2lkmfrggzdfmy'), \
             ('acc_mzxw6ytboi2dcnzrgq3tmojqgb_0', 'rec_mzxw6ytboi2dcnzrgq3tmojqgq', 2, \
             'SUSPENDED', 'app', NULL)",
        )
        .await;
        let record = RecordId::parse("record_id", RECORD).unwrap();
        let history = store.list_account_events(&record, 10, None).await.unwrap();
        let ids: Vec<(&str, Option<&str>)> = history
            .iter()
            .map(|row| {
                (
                    row.event_id.as_str(),
                    row.consent_id.as_ref().map(ConsentId::as_str),
                )
            })
            .collect();
        assert_eq!(ids, [(RECORDED, Some(CONSENT)), (REVOKED, None)]);

        let chain = ChainId::generate();
        store.register_chain(&chain, 1, b"g").await.unwrap();
        let entry = AccountEventRow {
            event_id: AccountEventId::generate(),
            record_id: record.clone(),
            occurred_at: 3,
            kind: "CONSENT_REVOKED".to_owned(),
            actor: "app".to_owned(),
            reason: None,
            note: None,
            ticket: None,
            consent_id: None,
        };
        let audit = AuditEvent {
            event_id: crate::domain::ids::EventId::generate().into_string(),
            occurred_at: 3,
            chain_id: chain.into_string(),
            caller: "app".to_owned(),
            peer: None,
            rpc: "RevokeGuardianConsent".to_owned(),
            record_ids: vec![RECORD.to_owned()],
            purpose: None,
            justification: None,
            released: Vec::new(),
            outcome: "OK".to_owned(),
            reason: None,
            request_id: None,
            trace_id: None,
        };
        let consent = ConsentId::parse("consent_id", CONSENT).unwrap();
        let revoked = store
            .revoke_consents(&record, Some(&consent), &entry, None, &audit)
            .await
            .unwrap();
        assert_eq!(revoked, std::slice::from_ref(&consent));
        let history = store.list_account_events(&record, 10, None).await.unwrap();
        let last = history.last().unwrap();
        assert_eq!(last.event_id, entry.event_id);
        assert_eq!(last.consent_id.as_ref(), Some(&consent));
        store.close().await;
    }

    #[tokio::test]
    async fn migrations_apply_once_and_refuse_a_newer_or_changed_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let store = SqliteStore::open(&path, 1).await.unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        let applied = store
            .read(|conn| driver::scalar::<i64>(conn, "SELECT COUNT(*) FROM _sqlx_migrations", &[]))
            .await
            .unwrap();
        assert_eq!(applied as usize, migrate::MIGRATIONS.len());

        behind_the_store(
            &path,
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .await;
        let refused = store.migrate().await.unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::SqliteMigration(MigrationError::Unknown { version: 9999 })
            ),
            "{refused:?}"
        );

        behind_the_store(
            &path,
            "DELETE FROM _sqlx_migrations WHERE version = 9999; \
             UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1",
        )
        .await;
        let refused = store.migrate().await.unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::SqliteMigration(MigrationError::Changed { version: 1 })
            ),
            "{refused:?}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn one_failed_write_rolls_back_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        // Queued together, they share a group commit: the duplicate chain fails, the other
        // two are written.
        let chain_a = ChainId::parse("chain_id", "chn_aaaaaaaaaaaaaaaa").unwrap();
        let chain_b = ChainId::parse("chain_id", "chn_bbbbbbbbbbbbbbbb").unwrap();
        let (a, b, c) = tokio::join!(
            store.register_chain(&chain_a, 1, b"genesis"),
            store.register_chain(&chain_a, 2, b"genesis"),
            store.register_chain(&chain_b, 3, b"genesis"),
        );
        let failures = [&a, &b].iter().filter(|r| r.is_err()).count();
        assert_eq!(failures, 1, "{a:?} {b:?}");
        assert!(c.is_ok(), "{c:?}");
        let refused = if let Err(error) = a {
            error
        } else {
            b.unwrap_err()
        };
        assert!(refused.is_refused_data(), "{refused:?}");
        let heads = store.chain_heads().await.unwrap();
        let ids: Vec<&str> = heads.iter().map(|h| h.chain_id.as_str()).collect();
        assert_eq!(ids, [chain_a.as_str(), chain_b.as_str()]);
        store.close().await;
    }

    /// The guard the suite relies on: a statement prepared anywhere but on the store's own
    /// threads (here, a runtime's) fails in debug builds.
    #[cfg(debug_assertions)]
    #[tokio::test]
    #[should_panic(expected = "outside the store's threads")]
    async fn a_statement_on_a_runtime_thread_is_caught() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let _ = driver::statement(&conn, "SELECT 1");
    }

    #[tokio::test]
    async fn a_key_admin_transaction_dropped_without_commit_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let mut tx = store.key_admin("kek").await.unwrap();
        assert_eq!(tx.known_versions().await.unwrap(), 0);
        tx.insert(1, "ACTIVE", "local", 1).await.unwrap();
        drop(tx);
        // The writer rolled it back and serves other writes again.
        store
            .register_chain(&ChainId::generate(), 1, b"g")
            .await
            .unwrap();
        assert_eq!(store.active_key_version("kek").await.unwrap(), None);
        let mut tx = store.key_admin("kek").await.unwrap();
        tx.insert(1, "ACTIVE", "local", 1).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.active_key_version("kek").await.unwrap(), Some(1));
        store.close().await;
    }

    /// A migration may rebuild a table others reference (foreign keys are off while it
    /// runs), but may not commit rows whose foreign keys point nowhere; foreign keys are on
    /// again afterwards.
    #[tokio::test]
    async fn migrations_run_without_foreign_keys_and_are_checked_before_commit() {
        const LIST: &[(i64, &str, &str)] = &[
            (
                1,
                "parent and child",
                "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
                 CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent(id)); \
                 INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1);",
            ),
            (
                2,
                "rebuild parent",
                "CREATE TABLE parent_new (id INTEGER PRIMARY KEY, name TEXT); \
                 INSERT INTO parent_new SELECT id, NULL FROM parent; DROP TABLE parent; \
                 ALTER TABLE parent_new RENAME TO parent;",
            ),
            (3, "dangling", "INSERT INTO child VALUES (2, 99);"),
        ];
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db"), 1)
            .await
            .unwrap();
        let refused = store
            .driver
            .exclusive(|conn| migrate::run_list(conn, LIST))
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                StoreError::SqliteMigration(MigrationError::ForeignKeys { version: 3 })
            ),
            "{refused:?}"
        );
        let (versions, children, foreign_keys) = store
            .driver
            .exclusive(|conn| {
                Ok((
                    driver::scalar::<String>(
                        conn,
                        "SELECT group_concat(version) FROM _sqlx_migrations",
                        &[],
                    )?,
                    driver::scalar::<i64>(conn, "SELECT COUNT(*) FROM child", &[])?,
                    driver::scalar::<i64>(conn, "PRAGMA foreign_keys", &[])?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(versions, "1,2");
        assert_eq!(
            children, 1,
            "the dangling row rolled back with its migration"
        );
        assert_eq!(foreign_keys, 1);
        store.close().await;
    }
}
