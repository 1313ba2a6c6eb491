//! The gRPC edge of key administration: `pdvault.v1.KeyManagement` over [`KeyAdmin`].
//!
//! Key and rewrap errors become `Status` in [`super::status`], like every other error.
//! Messages carry versions and counts, never material.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::domain::Violation;
use crate::grpc::status::to_status;
use crate::grpc::{call_context, checked, timestamp};
use crate::keys::{KeyKind, KeyVersionInfo, KeyVersionState};
use crate::proto;
use crate::proto::key_management_server::KeyManagement;
use crate::vault::AuditSubject;
use crate::vault::key_admin::KeyAdmin;
use crate::vault::rewrap::{MAX_BATCH_SIZE, Progress};

/// `pdvault.v1.KeyManagement`.
#[derive(Clone)]
pub struct KeyManagementService {
    admin: KeyAdmin,
}

impl KeyManagementService {
    pub fn new(admin: KeyAdmin) -> KeyManagementService {
        KeyManagementService { admin }
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<proto::RewrapProgress, Status>> + Send>>;

#[tonic::async_trait]
impl KeyManagement for KeyManagementService {
    async fn rotate_key_encryption_key(
        &self,
        request: Request<proto::RotateKeyEncryptionKeyRequest>,
    ) -> Result<Response<proto::RotateKeyEncryptionKeyResponse>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "RotateKeyEncryptionKey").await?;
        let expected = request.into_inner().expected_active_version;
        let (outcome, active) = self
            .admin
            .rotate(&ctx, KeyKind::Kek, (expected != 0).then_some(expected))
            .await?;
        Ok(Response::new(proto::RotateKeyEncryptionKeyResponse {
            active: Some(key_version(active)),
            created: outcome.created,
        }))
    }

    async fn rotate_index_key(
        &self,
        request: Request<proto::RotateIndexKeyRequest>,
    ) -> Result<Response<proto::RotateIndexKeyResponse>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "RotateIndexKey").await?;
        let expected = request.into_inner().expected_active_version;
        let (outcome, active) = self
            .admin
            .rotate(&ctx, KeyKind::Index, (expected != 0).then_some(expected))
            .await?;
        Ok(Response::new(proto::RotateIndexKeyResponse {
            active: Some(key_version(active)),
            created: outcome.created,
        }))
    }

    type RewrapRecordsStream = ProgressStream;

    async fn rewrap_records(
        &self,
        request: Request<proto::RewrapRecordsRequest>,
    ) -> Result<Response<Self::RewrapRecordsStream>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "RewrapRecords").await?;
        let batch_size = request.into_inner().batch_size;
        let batch_size = if batch_size > MAX_BATCH_SIZE {
            Err(vec![Violation::bounded(
                "batch_size",
                "must be at most {limit}",
                MAX_BATCH_SIZE.into(),
            )])
        } else {
            Ok(batch_size)
        };
        let subject = || AuditSubject::new("RewrapRecords");
        let batch_size = checked(self.admin.vault(), &ctx, subject, batch_size).await?;
        let (out, stream) = mpsc::channel::<Result<proto::RewrapProgress, Status>>(8);
        let admin = self.admin.clone();
        tokio::spawn(async move {
            let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(8);
            let job = admin.rewrap(&ctx, batch_size, progress_tx);
            let forward = {
                let out = out.clone();
                async move {
                    while let Some(progress) = progress_rx.recv().await {
                        if out.send(Ok(progress_message(progress))).await.is_err() {
                            // The client went away: dropping the receiver cancels the job.
                            break;
                        }
                    }
                }
            };
            let (result, ()) = tokio::join!(job, forward);
            if let Err(error) = result {
                let _ = out.send(Err(Status::from(error))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn get_key_status(
        &self,
        request: Request<proto::GetKeyStatusRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "GetKeyStatus").await?;
        let status = self.admin.status(&ctx).await?;
        let (keks, index) = (status.kek, status.index);
        Ok(Response::new(proto::KeyStatus {
            active_version: keks.active_version,
            versions: keks.versions.into_iter().map(key_version).collect(),
            active_index_version: index.active_version,
            index_versions: index.versions.into_iter().map(key_version).collect(),
            rewrap_jobs: status
                .jobs
                .into_iter()
                .map(|job| proto::RewrapJob {
                    job_id: job.job_id,
                    state: job.state,
                    target_version: u32::try_from(job.target_version).unwrap_or(0),
                    target_index_version: job
                        .target_index_version
                        .and_then(|v| u32::try_from(v).ok())
                        .unwrap_or(0),
                    rewrapped: job.rewrapped,
                    reindexed: job.reindexed,
                    failed: job.failed,
                    start_time: Some(timestamp(job.started_at)),
                    update_time: Some(timestamp(job.updated_at)),
                    owner: job.owner_instance.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn retire_key_version(
        &self,
        request: Request<proto::RetireKeyVersionRequest>,
    ) -> Result<Response<proto::KeyVersion>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "RetireKeyVersion").await?;
        let request = request.into_inner();
        let (version, kind) = (request.version, key_kind(request.kind()));
        let info = self.admin.retire(&ctx, kind, version).await?;
        Ok(Response::new(key_version(info)))
    }

    async fn destroy_key_version(
        &self,
        request: Request<proto::DestroyKeyVersionRequest>,
    ) -> Result<Response<proto::KeyVersion>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "DestroyKeyVersion").await?;
        let request = request.into_inner();
        let (version, kind) = (request.version, key_kind(request.kind()));
        let info = self.admin.destroy(&ctx, kind, version).await?;
        Ok(Response::new(key_version(info)))
    }

    async fn rekey_record(
        &self,
        request: Request<proto::RekeyRecordRequest>,
    ) -> Result<Response<proto::RekeyRecordResponse>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "RekeyRecord").await?;
        let request = request.into_inner();
        let vault = self.admin.vault();
        let (meta, kek_version) = vault
            .rekey_record(&ctx, &request.record_id, &request.reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::RekeyRecordResponse {
            etag: vault.etag(&meta),
            record_id: meta.record_id,
            kek_version,
        }))
    }

    async fn purge_expired_records(
        &self,
        request: Request<proto::PurgeExpiredRecordsRequest>,
    ) -> Result<Response<proto::PurgeExpiredRecordsResponse>, Status> {
        let ctx = call_context(self.admin.vault(), &request, "PurgeExpiredRecords").await?;
        let limit = request.into_inner().limit;
        let purged_record_ids = self
            .admin
            .vault()
            .purge_expired(&ctx, (limit != 0).then_some(limit))
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::PurgeExpiredRecordsResponse {
            purged_record_ids,
        }))
    }
}

fn key_version(info: KeyVersionInfo) -> proto::KeyVersion {
    let state = match info.state {
        KeyVersionState::Active => proto::KeyVersionState::Active,
        KeyVersionState::DecryptOnly => proto::KeyVersionState::DecryptOnly,
        KeyVersionState::Retired => proto::KeyVersionState::Retired,
        KeyVersionState::Destroyed => proto::KeyVersionState::Destroyed,
    };
    proto::KeyVersion {
        version: info.version,
        state: state as i32,
        record_count: info.records,
        create_time: Some(timestamp(info.created_at)),
        provider: info.provider,
    }
}

/// Unspecified is the KEK, as before kinds existed.
fn key_kind(kind: proto::KeyKind) -> KeyKind {
    match kind {
        proto::KeyKind::Index => KeyKind::Index,
        proto::KeyKind::Kek | proto::KeyKind::Unspecified => KeyKind::Kek,
    }
}

fn progress_message(progress: Progress) -> proto::RewrapProgress {
    proto::RewrapProgress {
        job_id: progress.job_id,
        target_version: progress.kek.target_version,
        total: progress.kek.total,
        rewrapped: progress.kek.moved as i64,
        failed: progress.kek.failed as i64,
        remaining: progress.kek.remaining,
        done: progress.done,
        target_index_version: progress.index.target_version,
        index_total: progress.index.total,
        reindexed: progress.index.moved as i64,
        index_failed: progress.index.failed as i64,
        index_remaining: progress.index.remaining,
    }
}
