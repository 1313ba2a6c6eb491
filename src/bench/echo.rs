//! The gRPC ceiling the vault is measured against: `pdvault.v1.Vault` answered by a service
//! that does no work at all, served by the same tonic server the vault uses, accepting
//! connections the same way (`serve_with_incoming` over a tokio listener), and driven by the
//! same client code with the same request messages. Whatever the vault's figures lose to it
//! is what authentication, policy, crypto, storage and audit cost.
//!
//! It implements the vault's own service trait rather than a separate echo proto so that
//! request and response messages, paths and codecs are identical; each RPC answers with a
//! message of the same kind built from the request (the "echo"), and nothing is stored.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use pdvault::proto;
use pdvault::proto::vault_server::VaultServer;

use super::BenchError;

#[derive(Clone, Copy, Default)]
pub struct EchoVault;

#[tonic::async_trait]
impl proto::vault_server::Vault for EchoVault {
    async fn create_record(
        &self,
        request: Request<proto::CreateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        let identity = request.into_inner().identity.unwrap_or_default();
        let present = [
            ("name", identity.name.is_empty()),
            ("id_number", identity.id_number.is_empty()),
            ("phone", identity.phone.is_empty()),
            ("email", identity.email.is_empty()),
            ("address", identity.address.is_empty()),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(name, _)| name.to_owned())
        .collect();
        Ok(Response::new(proto::Record {
            record_id: "rec_echo".into(),
            etag: "1".into(),
            create_time: None,
            update_time: None,
            present_fields: present,
        }))
    }

    async fn get_record(
        &self,
        request: Request<proto::GetRecordRequest>,
    ) -> Result<Response<proto::GetRecordResponse>, Status> {
        let request = request.into_inner();
        // As many released fields as were asked for, so the response is of similar size.
        let fields: HashMap<String, proto::ReleasedField> = request
            .fields
            .into_iter()
            .map(|field| {
                let value = proto::ReleasedField {
                    value: field.clone(),
                    level: proto::ReleaseLevel::Plain as i32,
                };
                (field, value)
            })
            .collect();
        Ok(Response::new(proto::GetRecordResponse {
            record_id: request.record_id,
            fields,
            etag: "1".into(),
        }))
    }

    async fn update_record(
        &self,
        request: Request<proto::UpdateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        Ok(Response::new(proto::Record {
            record_id: request.into_inner().record_id,
            etag: "2".into(),
            ..proto::Record::default()
        }))
    }

    async fn delete_record(
        &self,
        request: Request<proto::DeleteRecordRequest>,
    ) -> Result<Response<proto::DeleteRecordResponse>, Status> {
        Ok(Response::new(proto::DeleteRecordResponse {
            record_id: request.into_inner().record_id,
            delete_time: None,
        }))
    }

    async fn find_records(
        &self,
        request: Request<proto::FindRecordsRequest>,
    ) -> Result<Response<proto::FindRecordsResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(proto::FindRecordsResponse {
            record_ids: vec![request.purpose],
        }))
    }

    async fn check_account(
        &self,
        request: Request<proto::CheckAccountRequest>,
    ) -> Result<Response<proto::CheckAccountResponse>, Status> {
        Ok(Response::new(proto::CheckAccountResponse {
            record_id: request.into_inner().record_id,
            status: proto::AccountStatus::Active as i32,
            ..proto::CheckAccountResponse::default()
        }))
    }

    async fn record_guardian_consent(
        &self,
        request: Request<proto::RecordGuardianConsentRequest>,
    ) -> Result<Response<proto::GuardianConsent>, Status> {
        Ok(Response::new(proto::GuardianConsent {
            record_id: request.into_inner().record_id,
            ..proto::GuardianConsent::default()
        }))
    }

    async fn batch_get_records(
        &self,
        request: Request<proto::BatchGetRecordsRequest>,
    ) -> Result<Response<proto::BatchGetRecordsResponse>, Status> {
        let request = request.into_inner();
        let results = request
            .record_ids
            .into_iter()
            .map(|record_id| {
                let fields = request
                    .fields
                    .iter()
                    .map(|field| {
                        let value = proto::ReleasedField {
                            value: field.clone(),
                            level: proto::ReleaseLevel::Plain as i32,
                        };
                        (field.clone(), value)
                    })
                    .collect();
                proto::BatchGetRecordResult {
                    result: Some(proto::batch_get_record_result::Result::Record(
                        proto::GetRecordResponse {
                            record_id,
                            fields,
                            etag: "1".into(),
                        },
                    )),
                }
            })
            .collect();
        Ok(Response::new(proto::BatchGetRecordsResponse { results }))
    }

    async fn batch_create_records(
        &self,
        request: Request<proto::BatchCreateRecordsRequest>,
    ) -> Result<Response<proto::BatchCreateRecordsResponse>, Status> {
        let mut results = Vec::new();
        for item in request.into_inner().requests {
            let record = self.create_record(Request::new(item)).await?.into_inner();
            results.push(proto::BatchCreateRecordResult {
                result: Some(proto::batch_create_record_result::Result::Record(record)),
            });
        }
        Ok(Response::new(proto::BatchCreateRecordsResponse { results }))
    }

    type ExportRecordsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::ExportRecordsResponse, Status>> + Send>,
    >;

    async fn export_records(
        &self,
        _request: Request<proto::ExportRecordsRequest>,
    ) -> Result<Response<Self::ExportRecordsStream>, Status> {
        let summary = proto::ExportRecordsResponse {
            item: Some(proto::export_records_response::Item::Summary(
                proto::ExportSummary::default(),
            )),
            cursor: String::new(),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(summary)]))))
    }

    async fn revoke_guardian_consent(
        &self,
        request: Request<proto::RevokeGuardianConsentRequest>,
    ) -> Result<Response<proto::RevokeGuardianConsentResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(proto::RevokeGuardianConsentResponse {
            revoked_consent_ids: vec![request.consent_id],
        }))
    }
}

/// Binds `127.0.0.1:0` and returns the address and the server future, which serves until
/// `shutdown` completes. The caller decides which runtime runs it.
pub async fn bind(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send,
    ),
    BenchError,
> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| BenchError::Io(format!("echo listener: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Io(format!("echo listener: {e}")))?;
    // tonic's server with `serve_with_incoming_shutdown`, as `app::Application::run_until` serves the vault.
    let serve = tonic::transport::Server::builder()
        .add_service(VaultServer::new(EchoVault))
        .serve_with_incoming_shutdown(pdvault::app::incoming(listener), shutdown);
    Ok((addr, serve))
}
