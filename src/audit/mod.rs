//! The audit trail: every decision and change, durably recorded before anything leaves,
//! tamper-evident, and queryable for breach notices and disclosure accounting.
//!
//! [`AuditLog`] is the front door. Reads hand it their event and wait; one writer task per
//! process owns the channel and group-commits whatever has queued up while the previous
//! flush ran (many events, one transaction, one fsync), then releases every waiter of that
//! batch with the batch's outcome. Durability therefore costs one flush per batch, not per
//! request, and a request is answered only after its own event is on disk.
//!
//! Writes (create, update, delete) put their event in the same transaction as the change
//! instead (see `Store::insert_record`), so a change and its event commit or fail together.
//! Both paths link events into this process's chain through the chain's head row in the
//! database, never through memory, so they interleave safely.
//!
//! One caller's event can never fail another's: when the store refuses a batch because of
//! the data in it (a value the database cannot hold, a broken constraint), the writer splits
//! the batch and appends the halves on their own, down to single events, so only the
//! events the store itself refuses fail ([`append_isolating`]). A batch that fails because
//! the database is unreachable fails as a whole, at once: splitting it would only multiply
//! the waits. The edge checks every string before it can reach an event
//! (`crate::domain::edge`); this is the second wall.
//!
//! Shutdown: [`AuditLog::close`] (or dropping every handle) stops new events from entering;
//! the writer flushes what is already queued and exits, and the join handle
//! [`AuditLog::start`] returned resolves after that last flush. Events offered after close
//! fail with [`AuditError::Stopped`], so a late call releases nothing.
//!
//! Tamper evidence lives beside the writer: `chain` (hashing and the pure verifier),
//! `signer` (each instance's chained checkpoints, signed only after the database is checked
//! against what it signed before), `witness` (the copy of every checkpoint kept outside the
//! database) and `checkpoint` (verification with the public key alone, and retention).

mod checkpoint;
mod signer;
mod witness;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use crate::domain::audit_chain::{
    AuditEvent, ChainHead, ChainVerifier, Checkpoint, CheckpointLink, ExpiryMarker, Problem,
    StoredEvent, checkpoint_genesis, genesis, link,
};
pub use checkpoint::{VerifyReport, expire, verify, verify_with, write_checkpoint};
pub use signer::{CheckpointError, CheckpointSigner, Refusal, SignerHealth};
pub use witness::{CheckpointSink, Witness};

use crate::domain::ids::ChainId;
use crate::store::{Store, StoreError};

/// How many events one group commit takes at most.
const MAX_BATCH: usize = 1024;
/// Queued events beyond this make callers wait for room (backpressure, not unbounded memory).
const QUEUE_CAPACITY: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store refused or could not take the batch; every event of it shares the cause.
    #[error("audit store unavailable: {0}")]
    Unavailable(#[source] Arc<StoreError>),
    #[error("audit writer has stopped")]
    Stopped,
}

/// Counters of the group commit, for logs and benchmarks (metrics get the same figures).
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    events: AtomicU64,
    largest: AtomicU64,
    flush_micros: AtomicU64,
}

impl BatchStats {
    fn record(&self, size: usize, flush: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(size as u64, Ordering::Relaxed);
        self.largest.fetch_max(size as u64, Ordering::Relaxed);
        self.flush_micros
            .fetch_add(flush.as_micros() as u64, Ordering::Relaxed);
    }

    /// (batches, events, largest batch, total flush time in µs) so far.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
            self.largest.load(Ordering::Relaxed),
            self.flush_micros.load(Ordering::Relaxed),
        )
    }
}

/// Events handed in together (one call's, or one batch call's) and their waiter, answered
/// with one outcome per event. A job's events always share one group commit.
struct Job {
    events: Vec<AuditEvent>,
    done: oneshot::Sender<Vec<Result<(), AuditError>>>,
}

/// Handle to this process's audit chains and its group-commit writer.
///
/// Which chain an event joins is decided where it is appended: the writer's flushes append
/// to the process's own chain ([`AuditLog::chain_id`]: every event handed to
/// [`AuditLog::record_all`] is put on it), a write's transaction to one of the write chains
/// ([`AuditLog::write_chain`], drawn in turn). More than one only where the store asks for
/// it (`Store::write_chains`); with one, both are the process's own.
#[derive(Clone)]
pub struct AuditLog {
    chain_id: ChainId,
    write_chains: Arc<[ChainId]>,
    next_write: Arc<std::sync::atomic::AtomicUsize>,
    jobs: mpsc::Sender<Job>,
    stats: Arc<BatchStats>,
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AuditLog {
    /// Registers a fresh chain for this process and starts its writer, whose task ends
    /// after the last handle is dropped and the queue is flushed.
    pub async fn start(
        store: Arc<dyn Store>,
        now_micros: i64,
    ) -> Result<(AuditLog, tokio::task::JoinHandle<()>), StoreError> {
        AuditLog::start_in(store, now_micros, &crate::tasks::Tasks::new()).await
    }

    /// As [`AuditLog::start`], the writer a task of `tasks` (the server's infrastructure
    /// group): it ignores the group's token, since it must outlive every task that audits,
    /// and stops only once [`AuditLog::close`] was called and the queue is flushed.
    pub async fn start_in(
        store: Arc<dyn Store>,
        now_micros: i64,
        tasks: &crate::tasks::Tasks,
    ) -> Result<(AuditLog, tokio::task::JoinHandle<()>), StoreError> {
        let count = store.write_chains().max(1);
        let mut write_chains = Vec::with_capacity(count);
        for _ in 0..count {
            let chain_id = ChainId::generate();
            store
                .register_chain(&chain_id, now_micros, &genesis(chain_id.as_str()))
                .await?;
            write_chains.push(chain_id);
        }
        let chain_id = write_chains[0].clone();
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        let stats = Arc::new(BatchStats::default());
        let (closing, closed) = tokio::sync::watch::channel(false);
        let writer = tasks.spawn(run_writer(store, queue, closed, Arc::clone(&stats)));
        tracing::info!(
            chain_id = chain_id.as_str(),
            write_chains = write_chains.len(),
            "audit chain started"
        );
        Ok((
            AuditLog {
                chain_id,
                write_chains: write_chains.into(),
                next_write: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                jobs,
                stats,
                closing: Arc::new(closing),
            },
            writer,
        ))
    }

    pub fn chain_id(&self) -> &ChainId {
        &self.chain_id
    }

    /// Every chain this process appends to, its own first.
    pub fn chains(&self) -> &[ChainId] {
        &self.write_chains
    }

    /// The chain for the next write's event, in turn over [`AuditLog::chains`] after the
    /// process's own (which the writer's flushes hold) when there are others.
    pub fn write_chain(&self) -> &ChainId {
        let pool = match self.write_chains.split_first() {
            Some((_, others)) if !others.is_empty() => others,
            _ => &self.write_chains[..],
        };
        let next = self
            .next_write
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &pool[next % pool.len()]
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Stops accepting events; what is queued is still flushed.
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// The counters, kept readable after every handle (and so the writer) is gone.
    pub fn shared_stats(&self) -> Arc<BatchStats> {
        Arc::clone(&self.stats)
    }

    /// Returns once `event` is committed to durable storage, or why it could not be.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.record_all(vec![event])
            .await
            .pop()
            .unwrap_or(Err(AuditError::Stopped))
    }

    /// Returns once every one of `events` is committed, or why it could not be, one outcome
    /// per event in order. The events go to the writer as one job, so they share one group
    /// commit (a batch call's releases pay for one flush, not one each).
    pub async fn record_all(&self, mut events: Vec<AuditEvent>) -> Vec<Result<(), AuditError>> {
        let count = events.len();
        // The writer flushes to the process's own chain, whichever chain an event was
        // drawn for (it is linked, so bound to its chain, only when appended).
        for event in &mut events {
            if event.chain_id != self.chain_id.as_str() {
                event.chain_id = self.chain_id.to_string();
            }
        }
        let stopped = || (0..count).map(|_| Err(AuditError::Stopped)).collect();
        if count == 0 {
            return Vec::new();
        }
        let (done, committed) = oneshot::channel();
        if self.jobs.send(Job { events, done }).await.is_err() {
            return stopped();
        }
        committed.await.unwrap_or_else(|_| stopped())
    }
}

async fn run_writer(
    store: Arc<dyn Store>,
    mut queue: mpsc::Receiver<Job>,
    mut closed: tokio::sync::watch::Receiver<bool>,
    stats: Arc<BatchStats>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let closing = tokio::select! {
            received = queue.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                false
            }
            _ = closed.wait_for(|closed| *closed) => true,
        };
        if closing {
            // Nothing new gets in; what is already queued is still taken.
            queue.close();
            if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            waiters.push((job.done, job.events.len()));
            events.extend(job.events);
        }
        let started = Instant::now();
        let outcomes = append_isolating(store.as_ref(), &events).await;
        let flush = started.elapsed();
        stats.record(events.len(), flush);
        crate::telemetry::metrics::record_audit_batch(events.len());
        crate::telemetry::metrics::record_audit_flush(flush);
        tracing::debug!(
            batch = events.len(),
            flush_us = flush.as_micros() as u64,
            "audit group commit"
        );
        let failed = outcomes.iter().filter(|outcome| outcome.is_err()).count();
        if failed > 0 {
            tracing::error!(
                failed,
                batch = events.len(),
                "audit events failed; nothing they record is released"
            );
        }
        let mut outcomes = outcomes.into_iter();
        for (waiter, count) in waiters {
            // A waiter that gave up (its call was cancelled) has nothing left to release.
            let _ = waiter.send(outcomes.by_ref().take(count).collect());
        }
    }
    let (batches, events, largest, _) = stats.snapshot();
    tracing::info!(batches, events, largest, "audit writer drained and stopped");
}

/// Appends `events` in one transaction; if the store refuses the batch's data, appends each
/// half on its own, recursively, so that only the events the store itself refuses fail.
/// Returns one outcome per event, in order. With `p` refused events in a batch of `n`, this
/// costs about `2p·log2(n)` extra transactions, and nothing when no event is refused.
pub async fn append_isolating(
    store: &dyn Store,
    events: &[AuditEvent],
) -> Vec<Result<(), AuditError>> {
    match store.append_audit(events).await {
        Ok(()) => events.iter().map(|_| Ok(())).collect(),
        Err(error) if events.len() > 1 && error.is_refused_data() => {
            let (left, right) = events.split_at(events.len() / 2);
            let mut outcomes = Box::pin(append_isolating(store, left)).await;
            outcomes.extend(Box::pin(append_isolating(store, right)).await);
            outcomes
        }
        Err(error) => {
            if error.is_refused_data() {
                tracing::error!(%error, event_id = %events[0].event_id, "the store refused an audit event");
            }
            let error = Arc::new(error);
            events
                .iter()
                .map(|_| Err(AuditError::Unavailable(Arc::clone(&error))))
                .collect()
        }
    }
}
