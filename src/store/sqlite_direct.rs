//! The SQLite statements on every request's path: reading a record, reading account state,
//! blind-index lookups, and the audit group commit. They run through rusqlite on plain
//! connections; everything else in `SqliteStore` (migrations, writes, key administration,
//! audit queries) stays on sqlx.
//!
//! Why two drivers for one backend: sqlx-sqlite runs each connection on a thread of its own
//! and ships every statement to it and every row value back from it (`sqlite3_value_dup`
//! per column, a channel message per row). Under load on two cores that machinery took
//! about half of all CPU of a `GetRecord` (BENCHMARKS.md, "Where the time goes"), and the
//! audit flush, five statements, paid a thread wake-up for each. Here a read is a handful
//! of B-tree lookups run where the request already is, and a flush is one hop to a blocking
//! thread that runs its whole transaction there.
//!
//! Concurrency: readers run on the calling task's thread. In WAL mode a reader never waits
//! for the writer, and a point lookup costs tens of microseconds, less than a hand-off to
//! another thread; a reader connection is taken from a small free list, used without any
//! `.await` and put back, so at most one connection per runtime thread is in use at a time.
//!
//! Writes of the request path (audit batches and creates) go to one writer thread that owns
//! its connection. It takes every job queued while it was busy and runs them in one
//! transaction, each under its own savepoint, so one commit (one `fsync`) makes a whole group
//! durable, and a job that fails (a duplicate document) rolls back alone. Each job's caller
//! is answered only after that commit. Shutdown: [`DirectConnections::close`] drops the
//! queue's sender; the thread finishes what is queued, closes its connection and exits, and
//! `close` waits for it. Nothing here caches data: every read starts a fresh read
//! transaction and sees every committed change, from any connection or process.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Row, Statement, ToSql};
use tokio::sync::{mpsc, oneshot};

use super::queries;
use super::{
    AccountState, CreateRequestKey, LookupMatch, NewRecord, RecordMeta, SealedField, StoreError,
    StoredRecord,
};
use crate::audit::AuditEvent;

/// How long a reader waits on a lock before failing (it only meets one while a WAL file is
/// being recovered or reset); a reader runs on a runtime thread, so it must not wait long.
const READER_BUSY_TIMEOUT: Duration = Duration::from_millis(250);
/// How long the audit writer waits for the write lock, as sqlx's writers do.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reader connections kept open for reuse; more are opened (and closed) only under bursts.
const IDLE_READERS: usize = 8;
/// Most jobs one write transaction takes.
const MAX_JOBS_PER_COMMIT: usize = 256;
/// Jobs queued beyond this make their callers wait for room.
const WRITE_QUEUE: usize = 1024;

/// What a create that was not written ran into: the caller decides what it means (a stale
/// key version to refresh, or a duplicate document that may be this request's own replay).
pub(super) type Refusal = StoreError;

enum WriteJob {
    AppendAudit {
        events: Vec<AuditEvent>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    InsertRecord {
        record: Box<NewRecord>,
        request: Option<CreateRequestKey>,
        audit: Box<AuditEvent>,
        done: oneshot::Sender<Result<Result<(), Refusal>, StoreError>>,
    },
}

/// Reader connections and the audit writer's connection to one SQLite database file.
pub(super) struct DirectConnections {
    path: PathBuf,
    idle_readers: Mutex<Vec<Connection>>,
    /// Set by `close`: later reads fail instead of opening new connections.
    closed: AtomicBool,
    /// The writer thread's queue; `None` once closed, so later writes fail.
    writes: Mutex<Option<mpsc::Sender<WriteJob>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DirectConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectConnections")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DirectConnections {
    /// Opens the writer's connection and starts its thread; readers are opened as they are
    /// first needed. The database must already exist and be migrated (sqlx created it).
    pub(super) fn open(path: &Path) -> Result<DirectConnections, StoreError> {
        let conn = open_connection(path, WRITER_BUSY_TIMEOUT)?;
        // The same durability and shredding guarantees as the sqlx connections.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let writer = std::thread::Builder::new()
            .name("pdvault-sqlite-writer".into())
            .spawn(move || run_writer(conn, queue))
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot start the writer: {error}"))
            })?;
        Ok(DirectConnections {
            path: path.to_owned(),
            idle_readers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            writes: Mutex::new(Some(writes)),
            writer: Mutex::new(Some(writer)),
        })
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let reader = open_connection(&self.path, READER_BUSY_TIMEOUT)?;
        // Belt and braces: these connections only ever read.
        reader.pragma_update(None, "query_only", "ON")?;
        Ok(reader)
    }

    /// Runs `read` on a reader connection, on this thread.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        let taken = lock(&self.idle_readers).pop();
        let reader = match taken {
            Some(reader) => reader,
            None => self.open_reader()?,
        };
        let outcome = read(&reader);
        let mut idle = lock(&self.idle_readers);
        if idle.len() < IDLE_READERS {
            idle.push(reader);
        }
        outcome
    }

    /// Closes the idle readers, lets the writer finish what is queued and waits for it to
    /// close its connection (shutdown drains the audit log before it closes the store).
    pub(super) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.idle_readers).clear();
        drop(lock(&self.writes).take());
        let writer = lock(&self.writer).take();
        if let Some(writer) = writer {
            // Joining waits for the last commit and the closing checkpoint: file I/O.
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }

    /// A live record's metadata, wrapped key, sealed fields and account state, from one
    /// statement (one snapshot).
    pub(super) fn get_record(&self, record_id: &str) -> Result<Option<StoredRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(queries::SELECT_LIVE_RECORD)?;
            bind_numbered(&mut statement, &[&record_id])?;
            let mut rows = statement.raw_query();
            let mut record: Option<StoredRecord> = None;
            while let Some(row) = rows.next()? {
                let stored = match &mut record {
                    Some(stored) => stored,
                    None => {
                        let wrapped_key: Option<Vec<u8>> = row.get("wrapped_key")?;
                        let wrapped_key = wrapped_key.ok_or_else(|| {
                            StoreError::Corrupt("live record without a wrapped key".into())
                        })?;
                        record.insert(StoredRecord {
                            meta: RecordMeta {
                                record_id: record_id.to_owned(),
                                version: row.get("version")?,
                                created_at: row.get("created_at")?,
                                updated_at: row.get("updated_at")?,
                                present_fields: Vec::new(),
                            },
                            wrapped_key,
                            fields: Vec::new(),
                            account: account_state(row)?,
                        })
                    }
                };
                let field: Option<String> = row.get("field")?;
                let ciphertext: Option<Vec<u8>> = row.get("ciphertext")?;
                if let (Some(field), Some(ciphertext)) = (field, ciphertext) {
                    stored.meta.present_fields.push(field.clone());
                    stored.fields.push(SealedField { field, ciphertext });
                }
            }
            Ok(record)
        })
    }

    /// A page of the export's keyset scan (see `Store::scan_live_records`), from one
    /// statement (one snapshot).
    pub(super) fn scan_live_records(
        &self,
        after: &str,
        created_before: i64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(queries::SCAN_LIVE_RECORDS)?;
            bind_numbered(
                &mut statement,
                &[&after, &created_before, &i64::from(limit)],
            )?;
            let mut rows = statement.raw_query();
            let mut records: Vec<StoredRecord> = Vec::new();
            while let Some(row) = rows.next()? {
                let record_id: String = row.get("record_id")?;
                if records
                    .last()
                    .is_none_or(|last| last.meta.record_id != record_id)
                {
                    let wrapped_key: Option<Vec<u8>> = row.get("wrapped_key")?;
                    let wrapped_key = wrapped_key.ok_or_else(|| {
                        StoreError::Corrupt("live record without a wrapped key".into())
                    })?;
                    records.push(StoredRecord {
                        meta: RecordMeta {
                            record_id,
                            version: row.get("version")?,
                            created_at: row.get("created_at")?,
                            updated_at: row.get("updated_at")?,
                            present_fields: Vec::new(),
                        },
                        wrapped_key,
                        fields: Vec::new(),
                        account: account_state(row)?,
                    });
                }
                let field: Option<String> = row.get("field")?;
                let ciphertext: Option<Vec<u8>> = row.get("ciphertext")?;
                if let (Some(field), Some(ciphertext), Some(record)) =
                    (field, ciphertext, records.last_mut())
                {
                    record.meta.present_fields.push(field.clone());
                    record.fields.push(SealedField { field, ciphertext });
                }
            }
            Ok(records)
        })
    }

    /// A record's account state, deleted or not; `None` when the id was never used.
    pub(super) fn account_state(
        &self,
        record_id: &str,
    ) -> Result<Option<AccountState>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(queries::SELECT_ACCOUNT_STATE)?;
            bind_numbered(&mut statement, &[&record_id])?;
            let mut rows = statement.raw_query();
            rows.next()?.map(account_state).transpose()
        })
    }

    /// Live records whose `column` holds one of `indexes`.
    pub(super) fn find_by_index(
        &self,
        column: &str,
        indexes: &[Vec<u8>],
    ) -> Result<Vec<LookupMatch>, StoreError> {
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let sql = queries::find_by_index(column, indexes.len());
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let params: Vec<&dyn ToSql> = indexes.iter().map(|index| index as &dyn ToSql).collect();
            bind_numbered(&mut statement, &params)?;
            let mut rows = statement.raw_query();
            let mut matches = Vec::new();
            while let Some(row) = rows.next()? {
                matches.push(LookupMatch {
                    record_id: row.get("record_id")?,
                    account: account_state(row)?,
                });
            }
            Ok(matches)
        })
    }

    /// Commits `events` to their chain, in the writer's next transaction.
    pub(super) async fn append_audit(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.submit(WriteJob::AppendAudit { events, done }).await?;
        committed.await.map_err(|_| writer_gone())?
    }

    /// Writes a new record, its fields, its create request and its audit event, in the
    /// writer's next transaction under a savepoint of its own. The inner `Err` is a refusal
    /// (stale key or index version, duplicate document) with nothing written.
    pub(super) async fn insert_record(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: AuditEvent,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let (done, committed) = oneshot::channel();
        self.submit(WriteJob::InsertRecord {
            record: Box::new(record),
            request,
            audit: Box::new(audit),
            done,
        })
        .await?;
        committed.await.map_err(|_| writer_gone())?
    }

    async fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        let writes = lock(&self.writes).clone().ok_or_else(writer_gone)?;
        writes.send(job).await.map_err(|_| writer_gone())
    }
}

fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the SQLite writer has stopped".into())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing guarded here is left half-changed by a panic: a list, an optional handle.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The writer thread: one transaction per group of queued jobs, until the queue closes.
fn run_writer(mut conn: Connection, mut queue: mpsc::Receiver<WriteJob>) {
    let mut jobs = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    while let Some(first) = queue.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit_group(&mut conn, &mut jobs);
    }
    // Dropping the connection closes it (and checkpoints the WAL) on this thread.
}

/// Runs `jobs` in one transaction and answers each after the commit.
fn commit_group(conn: &mut Connection, jobs: &mut Vec<WriteJob>) {
    enum Answer {
        Audit(
            oneshot::Sender<Result<(), StoreError>>,
            Result<(), StoreError>,
        ),
        Insert(
            oneshot::Sender<Result<Result<(), Refusal>, StoreError>>,
            Result<Result<(), Refusal>, StoreError>,
        ),
    }
    let mut answers = Vec::with_capacity(jobs.len());
    let committed = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for job in jobs.drain(..) {
            // A failed job rolls back to its savepoint; the others still commit.
            let mut savepoint = tx.savepoint()?;
            match job {
                WriteJob::AppendAudit { events, done } => {
                    let outcome = append_audit(&savepoint, &events);
                    if outcome.is_ok() {
                        savepoint.commit()?;
                    } else {
                        savepoint.rollback()?;
                    }
                    answers.push(Answer::Audit(done, outcome));
                }
                WriteJob::InsertRecord {
                    record,
                    request,
                    audit,
                    done,
                } => {
                    let outcome = insert_record(&savepoint, &record, request.as_ref(), &audit);
                    if matches!(outcome, Ok(Ok(()))) {
                        savepoint.commit()?;
                    } else {
                        savepoint.rollback()?;
                    }
                    answers.push(Answer::Insert(done, outcome));
                }
            }
        }
        tx.commit()
    })();
    if let Err(error) = &committed {
        tracing::error!(%error, jobs = answers.len(), "SQLite group commit failed; nothing in it was written");
    }
    let failed =
        |error: &rusqlite::Error| StoreError::Unavailable(format!("commit failed: {error}"));
    for answer in answers {
        // A caller that gave up (its call was cancelled) has nothing left to answer.
        match answer {
            Answer::Audit(done, outcome) => {
                let outcome = match &committed {
                    Ok(()) => outcome,
                    Err(error) => Err(failed(error)),
                };
                let _ = done.send(outcome);
            }
            Answer::Insert(done, outcome) => {
                let outcome = match (&committed, outcome) {
                    (Ok(()), outcome) => outcome,
                    // A refusal wrote nothing either way; it still stands.
                    (Err(_), Ok(Err(refusal))) => Ok(Err(refusal)),
                    (Err(error), _) => Err(failed(error)),
                };
                let _ = done.send(outcome);
            }
        }
    }
}

/// One create inside the group's transaction: the checks and rows of the sqlx path's
/// `insert_record` (store/shared.rs), in the same order, with the same refusals.
fn insert_record(
    conn: &Connection,
    record: &NewRecord,
    request: Option<&CreateRequestKey>,
    audit: &AuditEvent,
) -> Result<Result<(), Refusal>, StoreError> {
    // The write lock is held from BEGIN IMMEDIATE: these reads cannot go stale before commit.
    let kek_active = exists(
        conn,
        super::SqliteStore::LOCK_ACTIVE_KEK,
        &[&i64::from(record.kek_version)],
    )?;
    if !kek_active {
        return Ok(Err(StoreError::StaleKeyVersion(record.kek_version)));
    }
    if let Some(refused) = index_refusal(conn, record)? {
        return Ok(Err(refused));
    }
    let indexes = &record.indexes;
    let inserted = (|| -> Result<(), StoreError> {
        execute(
            conn,
            queries::INSERT_RECORD,
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
        )?;
        for field in &record.fields {
            execute(
                conn,
                queries::INSERT_FIELD,
                &[&record.record_id, &field.field, &field.ciphertext],
            )?;
        }
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
            )?;
        }
        append_audit(conn, std::slice::from_ref(audit))
    })();
    match inserted {
        Ok(()) => Ok(Ok(())),
        // The live-document index (or a concurrent retry's request row) already holds it.
        Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(error, _)))
            if matches!(
                error.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ) =>
        {
            Ok(Err(StoreError::DuplicateDocument))
        }
        Err(error) => Err(error),
    }
}

/// `index_writable` of the sqlx path: the write's index version is still the active one, no
/// other version is live that it did not compute for, and no other live record holds the
/// document under another live version.
fn index_refusal(conn: &Connection, record: &NewRecord) -> Result<Option<Refusal>, StoreError> {
    let indexes = &record.indexes;
    let stale = Some(StoreError::StaleIndexVersion(indexes.version));
    if !exists(
        conn,
        super::SqliteStore::LOCK_ACTIVE_INDEX,
        &[&i64::from(indexes.version)],
    )? {
        return Ok(stale);
    }
    let mut live = conn.prepare_cached(queries::SELECT_LIVE_INDEX_VERSIONS)?;
    let mut rows = live.raw_query();
    while let Some(row) = rows.next()? {
        let version: i64 = row.get(0)?;
        if u32::try_from(version).map_or(true, |v| !indexes.computed_for.contains(&v)) {
            return Ok(stale);
        }
    }
    if indexes.document.is_none() || indexes.document_elsewhere.is_empty() {
        return Ok(None);
    }
    let sql = queries::document_held_elsewhere(indexes.document_elsewhere.len());
    let mut held = conn.prepare_cached(&sql)?;
    let mut params: Vec<&dyn ToSql> = vec![&record.record_id];
    params.extend(indexes.document_elsewhere.iter().map(|i| i as &dyn ToSql));
    bind_numbered(&mut held, &params)?;
    let mut rows = held.raw_query();
    let count: i64 = match rows.next()? {
        Some(row) => row.get(0)?,
        None => 0,
    };
    Ok((count > 0).then_some(StoreError::DuplicateDocument))
}

fn exists(conn: &Connection, sql: &str, params: &[&dyn ToSql]) -> Result<bool, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    bind_numbered(&mut statement, params)?;
    Ok(statement.raw_query().next()?.is_some())
}

fn execute(conn: &Connection, sql: &str, params: &[&dyn ToSql]) -> Result<(), StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    bind_numbered(&mut statement, params)?;
    statement.raw_execute()?;
    Ok(())
}

/// Appends `events` to their chain inside the group's transaction: reserves sequence numbers
/// on the chain's head row, links each event to its predecessor, inserts them, moves the
/// head. The same steps as the sqlx path's `insert_audit_events`.
fn append_audit(conn: &Connection, events: &[AuditEvent]) -> Result<(), StoreError> {
    let Some(first) = events.first() else {
        return Ok(());
    };
    let chain_id = first.chain_id.as_str();
    debug_assert!(events.iter().all(|e| e.chain_id == chain_id));
    let (head_seq, head_hash): (i64, Vec<u8>) = {
        let mut advance = conn.prepare_cached(queries::ADVANCE_CHAIN)?;
        bind_numbered(&mut advance, &[&chain_id, &(events.len() as i64)])?;
        let mut rows = advance.raw_query();
        let row = rows.next()?.ok_or_else(|| {
            StoreError::Corrupt(format!("audit chain {chain_id} is not registered"))
        })?;
        (row.get("head_seq")?, row.get("head_hash")?)
    };
    let first_seq = head_seq - events.len() as i64 + 1;
    let mut prev_hash = head_hash;
    let mut insert = conn.prepare_cached(queries::insert_audit_events(1))?;
    for (seq, event) in (first_seq..).zip(events) {
        let hash = crate::audit::link(event, seq, &prev_hash).to_vec();
        let record_ids = super::encode_json_list(&event.record_ids);
        let released = super::encode_json_list(&event.released);
        bind_numbered(
            &mut insert,
            &[
                &event.chain_id,
                &seq,
                &event.event_id,
                &event.occurred_at,
                &event.caller,
                &event.peer,
                &event.rpc,
                &event.subject(),
                &record_ids,
                &event.purpose,
                &event.justification,
                &released,
                &i64::from(event.released_plaintext()),
                &event.outcome,
                &event.reason,
                &event.request_id,
                &event.trace_id,
                &prev_hash,
                &hash,
            ],
        )?;
        insert.raw_execute()?;
        prev_hash = hash;
        if event.record_ids.len() > 1 {
            for record_id in &event.record_ids {
                execute(
                    conn,
                    queries::INSERT_EVENT_RECORD,
                    &[record_id, &event.occurred_at, &event.chain_id, &seq],
                )?;
            }
        }
    }
    execute(conn, queries::SET_CHAIN_HASH, &[&chain_id, &prev_hash])
}

/// Binds `params` to the statement's `$1`, `$2`, ... (the placeholders the shared queries
/// use). SQLite numbers parameters in order of first appearance, which need not be `$N`'s
/// order, so each is bound by its name.
fn bind_numbered(statement: &mut Statement<'_>, params: &[&dyn ToSql]) -> Result<(), StoreError> {
    statement.clear_bindings();
    for (position, param) in params.iter().enumerate() {
        let name = format!("${}", position + 1);
        let Some(index) = statement.parameter_index(&name)? else {
            return Err(StoreError::Corrupt(format!(
                "statement has no parameter {name}"
            )));
        };
        statement.raw_bind_parameter(index, param)?;
    }
    Ok(())
}

fn account_state(row: &Row<'_>) -> Result<AccountState, StoreError> {
    let deleted_at: Option<i64> = row.get("deleted_at")?;
    let suspended_at: Option<i64> = row.get("suspended_at")?;
    let index_version: i64 = row.get("index_version")?;
    Ok(AccountState {
        deleted: deleted_at.is_some(),
        suspended: suspended_at.is_some(),
        age_gate: row.get("age_gate")?,
        index_version: u32::try_from(index_version)
            .map_err(|_| StoreError::Corrupt(format!("index version {index_version}")))?,
        policy_version: row.get("policy_version")?,
        active_consents: row.get("active_consents")?,
    })
}
