//! Key-lifecycle use cases, independent of gRPC: who may rotate, rewrap, retire and destroy
//! keys, and the audit events those operations leave.
//!
//! KEKs and index (blind-index and pseudonym) keys go through the same operations, told
//! apart by [`KeyKind`]; events name the kind (`kek_version=`, `index_version=`).
//!
//! Every operation needs the `keys.rotate` grant. Each one that changes something is
//! audited through the vault's audit log after it took effect; should that
//! write fail, the caller is told ([`AdminError::AuditUnavailable`]) even though the key
//! change stands, because a rotation or destruction cannot be taken back. Events carry
//! version numbers and counts, never key material.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::keys::{KeyError, KeyKind, KeyStatus, KeyVersionInfo, RotateOutcome};
use crate::policy::Grant;
use crate::rewrap::{self, Progress, RewrapError};
use crate::vault::{CallContext, Vault, VaultError};

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

    pub async fn rotate(
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

    /// The KEK versions and the index versions.
    pub async fn status(&self, ctx: &CallContext) -> Result<(KeyStatus, KeyStatus), AdminError> {
        self.authorize(ctx, Grant::KeysRotate)?;
        let keys = self.vault.keys();
        Ok((
            keys.status(KeyKind::Kek).await?,
            keys.status(KeyKind::Index).await?,
        ))
    }

    pub async fn retire(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        version: u32,
    ) -> Result<KeyVersionInfo, AdminError> {
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

    pub async fn destroy(
        &self,
        ctx: &CallContext,
        kind: KeyKind,
        version: u32,
    ) -> Result<KeyVersionInfo, AdminError> {
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

    /// Runs a rewrap job, sending progress to `progress` until it ends or the receiver is
    /// dropped (which cancels the job after its current batch).
    pub async fn rewrap(
        &self,
        ctx: &CallContext,
        batch_size: u32,
        progress: mpsc::Sender<Progress>,
    ) -> Result<Progress, AdminError> {
        self.authorize(ctx, Grant::KeysRotate)?;
        let job_id = crate::vault::new_event_id().replacen("evt_", "rwj_", 1);
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
            batch_size,
            &now,
            &progress,
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

fn version_label(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Kek => "kek_version",
        KeyKind::Index => "index_version",
    }
}
