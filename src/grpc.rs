//! The gRPC edge: authenticates each call, turns protobuf messages into domain input, calls
//! [`crate::vault::Vault`], and maps its errors to `Status`.
//!
//! This is the only layer that knows about tonic. It is also the only place errors become
//! `Status`, each with the richer error model's details: a `google.rpc.BadRequest` naming
//! every bad field, or a `google.rpc.ErrorInfo` (domain `pdvault`) whose reason clients can
//! switch on. Messages name fields and reasons, never values.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::domain::{Gender, IdType, IdentityInput, Violation};
use crate::proto;
use crate::store::{Micros, RecordMeta, RecordState};
use crate::vault::{CallContext, LookupKey, Vault, VaultError};

/// ErrorInfo domain for every error this service raises.
pub const ERROR_DOMAIN: &str = "pdvault";
const MAX_REQUEST_ID_LEN: usize = 128;

/// `pdvault.v1.Vault` over a shared [`Vault`].
#[derive(Clone)]
pub struct VaultService {
    vault: Arc<Vault>,
}

impl VaultService {
    pub fn new(vault: Arc<Vault>) -> VaultService {
        VaultService { vault }
    }

    /// Authenticates the bearer token and captures who is calling from where.
    fn context<T>(&self, request: &Request<T>) -> Result<CallContext, Status> {
        call_context(&self.vault, request)
    }
}

/// Authenticates a call's bearer token against the vault's policy and captures who is
/// calling from where; every service of the server shares it.
pub(crate) fn call_context<T>(vault: &Vault, request: &Request<T>) -> Result<CallContext, Status> {
    let token = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
    let caller = vault
        .policy()
        .authenticate(token)
        .ok_or_else(|| Status::unauthenticated("invalid bearer token"))?;
    let request_id = request
        .metadata()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    Ok(CallContext {
        caller,
        peer: request.remote_addr().map(|addr| addr.to_string()),
        request_id,
    })
}

#[tonic::async_trait]
impl proto::vault_server::Vault for VaultService {
    async fn create_record(
        &self,
        request: Request<proto::CreateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let input = identity_input(request.identity.unwrap_or_default()).map_err(invalid)?;
        let retention_days = (request.retention_days != 0).then_some(request.retention_days);
        let meta = self
            .vault
            .create_record_with_retention(
                &ctx,
                input,
                non_empty(request.request_id),
                retention_days,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(record_message(meta)))
    }

    async fn get_record(
        &self,
        request: Request<proto::GetRecordRequest>,
    ) -> Result<Response<proto::GetRecordResponse>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let release = self
            .vault
            .get_record(
                &ctx,
                &request.record_id,
                &request.purpose,
                &request.justification,
                &request.fields,
            )
            .await
            .map_err(to_status)?;
        let fields = release
            .fields
            .into_iter()
            .map(|(field, released)| {
                (
                    field.as_str().to_owned(),
                    proto::ReleasedField {
                        value: released.value,
                        level: release_level(released.level) as i32,
                    },
                )
            })
            .collect();
        Ok(Response::new(proto::GetRecordResponse {
            record_id: release.record_id,
            fields,
            etag: release.etag,
        }))
    }

    async fn update_record(
        &self,
        request: Request<proto::UpdateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let input = identity_input(request.identity.unwrap_or_default()).map_err(invalid)?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let meta = self
            .vault
            .update_record(&ctx, &request.record_id, input, &mask, &request.etag)
            .await
            .map_err(to_status)?;
        Ok(Response::new(record_message(meta)))
    }

    async fn delete_record(
        &self,
        request: Request<proto::DeleteRecordRequest>,
    ) -> Result<Response<proto::DeleteRecordResponse>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let deleted_at = self
            .vault
            .delete_record(&ctx, &request.record_id, &request.reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DeleteRecordResponse {
            record_id: request.record_id,
            delete_time: Some(timestamp(deleted_at)),
        }))
    }

    async fn find_records(
        &self,
        request: Request<proto::FindRecordsRequest>,
    ) -> Result<Response<proto::FindRecordsResponse>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let key = match request.key {
            Some(proto::find_records_request::Key::Document(document)) => LookupKey::Document {
                id_type: id_type(document.id_type, "document.id_type").map_err(invalid)?,
                id_number: document.id_number,
            },
            Some(proto::find_records_request::Key::Phone(phone)) => LookupKey::Phone(phone),
            None => {
                return Err(invalid(vec![violation(
                    "key",
                    "exactly one of document or phone is required",
                )]));
            }
        };
        let record_ids = self
            .vault
            .find_records(&ctx, &request.purpose, &request.justification, key)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::FindRecordsResponse { record_ids }))
    }

    async fn check_account(
        &self,
        request: Request<proto::CheckAccountRequest>,
    ) -> Result<Response<proto::CheckAccountResponse>, Status> {
        let ctx = self.context(&request)?;
        let request = request.into_inner();
        let state = self
            .vault
            .check_account(&ctx, &request.record_id)
            .await
            .map_err(to_status)?;
        let status = match state {
            RecordState::Active => proto::AccountStatus::Active,
            RecordState::Deleted => proto::AccountStatus::Deleted,
        };
        Ok(Response::new(proto::CheckAccountResponse {
            record_id: request.record_id,
            status: status as i32,
        }))
    }
}

/// Protobuf identity to domain input; only enum decoding can fail here; the domain
/// validates the rest.
fn identity_input(identity: proto::Identity) -> Result<IdentityInput, Vec<Violation>> {
    let mut violations = Vec::new();
    let gender = match proto::Gender::try_from(identity.gender) {
        Ok(proto::Gender::Unspecified) => None,
        Ok(proto::Gender::Male) => Some(Gender::Male),
        Ok(proto::Gender::Female) => Some(Gender::Female),
        Err(_) => {
            violations.push(violation("gender", "is not a known Gender value"));
            None
        }
    };
    let id_type = id_type(identity.id_type, "id_type").unwrap_or_else(|mut v| {
        violations.append(&mut v);
        None
    });
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(IdentityInput {
        name: non_empty(identity.name),
        gender,
        id_type,
        id_number: non_empty(identity.id_number),
        date_of_birth: non_empty(identity.date_of_birth),
        nationality: non_empty(identity.nationality),
        phone: non_empty(identity.phone),
        email: non_empty(identity.email),
        address: non_empty(identity.address),
        postal_code: non_empty(identity.postal_code),
    })
}

fn id_type(value: i32, field: &str) -> Result<Option<IdType>, Vec<Violation>> {
    use proto::IdType as P;
    match P::try_from(value) {
        Ok(P::Unspecified) => Ok(None),
        Ok(P::ResidentId) => Ok(Some(IdType::ResidentId)),
        Ok(P::ForeignPermanentResidenceId) => Ok(Some(IdType::ForeignPermanentResidenceId)),
        Ok(P::HkmotwResidencePermit) => Ok(Some(IdType::HkmotwResidencePermit)),
        Ok(P::HkmoTravelPermit) => Ok(Some(IdType::HkmoTravelPermit)),
        Ok(P::TwTravelPermit) => Ok(Some(IdType::TwTravelPermit)),
        Ok(P::Passport) => Ok(Some(IdType::Passport)),
        Ok(P::Other) => Ok(Some(IdType::Other)),
        Err(_) => Err(vec![violation(field, "is not a known IdType value")]),
    }
}

fn release_level(level: crate::policy::ReleaseLevel) -> proto::ReleaseLevel {
    use crate::policy::ReleaseLevel as L;
    match level {
        L::Plain => proto::ReleaseLevel::Plain,
        L::Masked => proto::ReleaseLevel::Masked,
        L::Pseudonym => proto::ReleaseLevel::Pseudonym,
        L::Generalized => proto::ReleaseLevel::Generalized,
        L::None => proto::ReleaseLevel::Unspecified,
    }
}

fn record_message(meta: RecordMeta) -> proto::Record {
    proto::Record {
        record_id: meta.record_id,
        etag: meta.version.to_string(),
        create_time: Some(timestamp(meta.created_at)),
        update_time: Some(timestamp(meta.updated_at)),
        present_fields: meta.present_fields,
    }
}

pub(crate) fn timestamp(micros: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn violation(field: &str, reason: &str) -> Violation {
    Violation {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn invalid(violations: Vec<Violation>) -> Status {
    to_status(VaultError::InvalidArgument(violations))
}

pub(crate) fn error_info(code: Code, message: &str, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
    )
}

/// The one place a domain error becomes a gRPC status.
pub fn to_status(error: VaultError) -> Status {
    match &error {
        VaultError::InvalidArgument(violations) => {
            let details = ErrorDetails::with_bad_request(
                violations
                    .iter()
                    .map(|v| FieldViolation::new(v.field.clone(), v.reason.clone()))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(Code::InvalidArgument, error.to_string(), details)
        }
        VaultError::OperationNotGranted(_) => error_info(
            Code::PermissionDenied,
            &error.to_string(),
            "OPERATION_NOT_GRANTED",
        ),
        VaultError::PurposeNotGranted(_) => error_info(
            Code::PermissionDenied,
            &error.to_string(),
            "PURPOSE_NOT_GRANTED",
        ),
        VaultError::NotFound => error_info(Code::NotFound, &error.to_string(), "RECORD_NOT_FOUND"),
        VaultError::DuplicateIdentity => error_info(
            Code::AlreadyExists,
            &error.to_string(),
            "DUPLICATE_IDENTITY",
        ),
        VaultError::EtagMismatch => error_info(Code::Aborted, &error.to_string(), "ETAG_MISMATCH"),
        VaultError::DataLoss => {
            tracing::error!("a stored ciphertext failed authentication");
            error_info(Code::DataLoss, &error.to_string(), "CIPHERTEXT_INVALID")
        }
        VaultError::AuditUnavailable => {
            error_info(Code::Unavailable, &error.to_string(), "AUDIT_UNAVAILABLE")
        }
        VaultError::Storage(cause) => {
            tracing::error!(error = %cause, "storage failure");
            error_info(
                Code::Unavailable,
                "storage unavailable",
                "STORAGE_UNAVAILABLE",
            )
        }
        VaultError::Internal(cause) => {
            tracing::error!(error = %cause, "internal error");
            Status::internal("internal error")
        }
        VaultError::Key(cause) => crate::grpc_keys::key_status(cause),
    }
}
