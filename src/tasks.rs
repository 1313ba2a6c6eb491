//! Who owns the server's background tasks, and how they stop.
//!
//! Nothing the server starts in the background is a bare `tokio::spawn`: every task belongs
//! to a [`Tasks`] group, a cancellation token its task watches plus a tracker that knows
//! when the last task of the group has returned. Shutdown never aborts a task: it cancels a
//! group, and each task stops at a point where stopping loses nothing (between two ticks of
//! a periodic task, between two batches of a rewrap job), then shutdown waits for the group
//! within the grace period. A task that has not returned by then is left to finish on its
//! own (a batch commits or rolls back whole); shutdown logs it and goes on.
//!
//! The application has two groups, stopped in this order (`app::Application::run_until`,
//! ARCHITECTURE.md "Shutdown"):
//!
//! 1. the vault's (`Vault::tasks`, src/vault/mod.rs): the audit maintenance (checkpoints and
//!    retention), the request-id expiry, the abandoned-job sweeper, the health monitor,
//!    SIGHUP reloads, rewrap and re-index jobs, and the export streams of in-flight calls.
//!    Cancelled when the shutdown signal fires, waited for once in-flight calls are done.
//! 2. the infrastructure the first group needs until its end: the audit writer (closed
//!    through `AuditLog::close` in src/audit/mod.rs, so it flushes its queue first), the
//!    key-state watcher and the metrics listener with its scrapes.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A group of background tasks that stop together.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` in this group. The task watches [`Tasks::token`] (or is ended by its own
    /// means, as the audit writer is) at points where stopping loses nothing: cancellation
    /// never drops it mid-way.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// The token this group's tasks watch; cancelled by [`Tasks::cancel`].
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Resolves once the group is cancelled.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Asks every task of the group to stop at its next safe point.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Tasks of the group still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels the group and waits until every task has returned or `deadline` passed;
    /// whether they all returned. A task spawned after this still belongs to the group
    /// (and sees the token cancelled at once).
    pub async fn stop(&self, deadline: Instant) -> bool {
        self.cancel();
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn stop_waits_for_a_task_to_reach_its_safe_point() {
        let tasks = Tasks::new();
        let rounds = Arc::new(AtomicU32::new(0));
        let (token, counted) = (tasks.token(), Arc::clone(&rounds));
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
                // A round, once begun, finishes: cancellation is only seen between rounds.
                tokio::time::sleep(Duration::from_millis(20)).await;
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(tasks.stop(Instant::now() + Duration::from_secs(5)).await);
        assert!(tasks.is_empty());
        assert!(
            rounds.load(Ordering::SeqCst) >= 1,
            "the round in flight finished"
        );
    }

    #[tokio::test]
    async fn stop_gives_up_at_the_deadline_without_aborting() {
        let tasks = Tasks::new();
        let finished = Arc::new(AtomicU32::new(0));
        let done = Arc::clone(&finished);
        let handle = tasks.spawn(async move {
            // Ignores cancellation, as a batch in flight does.
            tokio::time::sleep(Duration::from_millis(200)).await;
            done.store(1, Ordering::SeqCst);
        });
        assert!(!tasks.stop(Instant::now() + Duration::from_millis(10)).await);
        assert_eq!(tasks.len(), 1);
        handle.await.unwrap();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "left to finish, not aborted"
        );
    }
}
