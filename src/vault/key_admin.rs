//! Key-lifecycle use cases, independent of gRPC: who may rotate, rewrap, retire and destroy
//! keys, and the audit events those operations leave.
//!
//! KEKs and index (blind-index and pseudonym) keys go through the same operations, told
//! apart by [`KeyKind`]; events name the kind (`kek_version=`, `index_version=`).
//!
//! Every operation needs the `keys.rotate` grant. Each one that changes something is
//! audited through the vault's audit log after it took effect; should that
//! write fail, the caller is told ([`AdminError::AuditUnavailable`]) even though the key
//! change stands, because a rotation or destruction cannot be taken back. A refused
//! operation (no grant, a version in the wrong state, ...) is audited as a refusal. Events
//! carry version numbers and counts, never key material.
//!
//! [`KeyAdmin`] wraps an `Arc<Vault>` instead of adding `impl Vault` methods as the other
//! use cases do (see the `vault` module header) only because a rewrap job outlives the call
//! that starts it and needs a `Vault` it owns.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::domain::ids::JobId;
use crate::keys::{KeyError, KeyKind, KeyStatus, KeyVersionInfo, RotateOutcome};
use crate::policy::Grant;
use crate::vault::rewrap::{self, Progress, RewrapError};
use crate::vault::{AuditSubject, CallContext, Vault, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("caller may not call {0}")]
    NotGranted(&'static str),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Rewrap(#[from] RewrapError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("the audit trail cannot be written; the key operation took effect but is unaudited")]
    AuditUnavailable,
}

impl AdminError {
    /// The reason clients see in this error's ErrorInfo (`grpc/status.rs` picks the code)
    /// and the one a refused key operation's audit event records ([`refusal`]).
    pub fn reason(&self) -> &'static str {
        match self {
            AdminError::NotGranted(_) => "OPERATION_NOT_GRANTED",
            AdminError::Key(error) => error.reason(),
            AdminError::Rewrap(error) => error.reason(),
            AdminError::Vault(error) => error.reason(),
            AdminError::AuditUnavailable => "AUDIT_UNAVAILABLE",
        }
    }
}

/// How many of the newest rewrap jobs `GetKeyStatus` lists.
const STATUS_JOBS: i64 = 20;

/// What `GetKeyStatus` reports.
#[derive(Debug)]
pub struct KeyAdminStatus {
    pub kek: KeyStatus,
    pub index: KeyStatus,
    /// Newest first.
    pub jobs: Vec<crate::store::RewrapJobRow>,
}

/// The key-administration use cases over a running vault.
#[derive(Clone)]
pub struct KeyAdmin {
    vault: Arc<Vault>,
}

impl KeyAdmin {
    pub fn new(vault: Arc<Vault>) -> KeyAdmin {
        KeyAdmin { vault }
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    fn authorize(&self, ctx: &CallContext, grant: Grant) -> Result<(), AdminError> {
        if ctx.caller.has_grant(grant) {
            Ok(())
        } else {
            Err(AdminError::NotGranted(grant.as_str()))
        }
    }

    fn now(&self) -> i64 {
        self.vault.clock().now().timestamp_micros()
    }

    async fn audit(
        &self,
        ctx: &CallContext,
        rpc: &str,
        record_ids: Vec<String>,
        reason: String,
    ) -> Result<(), AdminError> {
        let mut event = self.vault.event(ctx, rpc, record_ids, "OK", Some(reason));
        event.occurred_at = self.now();
        self.vault.audit().record(event).await.map_err(|error| {
            tracing::error!(%error, rpc, "audit write failed after a key operation");
            AdminError::AuditUnavailable
        })
    }

    /// Audits a refused operation (see the module header) and returns the outcome as is.
    async fn settle<T>(
        &self,
        ctx: &CallContext,
        rpc: &str,
        result: Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        if let Err(error) = &result
            && let Some((outcome, reason)) = refusal(error)
        {
            self.vault
                .write_refusal(ctx, AuditSubject::new(rpc), outcome, reason, false)
                .await;
        }
        result
    }

    pub async fn rotate(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        expected_active: Option<u32>,
    ) -> Result<(RotateOutcome, KeyVersionInfo), AdminError> {
        let rpc = match kind {
            KeyKind::Kek => "RotateKeyEncryptionKey",
            KeyKind::Index => "RotateIndexKey",
        };
        let result = self.try_rotate(ctx, kind, expected_active).await;
        self.settle(ctx, rpc, result).await
    }

    async fn try_rotate(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        expected_active: Option<u32>,
    ) -> Result<(RotateOutcome, KeyVersionInfo), AdminError> {
        self.authorize(ctx, Grant::KeysRotate)?;
        let keys = self.vault.keys();
        let outcome = keys.rotate(kind, expected_active, self.now()).await?;
        if outcome.created {
            let rpc = match kind {
                KeyKind::Kek => "RotateKeyEncryptionKey",
                KeyKind::Index => "RotateIndexKey",
            };
            self.audit(
                ctx,
                rpc,
                Vec::new(),
                format!("{}={}", version_label(kind), outcome.active_version),
            )
            .await?;
        }
        let active = self.version(kind, outcome.active_version).await?;
        Ok((outcome, active))
    }

    /// The KEK versions, the index versions and the newest rewrap jobs (after marking
    /// INTERRUPTED those whose server is gone, so a dead job never shows RUNNING).
    pub async fn status(&self, ctx: &CallContext) -> Result<KeyAdminStatus, AdminError> {
        let result = async {
            self.authorize(ctx, Grant::KeysRotate)?;
            let keys = self.vault.keys();
            rewrap::interrupt_abandoned(&self.vault)
                .await
                .map_err(VaultError::from)?;
            Ok(KeyAdminStatus {
                kek: keys.status(KeyKind::Kek).await?,
                index: keys.status(KeyKind::Index).await?,
                jobs: self
                    .vault
                    .store()
                    .rewrap_jobs(STATUS_JOBS)
                    .await
                    .map_err(VaultError::from)?,
            })
        }
        .await;
        self.settle(ctx, "GetKeyStatus", result).await
    }

    pub async fn retire(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        version: u32,
    ) -> Result<KeyVersionInfo, AdminError> {
        let result = async {
            self.authorize(ctx, Grant::KeysRotate)?;
            let info = self.vault.keys().retire(kind, version, self.now()).await?;
            self.audit(
                ctx,
                "RetireKeyVersion",
                Vec::new(),
                format!("{}={version}", version_label(kind)),
            )
            .await?;
            Ok(info)
        }
        .await;
        self.settle(ctx, "RetireKeyVersion", result).await
    }

    pub async fn destroy(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        version: u32,
    ) -> Result<KeyVersionInfo, AdminError> {
        let result = async {
            self.authorize(ctx, Grant::KeysRotate)?;
            let info = self.vault.keys().destroy(kind, version, self.now()).await?;
            self.audit(
                ctx,
                "DestroyKeyVersion",
                Vec::new(),
                format!("{}={version}", version_label(kind)),
            )
            .await?;
            Ok(info)
        }
        .await;
        self.settle(ctx, "DestroyKeyVersion", result).await
    }

    /// Runs a rewrap job, sending progress to `progress` until it ends or the receiver is
    /// dropped (which cancels the job after its current batch). Shutdown interrupts it
    /// after its current batch too (the vault's tasks' token).
    pub async fn rewrap(
        &self,
        ctx: &CallContext,
        batch_size: u32,
        progress: mpsc::Sender<Progress>,
    ) -> Result<Progress, AdminError> {
        if let Err(refused) = self.authorize(ctx, Grant::KeysRotate) {
            // A job that runs is audited by its summary, whatever its end.
            return self.settle(ctx, "RewrapRecords", Err(refused)).await;
        }
        let job_id = JobId::generate();
        let clock = self.vault.clock().clone();
        let now = move || clock.now().timestamp_micros();
        let batch_size = if batch_size == 0 {
            rewrap::DEFAULT_BATCH_SIZE
        } else {
            batch_size
        };
        let result = rewrap::run(
            self.vault.keys(),
            job_id.clone(),
            &self.vault.job_owner(),
            batch_size,
            &now,
            &progress,
            &self.vault.tasks().token(),
        )
        .await;
        let summary = match &result {
            Ok(done) => format!(
                "job_id={job_id} kek_version={} rewrapped={} index_version={} reindexed={} \
                 outcome=DONE",
                done.kek.target_version,
                done.kek.moved,
                done.index.target_version,
                done.index.moved
            ),
            Err(error) => format!("job_id={job_id} outcome=ERROR error={error}"),
        };
        self.audit(ctx, "RewrapRecords", Vec::new(), summary)
            .await?;
        Ok(result?)
    }

    async fn version(&self, kind: KeyKind, version: u32) -> Result<KeyVersionInfo, AdminError> {
        let status = self.vault.keys().status(kind).await?;
        status
            .versions
            .into_iter()
            .find(|v| v.version == version)
            .ok_or(AdminError::Key(KeyError::NoSuchVersion(version)))
    }
}

/// The outcome and reason a refused key operation's event records (the reason is
/// [`AdminError::reason`], the one its status carries); `None` for failures that are
/// audited otherwise (a rewrap job's summary) or cannot be (the audit log itself).
pub(crate) fn refusal(error: &AdminError) -> Option<(&'static str, String)> {
    let outcome = match error {
        AdminError::NotGranted(_)
        | AdminError::Key(
            KeyError::NoSuchVersion(_)
            | KeyError::WrongState { .. }
            | KeyError::InUse { .. }
            | KeyError::Destroyed { .. },
        ) => "DENIED",
        AdminError::Key(_) => "ERROR",
        AdminError::Vault(error) => return Some(crate::vault::refusal_outcome(error)),
        AdminError::Rewrap(_) | AdminError::AuditUnavailable => return None,
    };
    Some((outcome, error.reason().to_owned()))
}

fn version_label(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Kek => "kek_version",
        KeyKind::Index => "index_version",
    }
}
