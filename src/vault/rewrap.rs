//! The rewrap job: moves every data key still wrapped under an older KEK version to the
//! active one, without decrypting any field; then, in a second pass, re-computes the blind
//! indexes (and re-seals the age gate) of every record still under an older index version
//! with the active index keys. That pass does decrypt the identity fields indexes are made
//! from, inside the vault only ([`crate::vault::reindex`]).
//!
//! Progress lives in the database, not here: a record needs rewrapping exactly when its
//! `kek_version` is older than the active one (re-indexing, when its `index_version` is),
//! and each batch changes those rows and the job's counters in one transaction. A job killed at any point therefore loses at most
//! the batch in flight, and running the job again finishes the rest. Two jobs at once are
//! safe: on PostgreSQL each batch skips rows another job holds (`FOR UPDATE SKIP LOCKED`),
//! on SQLite the single writer serialises batches, and every update is a compare-and-swap
//! (on the wrapped key; for re-indexing, on the record's version and index version), so no
//! record is rewrapped or re-indexed from a stale read. Memory is one batch,
//! whatever the record count: batches walk the records in id order (keyset pagination).
//!
//! A job's row names its owner (instance and process, [`JobOwner`]) and a lease the job
//! renews every [`LEASE_RENEWAL`] while it runs. A job whose server died cannot say so:
//! instead every instance, at start and every [`ABANDONED_SWEEP`], marks INTERRUPTED each
//! RUNNING job whose lease ran out or whose instance has restarted since (the same instance
//! now runs as another process), and `GetKeyStatus` does the same before it answers. Leases
//! are wall-clock times: instances sharing a database need clocks within [`LEASE`] of each
//! other (NTP keeps them far closer).
//!
//! A server shutting down cancels the job ([`crate::tasks`]): it is never dropped mid-batch;
//! it stops before its next batch, marks its row INTERRUPTED (as the sweep would mark a dead
//! server's) and ends with [`RewrapError::Interrupted`], so `pdvault keys rewrap` on any
//! instance resumes it from what the records say.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::ids::{JobId, RecordId};
use crate::keys::{KeyError, KeyManager};
use crate::store::{JobOwner, Micros, RewrapBatch, Store, StoreError};
use crate::vault::Vault;

/// How long a job's owner is believed alive without renewing.
pub const LEASE: Duration = Duration::from_secs(60);
/// How often a running job renews its lease: well inside [`LEASE`], so a slow database
/// round trip or two does not get a live job declared dead.
pub const LEASE_RENEWAL: Duration = Duration::from_secs(15);
/// How often a serving instance looks for jobs whose owner is gone.
pub const ABANDONED_SWEEP: Duration = Duration::from_secs(30);

/// Largest batch a caller may ask for; bounds memory and transaction length.
pub const MAX_BATCH_SIZE: u32 = 5_000;
pub const DEFAULT_BATCH_SIZE: u32 = 500;
/// How long a pass that found only rows held by others waits before looking again, and how
/// many times: a job that outlives a concurrent one by this much reports `Stalled`.
const LOCKED_ROWS_PAUSE: Duration = Duration::from_millis(20);
const LOCKED_ROWS_RETRIES: u32 = 3_000;

#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Some data keys could not be unwrapped (or records re-indexed); they are left as
    /// they were.
    #[error(
        "{failed} records could not be rewrapped or re-indexed; {remaining} remain under older versions"
    )]
    Failed { failed: u64, remaining: i64 },
    /// Rows stayed locked by other transactions for the whole retry budget.
    #[error("{remaining} records stayed locked by other transactions")]
    Stalled { remaining: i64 },
    /// Whoever asked for progress went away; the job stops after its current batch.
    #[error("the rewrap job was cancelled")]
    Cancelled,
    /// The server is shutting down; the job stopped after its current batch.
    #[error(
        "the server is shutting down: the rewrap job stopped after its current batch; run it \
         again to resume"
    )]
    Interrupted,
}

impl RewrapError {
    /// The reason clients see in this error's ErrorInfo (`grpc/status.rs` picks the code).
    pub fn reason(&self) -> &'static str {
        match self {
            RewrapError::Key(error) => error.reason(),
            RewrapError::Store(error) => super::store_reason(error),
            RewrapError::Failed { .. } | RewrapError::Stalled { .. } | RewrapError::Interrupted => {
                "REWRAP_INCOMPLETE"
            }
            RewrapError::Cancelled => "CANCELLED",
        }
    }
}

/// One pass's progress: the KEK rewrap or the re-index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassProgress {
    pub target_version: u32,
    /// Records under older versions when the pass started.
    pub total: i64,
    /// Records rewrapped (or re-indexed) so far.
    pub moved: u64,
    /// Records the current sweep could not move.
    pub failed: u64,
    pub remaining: i64,
}

/// A job's progress, as sent after every batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub job_id: JobId,
    /// Data keys under older KEK versions.
    pub kek: PassProgress,
    /// Blind indexes under older index versions.
    pub index: PassProgress,
    pub done: bool,
}

/// Which pass a loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Kek,
    Index,
}

impl Pass {
    async fn refresh(self, keys: &KeyManager) -> Result<u32, KeyError> {
        match self {
            Pass::Kek => keys.refresh_active().await,
            Pass::Index => keys.refresh_index().await,
        }
    }

    async fn count(self, store: &dyn Store, target: u32) -> Result<i64, StoreError> {
        match self {
            Pass::Kek => store.count_older_than(target).await,
            Pass::Index => store.count_index_older_than(target).await,
        }
    }

    async fn batch(
        self,
        keys: &KeyManager,
        job_id: &JobId,
        target: u32,
        after: Option<&RecordId>,
        limit: i64,
        now: Micros,
    ) -> Result<RewrapBatch, RewrapError> {
        let store = keys.store();
        Ok(match self {
            Pass::Kek => {
                let rewrap = keys.rewrapper(target);
                store
                    .rewrap_batch(job_id, target, after, limit, now, &rewrap)
                    .await?
            }
            Pass::Index => {
                let reindex = crate::vault::reindex::reindexer(keys, target)?;
                store
                    .reindex_batch(job_id, target, after, limit, now, &reindex)
                    .await?
            }
        })
    }

    fn of(self, state: &mut Progress) -> &mut PassProgress {
        match self {
            Pass::Kek => &mut state.kek,
            Pass::Index => &mut state.index,
        }
    }
}

fn micros(duration: Duration) -> Micros {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Marks INTERRUPTED the RUNNING jobs whose owner is gone, as `vault`'s instance sees it.
pub async fn interrupt_abandoned(vault: &Vault) -> Result<u64, StoreError> {
    let interrupted = vault
        .store()
        .interrupt_abandoned_jobs(&vault.job_owner(), vault.now_micros(), micros(LEASE))
        .await?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "rewrap jobs whose server is gone marked INTERRUPTED; run `pdvault keys rewrap` again"
        );
    }
    Ok(interrupted)
}

/// Looks for abandoned jobs at start and every [`ABANDONED_SWEEP`], until `stop` is
/// cancelled (a sweep once begun finishes).
pub async fn interrupt_abandoned_periodically(
    vault: std::sync::Arc<Vault>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(ABANDONED_SWEEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Err(error) = interrupt_abandoned(&vault).await {
            tracing::warn!(%error, "could not look for abandoned rewrap jobs");
        }
    }
}

/// Runs one rewrap job to the end (the KEK pass, then the re-index pass), sending progress
/// after every batch. `now` stamps the job's progress and lease, which is renewed every
/// [`LEASE_RENEWAL`] for as long as the job runs. Once `stop` is cancelled (shutdown) the
/// job ends before its next batch, its row INTERRUPTED.
pub async fn run(
    keys: &KeyManager,
    job_id: JobId,
    owner: &JobOwner,
    batch_size: u32,
    now: &(dyn Fn() -> Micros + Send + Sync),
    progress: &mpsc::Sender<Progress>,
    stop: &CancellationToken,
) -> Result<Progress, RewrapError> {
    if stop.is_cancelled() {
        // Asked for while the server stops: no row, nothing to resume.
        return Err(RewrapError::Interrupted);
    }
    let store = keys.store().clone();
    let batch_size = i64::from(batch_size.clamp(1, MAX_BATCH_SIZE));
    let kek_target = keys.refresh_active().await?;
    let index_target = keys.refresh_index().await?;
    let started = now();
    store
        .start_rewrap_job(
            &job_id,
            kek_target,
            owner,
            started,
            started.saturating_add(micros(LEASE)),
        )
        .await?;
    let kek_total = store.count_older_than(kek_target).await?;
    let index_total = store.count_index_older_than(index_target).await?;
    let mut state = Progress {
        job_id: job_id.clone(),
        kek: PassProgress {
            target_version: kek_target,
            total: kek_total,
            remaining: kek_total,
            ..PassProgress::default()
        },
        index: PassProgress {
            target_version: index_target,
            total: index_total,
            remaining: index_total,
            ..PassProgress::default()
        },
        done: false,
    };
    let work = async {
        send(progress, &state).await?;
        for pass in [Pass::Kek, Pass::Index] {
            run_pass(
                keys, pass, &job_id, batch_size, now, progress, stop, &mut state,
            )
            .await?;
        }
        state.done = true;
        Ok(())
    };
    let heartbeat = async {
        loop {
            tokio::time::sleep(LEASE_RENEWAL).await;
            let lease_until = now().saturating_add(micros(LEASE));
            match store.renew_rewrap_lease(&job_id, lease_until).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job_id = %job_id, "rewrap job row is no longer running");
                }
                Err(error) => {
                    tracing::warn!(%error, job_id = %job_id, "cannot renew a rewrap job's lease");
                }
            }
        }
    };
    // The heartbeat never ends; the job's work decides the outcome.
    let outcome: Result<(), RewrapError> = tokio::select! {
        outcome = work => outcome,
        never = heartbeat => never,
    };
    let final_state = match &outcome {
        Ok(()) => "DONE",
        Err(RewrapError::Cancelled) => "CANCELLED",
        // What the sweep would say of a dead server's job: run it again to resume.
        Err(RewrapError::Interrupted) => "INTERRUPTED",
        Err(_) => "FAILED",
    };
    if let Err(error) = store.finish_rewrap_job(&job_id, final_state, now()).await {
        tracing::error!(%error, %job_id, "cannot record the end of a rewrap job");
    }
    outcome?;
    let _ = progress.send(state.clone()).await;
    Ok(state)
}

/// Sweeps the records in id order until none is left under an older version of `pass`'s
/// key, starting over when a rotation moved the target, and pausing when every row left is
/// held by someone else. Looks at `stop` before every batch, never during one.
#[allow(clippy::too_many_arguments)]
async fn run_pass(
    keys: &KeyManager,
    pass: Pass,
    job_id: &JobId,
    batch_size: i64,
    now: &(dyn Fn() -> Micros + Send + Sync),
    progress: &mpsc::Sender<Progress>,
    stop: &CancellationToken,
    state: &mut Progress,
) -> Result<(), RewrapError> {
    let store = keys.store().clone();
    let mut idle_passes = 0;
    loop {
        // Where the sweep goes on from: `None` starts at the first record id.
        let mut cursor: Option<RecordId> = None;
        let mut pass_moved = 0;
        pass.of(state).failed = 0;
        loop {
            if stop.is_cancelled() {
                return Err(RewrapError::Interrupted);
            }
            let target = pass.of(state).target_version;
            let batch = pass
                .batch(keys, job_id, target, cursor.as_ref(), batch_size, now())
                .await?;
            if batch.target_inactive {
                // Someone rotated meanwhile: aim at the new version from the start.
                let target = pass.refresh(keys).await?;
                let older = pass.count(store.as_ref(), target).await?;
                let this = pass.of(state);
                this.target_version = target;
                this.total = this.moved as i64 + older;
                cursor = None;
                continue;
            }
            let Some(last) = batch.last_record_id else {
                break;
            };
            cursor = Some(last);
            pass_moved += batch.rewrapped;
            let this = pass.of(state);
            this.moved += batch.rewrapped;
            this.failed += batch.failed;
            this.remaining = (this.total - this.moved as i64).max(0);
            send(progress, state).await?;
        }
        let this = pass.of(state);
        let remaining = pass.count(store.as_ref(), this.target_version).await?;
        this.remaining = remaining;
        if remaining == 0 {
            return Ok(());
        }
        if pass_moved == 0 && this.failed > 0 {
            return Err(RewrapError::Failed {
                failed: this.failed,
                remaining,
            });
        }
        if pass_moved == 0 {
            // Everything left is held by another job or a writer right now.
            idle_passes += 1;
            if idle_passes > LOCKED_ROWS_RETRIES {
                return Err(RewrapError::Stalled { remaining });
            }
            tokio::select! {
                () = stop.cancelled() => return Err(RewrapError::Interrupted),
                () = tokio::time::sleep(LOCKED_ROWS_PAUSE) => {}
            }
        } else {
            idle_passes = 0;
        }
    }
}

async fn send(progress: &mpsc::Sender<Progress>, state: &Progress) -> Result<(), RewrapError> {
    progress
        .send(state.clone())
        .await
        .map_err(|_| RewrapError::Cancelled)
}
