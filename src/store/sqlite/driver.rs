//! The threads a SQLite database is used from: ONE writer thread that runs every write, and
//! a few reader threads that run every read. No rusqlite statement runs anywhere else, and
//! never on a tokio worker thread (`statement` asserts it in debug builds, which the test
//! suite runs).
//!
//! Why one writer: SQLite has one write lock per file. Two writers (a thread and a pool, as
//! before) meet only at that lock, so a long batch on one stalls the other's commits with
//! nothing to say which goes first. Here every write is a job on one queue. The writer takes
//! every job queued while it was busy and runs them in one transaction, each under its own
//! SAVEPOINT (a job that fails rolls back alone), then commits once (`synchronous = FULL`:
//! one `fsync` for the group); each job's caller is answered only after that commit.
//! Nothing else opens a write transaction on the file. Key administration needs a
//! transaction that spans calls to the key provider: [`Writer::begin`] hands out a
//! [`WriteTx`] that holds the writer (and so the write lock) until it commits or is
//! dropped (rolled back); the writer waits at most [`TX_IDLE_LIMIT`] for its next step.
//!
//! Why reader threads: a read is a few B-tree lookups, but it blocks its thread (on the disk,
//! or on a lock while a WAL file is recovered), and a blocked tokio worker stalls every task
//! queued behind it. The readers block on one shared queue; a read is handed to whichever
//! reader is free and answered through a tokio oneshot, so the hand-off costs a futex wake
//! each way. Each reader keeps its own connection and statement cache. In WAL mode a reader
//! never waits for the writer, and nothing is cached between reads: every read sees every
//! committed write, from any connection or process.
//!
//! Shutdown: [`Driver::close`] stops the readers and drops the writer's queue; the writer
//! finishes what is queued, closes its connection (checkpointing the WAL) and exits, and
//! `close` waits for every thread. Dropping the driver without closing stops the threads
//! the same way, without waiting.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, OpenFlags, Row, ToSql};
use tokio::sync::{mpsc, oneshot};

use crate::store::StoreError;

/// How long the writer waits for the write lock another process holds.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reader waits on a lock (it meets one only while a WAL file is recovered).
const READER_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The writer's page cache, in KiB (`PRAGMA cache_size` takes KiB as a negative number).
const WRITER_CACHE_KIB: i64 = -16 * 1024;
/// Most jobs one group transaction takes.
const MAX_JOBS_PER_COMMIT: usize = 256;
/// Jobs queued beyond this make their callers wait for room.
const WRITE_QUEUE: usize = 1024;
/// How long a [`WriteTx`] may leave the writer waiting for its next step before the writer
/// rolls it back and serves the other jobs (a stuck key provider must not stop all writes).
pub(super) const TX_IDLE_LIMIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Set on the writer and reader threads, and nowhere else.
    static STORE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// A prepared (cached) statement; every statement the store runs is prepared here, on one
/// of the store's own threads.
pub(super) fn statement<'c>(
    conn: &'c Connection,
    sql: &str,
) -> Result<CachedStatement<'c>, StoreError> {
    debug_assert!(
        STORE_THREAD.with(Cell::get) && tokio::runtime::Handle::try_current().is_err(),
        "a SQLite statement outside the store's threads"
    );
    Ok(conn.prepare_cached(sql)?)
}

/// Binds `params` to the statement's `$1`, `$2`, ... (the placeholders the shared queries
/// use). SQLite numbers parameters in order of first appearance, which need not be `$N`'s
/// order: index N is used when SQLite names it `$N` (most statements), and otherwise the
/// parameter is looked up by name. Looking every parameter up by name (a formatted name, a
/// C string and a scan each) was a tenth of the writer's time in a batch create.
fn bind(statement: &mut CachedStatement<'_>, params: &[&dyn ToSql]) -> Result<(), StoreError> {
    statement.clear_bindings();
    for (position, param) in params.iter().enumerate() {
        let number = position + 1;
        let in_order = statement
            .parameter_name(number)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|digits| digits.parse::<usize>().ok())
            == Some(number);
        let index = if in_order {
            number
        } else {
            let name = format!("${number}");
            statement
                .parameter_index(&name)?
                .ok_or_else(|| StoreError::Corrupt(format!("statement has no parameter {name}")))?
        };
        statement.raw_bind_parameter(index, param)?;
    }
    Ok(())
}

/// Runs a statement that returns no rows; the number of rows it changed.
pub(super) fn execute(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
) -> Result<u64, StoreError> {
    let mut statement = statement(conn, sql)?;
    bind(&mut statement, params)?;
    Ok(statement.raw_execute()? as u64)
}

/// Every row of a query, each decoded by `decode`.
pub(super) fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
    mut decode: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut statement = statement(conn, sql)?;
    bind(&mut statement, params)?;
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The first row of a query, if any.
pub(super) fn first<T>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
    decode: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut statement = statement(conn, sql)?;
    bind(&mut statement, params)?;
    let mut rows = statement.raw_query();
    rows.next()?.map(decode).transpose()
}

/// The first column of the first row, which the query always returns (a count).
pub(super) fn scalar<T: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
    params: &[&dyn ToSql],
) -> Result<T, StoreError> {
    first(conn, sql, params, |row| Ok(row.get(0)?))?
        .ok_or_else(|| StoreError::Corrupt("a scalar query returned no row".into()))
}

/// How a connection is opened: the writer's (read-write, WAL, durable commits) or a reader's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    ReadWrite,
    /// `pdvault audit verify`: the file is opened read-only, and there is no writer.
    ReadOnly,
}

fn open_connection(path: &Path, access: Access, writer: bool) -> Result<Connection, StoreError> {
    let flags = match access {
        Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE,
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    if writer {
        conn.busy_timeout(WRITER_BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Every commit, audit events included, is durable before its callers are answered.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A deleted record's wrapped key must not linger in free pages, where the live KEK
        // could still open it: overwrite freed content with zeros.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Savepoint journals stay in memory instead of spilling to temporary files: a group
        // of jobs is bounded (`MAX_JOBS_PER_COMMIT`), and the files were about 40 % of the
        // bytes written per audit event.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // A group commit of batch creates dirties thousands of pages (a random leaf of each
        // blind index per record); with the default 2 MiB cache the writer spilled pages to
        // the WAL mid-transaction and read them back (an eighth of its time, BENCHMARKS.md).
        // Negative: KiB. The memory is taken only as pages are used.
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    } else {
        conn.busy_timeout(READER_BUSY_TIMEOUT)?;
        // Belt and braces: these connections only ever read.
        conn.pragma_update(None, "query_only", "ON")?;
    }
    Ok(conn)
}

/// The writer and the readers of one database file.
pub(super) struct Driver {
    path: PathBuf,
    writer: Option<Writer>,
    readers: Readers,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .field("writer", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Opens the writer's connection (none when read-only) and `readers` reader connections,
    /// each on its thread.
    pub(super) fn open(path: &Path, access: Access, readers: usize) -> Result<Driver, StoreError> {
        let writer = match access {
            Access::ReadWrite => Some(Writer::start(open_connection(path, access, true)?)?),
            Access::ReadOnly => None,
        };
        let readers = Readers::start(path, access, readers.max(1))?;
        Ok(Driver {
            path: path.to_owned(),
            writer,
            readers,
        })
    }

    /// Runs `read` on a reader thread.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.readers.run(read).await
    }

    /// Runs `write` on the writer thread, in its next group transaction under a savepoint
    /// of its own: kept if it returns `Ok`, rolled back alone if it returns `Err`. Answers
    /// after the group's commit.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer()?.write(write).await
    }

    /// Runs `work` on the writer thread with the connection to itself (no group, no
    /// transaction opened for it): migrations, which manage their own transactions.
    pub(super) async fn exclusive<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer()?.exclusive(work).await
    }

    /// A write transaction that spans several steps (see [`WriteTx`]).
    pub(super) async fn begin(&self) -> Result<WriteTx, StoreError> {
        self.writer()?.begin().await
    }

    fn writer(&self) -> Result<&Writer, StoreError> {
        self.writer
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the database is open read-only".into()))
    }

    /// Stops the readers, lets the writer finish what is queued, and waits for every thread
    /// to close its connection (shutdown drains the audit log before it closes the store).
    pub(super) async fn close(&self) {
        let mut threads = self.readers.stop();
        if let Some(writer) = &self.writer {
            threads.extend(writer.stop());
        }
        if threads.is_empty() {
            return;
        }
        // Joining waits for the last commit and the closing checkpoint: file I/O.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Threads are told to stop, not waited for: this may run on a runtime thread.
        self.readers.stop();
        if let Some(writer) = &self.writer {
            writer.stop();
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing guarded here is left half-changed by a panic: a queue handle, thread handles.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn spawn(name: &str, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            STORE_THREAD.with(|flag| flag.set(true));
            run();
        })
        .map_err(StoreError::Thread)
}

/// A job's panic is its own failure, not the thread's: the thread serves the next job.
fn caught<T>(work: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(StoreError::Unavailable("a database job panicked".into())))
}

// ---------------------------------------------------------------------------------------
// Readers

enum ReadJob {
    Run(Box<dyn FnOnce(&Connection) + Send>),
    Stop,
}

struct Readers {
    queue: crossbeam_channel::Sender<ReadJob>,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Readers {
    fn start(path: &Path, access: Access, count: usize) -> Result<Readers, StoreError> {
        let (queue, jobs) = crossbeam_channel::unbounded::<ReadJob>();
        let mut threads = Vec::with_capacity(count);
        for n in 0..count {
            // Opened here, so a file that cannot be opened fails the store's open.
            let conn = open_connection(path, access, false)?;
            let jobs = jobs.clone();
            threads.push(spawn(&format!("pdvault-sqlite-reader-{n}"), move || {
                while let Ok(ReadJob::Run(job)) = jobs.recv() {
                    job(&conn);
                }
            })?);
        }
        Ok(Readers {
            queue,
            closed: AtomicBool::new(false),
            threads: Mutex::new(threads),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let (done, answer) = oneshot::channel();
        let job = Box::new(move |conn: &Connection| {
            // A caller that gave up (its call was cancelled) has nothing left to answer.
            let _ = done.send(caught(|| read(conn)));
        });
        self.queue.send(ReadJob::Run(job)).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    fn stop(&self) -> Vec<JoinHandle<()>> {
        self.closed.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for _ in &threads {
            let _ = self.queue.send(ReadJob::Stop);
        }
        threads
    }
}

// ---------------------------------------------------------------------------------------
// The writer

/// A write of a group: run in the group's transaction, answered after its commit.
trait GroupJob: Send {
    /// Runs the job; `true` when its changes are to be kept.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the group's commit is known (`Err`: it failed).
    fn answer(self: Box<Self>, commit: Result<(), &Arc<StoreError>>);
}

struct Pending<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    done: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> GroupJob for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = match self.work.take() {
            Some(work) => caught(|| work(conn)),
            None => Err(StoreError::Unavailable("a write job ran twice".into())),
        };
        let keep = outcome.is_ok();
        self.outcome = Some(outcome);
        keep
    }

    fn answer(self: Box<Self>, commit: Result<(), &Arc<StoreError>>) {
        let outcome = self
            .outcome
            .unwrap_or_else(|| Err(StoreError::Unavailable("the write job did not run".into())));
        let outcome = match (commit, outcome) {
            (Ok(()), outcome) => outcome,
            // The job's own failure rolled back to its savepoint: it stands whatever the
            // commit did (a refusal wrote nothing either way).
            (Err(_), Err(refused)) => Err(refused),
            (Err(error), Ok(_)) => Err(StoreError::CommitFailed(Arc::clone(error))),
        };
        // A caller that gave up (its call was cancelled) has nothing left to answer.
        let _ = self.done.send(outcome);
    }
}

enum WriteJob {
    Group(Box<dyn GroupJob>),
    /// Runs with the connection to itself, between two groups.
    Exclusive(Box<dyn FnOnce(&mut Connection) + Send>),
}

struct Writer {
    queue: Mutex<Option<mpsc::Sender<WriteJob>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    fn start(conn: Connection) -> Result<Writer, StoreError> {
        let (queue, jobs) = mpsc::channel(WRITE_QUEUE);
        let thread = spawn("pdvault-sqlite-writer", move || run_writer(conn, jobs))?;
        Ok(Writer {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
        })
    }

    async fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        let queue = lock(&self.queue).clone().ok_or_else(writer_gone)?;
        queue.send(job).await.map_err(|_| writer_gone())
    }

    async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Pending {
            work: Some(write),
            outcome: None,
            done,
        };
        self.submit(WriteJob::Group(Box::new(job))).await?;
        answer.await.map_err(|_| writer_gone())?
    }

    async fn exclusive<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, answer) = oneshot::channel();
        let job = Box::new(move |conn: &mut Connection| {
            let _ = done.send(caught(|| work(conn)));
        });
        self.submit(WriteJob::Exclusive(job)).await?;
        answer.await.map_err(|_| writer_gone())?
    }

    async fn begin(&self) -> Result<WriteTx, StoreError> {
        let (steps, inbox) = std::sync::mpsc::channel::<TxStep>();
        let (ready, began) = oneshot::channel();
        let job = Box::new(move |conn: &mut Connection| serve_tx(conn, ready, inbox));
        self.submit(WriteJob::Exclusive(job)).await?;
        began.await.map_err(|_| writer_gone())??;
        Ok(WriteTx { steps })
    }

    fn stop(&self) -> Option<JoinHandle<()>> {
        // The writer drains what is queued, then sees the queue closed and exits.
        drop(lock(&self.queue).take());
        lock(&self.thread).take()
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the SQLite writer has stopped".into())
}

/// The writer thread: one transaction per group of queued jobs, until the queue closes.
fn run_writer(mut conn: Connection, mut queue: mpsc::Receiver<WriteJob>) {
    let mut group: Vec<Box<dyn GroupJob>> = Vec::with_capacity(MAX_JOBS_PER_COMMIT);
    let mut next = queue.blocking_recv();
    while let Some(job) = next.take() {
        match job {
            WriteJob::Exclusive(work) => work(&mut conn),
            WriteJob::Group(first) => {
                group.push(first);
                // Everything queued meanwhile joins the group, up to an exclusive job, which
                // runs after the group's commit.
                while group.len() < MAX_JOBS_PER_COMMIT {
                    match queue.try_recv() {
                        Ok(WriteJob::Group(job)) => group.push(job),
                        Ok(exclusive) => {
                            next = Some(exclusive);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut conn, &mut group);
            }
        }
        if next.is_none() {
            next = queue.blocking_recv();
        }
    }
    // Dropping the connection closes it (and checkpoints the WAL) on this thread.
}

/// Runs `group` in one transaction, each job under its own savepoint, and answers each after
/// the commit. A job alone in its group runs without one: the transaction is its savepoint
/// (a savepoint makes SQLite copy every page the job touches into the sub-journal first,
/// and when the queue is short, as at a paced load, most groups are one job).
fn commit_group(conn: &mut Connection, group: &mut Vec<Box<dyn GroupJob>>) {
    let mut ran: Vec<Box<dyn GroupJob>> = Vec::with_capacity(group.len());
    let committed = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if group.len() == 1
            && let Some(mut job) = group.pop()
        {
            let keep = job.run(&tx);
            ran.push(job);
            return if keep { tx.commit() } else { tx.rollback() };
        }
        for mut job in group.drain(..) {
            let mut savepoint = tx.savepoint()?;
            let keep = job.run(&savepoint);
            ran.push(job);
            if keep {
                savepoint.commit()?;
            } else {
                savepoint.rollback()?;
            }
        }
        tx.commit()
    })()
    .map_err(|error| Arc::new(StoreError::from(error)));
    if let Err(error) = &committed {
        tracing::error!(%error, jobs = ran.len() + group.len(), "SQLite group commit failed; nothing in it was written");
    }
    for job in ran.into_iter().chain(group.drain(..)) {
        job.answer(committed.as_ref().map(|_| ()));
    }
}

// ---------------------------------------------------------------------------------------
// Transactions that span several steps

type TxStep =
    Box<dyn FnOnce(&Connection) -> Option<oneshot::Sender<Result<(), StoreError>>> + Send>;

/// A write transaction held open on the writer thread across several steps (key
/// administration, whose steps call the key provider in between). Each [`WriteTx::run`] is
/// one step on the writer thread; [`WriteTx::commit`] ends it. Dropped without a commit, it
/// rolls back. While it is open every other write waits, as it would for SQLite's write
/// lock, and the writer waits at most [`TX_IDLE_LIMIT`] for each next step.
pub(super) struct WriteTx {
    steps: std::sync::mpsc::Sender<TxStep>,
}

impl WriteTx {
    /// Runs `step` inside the transaction, on the writer thread.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        step: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, answer) = oneshot::channel();
        let step: TxStep = Box::new(move |conn: &Connection| {
            let _ = done.send(caught(|| step(conn)));
            None
        });
        self.steps.send(step).map_err(|_| tx_gone())?;
        answer.await.map_err(|_| tx_gone())?
    }

    /// Commits the transaction; its changes are durable when this returns `Ok`.
    pub(super) async fn commit(self) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        let step: TxStep = Box::new(move |_: &Connection| Some(done));
        self.steps.send(step).map_err(|_| tx_gone())?;
        answer.await.map_err(|_| tx_gone())?
    }
}

fn tx_gone() -> StoreError {
    StoreError::Unavailable("the write transaction ended (rolled back)".into())
}

/// The writer's side of a [`WriteTx`]: begins, runs its steps as they come, commits on the
/// commit step, rolls back when the handle is dropped or goes quiet for too long.
fn serve_tx(
    conn: &mut Connection,
    ready: oneshot::Sender<Result<(), StoreError>>,
    steps: std::sync::mpsc::Receiver<TxStep>,
) {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(error) => {
            let _ = ready.send(Err(error.into()));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    loop {
        let Ok(step) = steps.recv_timeout(TX_IDLE_LIMIT) else {
            // Dropped, or gone quiet: the transaction rolls back as `tx` drops.
            return;
        };
        if let Some(done) = step(&tx) {
            let _ = done.send(tx.commit().map_err(StoreError::from));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `$N` is bound to the N-th parameter whatever order the placeholders first appear in,
    /// on the fast path (in order) and on the lookup by name (out of order).
    #[test]
    fn parameters_bind_by_their_number() -> Result<(), StoreError> {
        STORE_THREAD.with(|flag| flag.set(true));
        let conn = Connection::open_in_memory()?;
        let in_order: i64 = scalar(&conn, "SELECT $1 * 100 + $2", &[&1_i64, &2_i64])?;
        assert_eq!(in_order, 102);
        let reversed: i64 = scalar(&conn, "SELECT $2 * 100 + $1", &[&1_i64, &2_i64])?;
        assert_eq!(reversed, 201);
        let repeated: i64 = scalar(
            &conn,
            "SELECT $3 * 100 + $1 * 10 + $2 + $3",
            &[&1_i64, &2_i64, &3_i64],
        )?;
        assert_eq!(repeated, 315);
        let missing = scalar::<i64>(&conn, "SELECT $1", &[&1_i64, &2_i64]);
        assert!(
            matches!(missing, Err(StoreError::Corrupt(_))),
            "{missing:?}"
        );
        Ok(())
    }

    /// A writer and one reader on a new file in a directory of its own (kept while the
    /// returned guard lives).
    fn temp_driver() -> Result<(tempfile::TempDir, Driver), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let path = dir.path().join("t.db");
        drop(Connection::open(&path)?);
        let driver = Driver::open(&path, Access::ReadWrite, 1)?;
        Ok((dir, driver))
    }

    /// A job alone in its group runs without a savepoint: when it fails after writing, the
    /// group's transaction rolls back, so nothing of it stays; a job after it is kept.
    #[tokio::test]
    async fn a_lone_job_that_fails_after_writing_leaves_nothing() -> Result<(), StoreError> {
        let (_dir, driver) = temp_driver()?;
        driver
            .write(|conn| execute(conn, "CREATE TABLE t (v INTEGER NOT NULL)", &[]))
            .await?;
        let failed = driver
            .write(|conn| {
                execute(conn, "INSERT INTO t (v) VALUES (1)", &[])?;
                Err::<(), _>(StoreError::VersionConflict)
            })
            .await;
        assert!(
            matches!(failed, Err(StoreError::VersionConflict)),
            "{failed:?}"
        );
        driver
            .write(|conn| execute(conn, "INSERT INTO t (v) VALUES (2)", &[]))
            .await?;
        let kept: i64 = driver
            .read(|conn| scalar(conn, "SELECT SUM(v) FROM t", &[]))
            .await?;
        assert_eq!(kept, 2);
        driver.close().await;
        Ok(())
    }

    /// What `queries::INSERT_RECORD_OR_FAIL` relies on: SQLite checks every uniqueness
    /// constraint before writing any B-tree, so a row refused under FAIL (no statement
    /// journal) leaves no entry in the table or in any of its indexes.
    #[tokio::test]
    async fn a_record_row_refused_under_fail_writes_no_index_entry() -> Result<(), StoreError> {
        let (_dir, driver) = temp_driver()?;
        driver.exclusive(super::super::migrate::run).await?;
        let insert = |id: &'static str, document: u8, phone: u8| {
            driver.write(move |conn| {
                execute(
                    conn,
                    crate::store::queries::INSERT_RECORD_OR_FAIL,
                    &[
                        &id,
                        &1_i64,
                        &vec![9_u8; 8],
                        &1_i64,
                        &vec![document; 32],
                        &vec![phone; 32],
                        &Option::<Vec<u8>>::None,
                        &Option::<String>::None,
                        &Some(5_i64),
                        &1_i64,
                    ],
                )
            })
        };
        insert("rec_aaaaaaaaaaaaaaaaaaaaaaaaaa", 1, 1).await?;
        // The same document: refused by the last unique index SQLite checks, after the
        // primary key's, with a new phone and a deadline for every other index.
        let refused = insert("rec_bbbbbbbbbbbbbbbbbbbbbbbbbb", 1, 2).await;
        assert!(refused.is_err(), "{refused:?}");
        insert("rec_cccccccccccccccccccccccccc", 3, 3).await?;
        let check: String = driver
            .read(|conn| scalar(conn, "PRAGMA integrity_check", &[]))
            .await?;
        assert_eq!(check, "ok");
        for sql in [
            "SELECT COUNT(*) FROM records",
            "SELECT COUNT(*) FROM records INDEXED BY records_phone_index \
             WHERE phone_index IS NOT NULL",
            "SELECT COUNT(*) FROM records INDEXED BY records_retain_until \
             WHERE deleted_at IS NULL AND retain_until IS NOT NULL AND retain_until > 0",
        ] {
            let rows: i64 = driver.read(move |conn| scalar(conn, sql, &[])).await?;
            assert_eq!(rows, 2, "{sql}");
        }
        driver.close().await;
        Ok(())
    }
}
