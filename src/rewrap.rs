//! The rewrap job: moves every data key still wrapped under an older KEK version to the
//! active one, without decrypting any field.
//!
//! Progress lives in the database, not here: a record needs rewrapping exactly when its
//! `kek_version` is older than the active one, and each batch changes those rows and the
//! job's counters in one transaction. A job killed at any point therefore loses at most
//! the batch in flight, and running the job again finishes the rest. Two jobs at once are
//! safe: on PostgreSQL each batch skips rows another job holds (`FOR UPDATE SKIP LOCKED`),
//! on SQLite the single writer serialises batches, and every update is a compare-and-swap
//! on the wrapped key, so no record is rewrapped from a stale read. Memory is one batch,
//! whatever the record count: batches walk the records in id order (keyset pagination).

use std::time::Duration;

use tokio::sync::mpsc;

use crate::keys::{KeyError, KeyManager};
use crate::store::{Micros, StoreError};

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
    /// Some data keys could not be unwrapped; they are left as they were.
    #[error("{failed} data keys could not be rewrapped; {remaining} remain under older versions")]
    Failed { failed: u64, remaining: i64 },
    /// Rows stayed locked by other transactions for the whole retry budget.
    #[error("{remaining} records stayed locked by other transactions")]
    Stalled { remaining: i64 },
    /// Whoever asked for progress went away; the job stops after its current batch.
    #[error("the rewrap job was cancelled")]
    Cancelled,
}

/// A job's progress, as sent after every batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub job_id: String,
    pub target_version: u32,
    /// Records under older versions when the job started.
    pub total: i64,
    pub rewrapped: u64,
    /// Records the current pass could not rewrap.
    pub failed: u64,
    pub remaining: i64,
    pub done: bool,
}

/// Runs one rewrap job to the end, sending progress after every batch. `now` stamps the
/// job's heartbeat.
pub async fn run(
    keys: &KeyManager,
    job_id: String,
    batch_size: u32,
    now: &(dyn Fn() -> Micros + Send + Sync),
    progress: &mpsc::Sender<Progress>,
) -> Result<Progress, RewrapError> {
    let store = keys.store().clone();
    let batch_size = i64::from(batch_size.clamp(1, MAX_BATCH_SIZE));
    let mut target = keys.refresh_active().await?;
    store.start_rewrap_job(&job_id, target, now()).await?;
    let total = store.count_older_than(target).await?;
    let mut state = Progress {
        job_id: job_id.clone(),
        target_version: target,
        total,
        rewrapped: 0,
        failed: 0,
        remaining: total,
        done: false,
    };
    let outcome = async {
        send(progress, &state).await?;
        let mut idle_passes = 0;
        loop {
            let mut cursor = String::new();
            let mut pass_rewrapped = 0;
            state.failed = 0;
            loop {
                let rewrap = keys.rewrapper(target);
                let batch = store
                    .rewrap_batch(&job_id, target, &cursor, batch_size, now(), &rewrap)
                    .await?;
                if batch.target_inactive {
                    // Someone rotated meanwhile: aim at the new version from the start.
                    target = keys.refresh_active().await?;
                    state.target_version = target;
                    state.total = state.rewrapped as i64 + store.count_older_than(target).await?;
                    cursor.clear();
                    continue;
                }
                let Some(last) = batch.last_record_id else {
                    break;
                };
                cursor = last;
                pass_rewrapped += batch.rewrapped;
                state.rewrapped += batch.rewrapped;
                state.failed += batch.failed;
                state.remaining = (state.total - state.rewrapped as i64).max(0);
                send(progress, &state).await?;
            }
            let remaining = store.count_older_than(target).await?;
            state.remaining = remaining;
            if remaining == 0 {
                state.done = true;
                return Ok(());
            }
            if pass_rewrapped == 0 && state.failed > 0 {
                return Err(RewrapError::Failed {
                    failed: state.failed,
                    remaining,
                });
            }
            if pass_rewrapped == 0 {
                // Everything left is held by another job or a writer right now.
                idle_passes += 1;
                if idle_passes > LOCKED_ROWS_RETRIES {
                    return Err(RewrapError::Stalled { remaining });
                }
                tokio::time::sleep(LOCKED_ROWS_PAUSE).await;
            } else {
                idle_passes = 0;
            }
        }
    }
    .await;
    let final_state = match &outcome {
        Ok(()) => "DONE",
        Err(RewrapError::Cancelled) => "CANCELLED",
        Err(_) => "FAILED",
    };
    if let Err(error) = store.finish_rewrap_job(&job_id, final_state, now()).await {
        tracing::error!(%error, job_id, "cannot record the end of a rewrap job");
    }
    outcome?;
    let _ = progress.send(state.clone()).await;
    Ok(state)
}

async fn send(progress: &mpsc::Sender<Progress>, state: &Progress) -> Result<(), RewrapError> {
    progress
        .send(state.clone())
        .await
        .map_err(|_| RewrapError::Cancelled)
}
