//! The gRPC edge: authenticates each call, turns protobuf messages into domain input, calls
//! [`crate::vault::Vault`], and answers its errors as `Status`.
//!
//! This is the only layer that knows about tonic. Errors become `Status` in one place,
//! [`status`], each with the richer error model's details (a `google.rpc.ErrorInfo` whose
//! reason clients can switch on, and for bad input a `google.rpc.BadRequest` naming every bad
//! field). Messages name fields and reasons, never values.
//!
//! Requests the layer refuses before the vault sees them (an unknown enum value, a bad page
//! token, a malformed `x-request-id`) are audited like every other refusal ([`refuse`]).
//!
//! A caller proves who it is with a bearer token, a client certificate mapped to it in
//! config, or both; when both are presented they must name the same caller.

pub mod admission;
pub mod codec;
pub mod keys;
pub mod limits;
pub mod status;
pub mod tls;

use std::sync::Arc;

use data_encoding::BASE64URL_NOPAD;
use tonic::{Request, Response, Status};

mod account;
mod audit;
mod bulk;

pub use account::AccountSecurityService;
pub use audit::AuditService;

use crate::domain::edge::MAX_JUSTIFICATION_BYTES;
use crate::domain::ids::{ConsentId, RecordId};
use crate::domain::{Gender, IdType, IdentityInput, Violation};
use crate::policy::{Caller, CertificateMatch, Policy};
use crate::proto;
use crate::store::{Micros, RecordMeta};
use crate::vault::accounts::{AccountStatus, ConsentRequest, Guardian, Relationship};
use crate::vault::{AuditSubject, CallContext, LookupKey, Release, Vault, VaultError};
use status::{RequestError, to_status};

/// `pdvault.v1.Vault` over a shared [`Vault`]. Rate limits are the admission layer's, as
/// for every service.
#[derive(Clone)]
pub struct VaultService {
    vault: Arc<Vault>,
}

impl VaultService {
    pub fn new(vault: Arc<Vault>) -> VaultService {
        VaultService { vault }
    }

    async fn context<T>(&self, request: &Request<T>, rpc: &str) -> Result<CallContext, Status> {
        call_context(&self.vault, request, rpc).await
    }
}

/// Authenticates the caller and captures who is calling from where, under which policy.
/// The correlation headers are checked like every request string: a malformed
/// `x-request-id` or `traceparent` refuses the call (audited, without the bad value).
pub(crate) async fn call_context<T>(
    vault: &Vault,
    request: &Request<T>,
    rpc: &str,
) -> Result<CallContext, Status> {
    let (policy, caller) = authenticate(vault, request)?;
    let metadata = request.metadata();
    let mut violations = Vec::new();
    let header = |name: &str| metadata.get(name).map(|value| value.as_bytes());
    // The request layer replaces a malformed client id with one of its own and says so.
    if request
        .extensions()
        .get::<admission::ClientRequestIdRefused>()
        .is_some()
    {
        violations.push(crate::domain::edge::request_id_violation());
    }
    let request_id = match header(admission::REQUEST_ID_HEADER) {
        Some(raw) => match crate::domain::edge::check_request_id(raw) {
            Ok(()) => Some(String::from_utf8_lossy(raw).into_owned()),
            Err(violation) => {
                violations.push(violation);
                None
            }
        },
        None => None,
    };
    let trace_id = match header("traceparent") {
        Some(raw) => match crate::domain::edge::parse_traceparent(raw) {
            Ok(trace_id) => Some(trace_id),
            Err(violation) => {
                violations.push(violation);
                None
            }
        },
        None => None,
    };
    let ctx = CallContext {
        caller,
        policy,
        peer: request.remote_addr().map(|addr| addr.to_string()),
        request_id,
        trace_id,
    };
    if violations.is_empty() {
        Ok(ctx)
    } else {
        Err(refuse(vault, &ctx, AuditSubject::new(rpc), violations).await)
    }
}

/// Refuses a call the gRPC layer could not turn into the vault's input, auditing the
/// refusal as the vault audits its own.
pub(crate) async fn refuse(
    vault: &Vault,
    ctx: &CallContext,
    subject: AuditSubject,
    violations: Vec<Violation>,
) -> Status {
    let error = VaultError::InvalidArgument(violations);
    vault.audit_refusal(ctx, subject, &error).await;
    to_status(error)
}

/// The input, or the refusal [`refuse`] makes of its violations.
pub(crate) async fn checked<T>(
    vault: &Vault,
    ctx: &CallContext,
    subject: impl FnOnce() -> AuditSubject,
    input: Result<T, Vec<Violation>>,
) -> Result<T, Status> {
    match input {
        Ok(input) => Ok(input),
        Err(violations) => Err(refuse(vault, ctx, subject(), violations).await),
    }
}

/// The caller a request authenticates as, and the policy snapshot that says so.
pub(crate) fn authenticate<T>(
    vault: &Vault,
    request: &Request<T>,
) -> Result<(Arc<Policy>, Arc<Caller>), RequestError> {
    let policy = vault.policy();
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    let chain = request.peer_certs();
    let leaf = chain
        .as_ref()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.as_ref());
    let caller = identify(&policy, authorization, leaf)?;
    Ok((policy, caller))
}

/// The caller an `authorization` header and a verified client certificate (its leaf, DER)
/// prove, under `policy`. The admission layer asks this of the raw headers before a call
/// may take a slot; the handlers ask it again for their call context.
pub(crate) fn identify(
    policy: &Policy,
    authorization: Option<&str>,
    leaf_certificate: Option<&[u8]>,
) -> Result<Arc<Caller>, RequestError> {
    let token = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let by_token = match token {
        Some(token) => Some(
            policy
                .authenticate(token)
                .ok_or(RequestError::InvalidToken)?,
        ),
        None => None,
    };
    // rustls has verified the chain; the leaf is first.
    let certificate = leaf_certificate.and_then(crate::grpc::tls::certificate_identity);
    let by_certificate =
        match certificate.map(|identity| policy.authenticate_certificate(&identity)) {
            Some(CertificateMatch::Caller(caller)) => Some(caller),
            Some(CertificateMatch::Ambiguous) => return Err(RequestError::CertificateAmbiguous),
            Some(CertificateMatch::Unmapped) | None => None,
        };
    let caller = match (by_token, by_certificate) {
        (Some(token), Some(certificate)) if token.name != certificate.name => {
            return Err(RequestError::CallerMismatch);
        }
        (Some(caller), _) | (None, Some(caller)) => caller,
        (None, None) => return Err(RequestError::Unauthenticated),
    };
    Ok(caller)
}

#[tonic::async_trait]
impl proto::vault_server::Vault for VaultService {
    async fn create_record(
        &self,
        request: Request<proto::CreateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        const RPC: &str = "CreateRecord";
        let ctx = self.context(&request, RPC).await?;
        let request = request.into_inner();
        let input = identity_input(request.identity.unwrap_or_default());
        let input = checked(&self.vault, &ctx, || AuditSubject::new(RPC), input).await?;
        let meta = self
            .vault
            .create_record(
                &ctx,
                input,
                non_empty(request.request_id),
                non_empty(request.policy_version),
                (request.retention_days != 0).then_some(request.retention_days),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(record_message(&self.vault, meta)))
    }

    async fn get_record(
        &self,
        request: Request<proto::GetRecordRequest>,
    ) -> Result<Response<proto::GetRecordResponse>, Status> {
        let ctx = self.context(&request, "GetRecord").await?;
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
        crate::telemetry::metrics::record_release(
            &request.purpose,
            release
                .fields
                .iter()
                .map(|(_, released)| released.level.as_str()),
        );
        Ok(Response::new(release_message(release)))
    }

    async fn batch_get_records(
        &self,
        request: Request<proto::BatchGetRecordsRequest>,
    ) -> Result<Response<proto::BatchGetRecordsResponse>, Status> {
        self.batch_get(request).await
    }

    async fn batch_create_records(
        &self,
        request: Request<proto::BatchCreateRecordsRequest>,
    ) -> Result<Response<proto::BatchCreateRecordsResponse>, Status> {
        self.batch_create(request).await
    }

    type ExportRecordsStream = bulk::ExportStream;

    async fn export_records(
        &self,
        request: Request<proto::ExportRecordsRequest>,
    ) -> Result<Response<Self::ExportRecordsStream>, Status> {
        self.export(request).await
    }

    async fn update_record(
        &self,
        request: Request<proto::UpdateRecordRequest>,
    ) -> Result<Response<proto::Record>, Status> {
        const RPC: &str = "UpdateRecord";
        let ctx = self.context(&request, RPC).await?;
        let request = request.into_inner();
        let input = identity_input(request.identity.unwrap_or_default());
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let input = checked(&self.vault, &ctx, subject, input).await?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let meta = self
            .vault
            .update_record(
                &ctx,
                &request.record_id,
                input,
                &mask,
                &request.etag,
                non_empty(request.policy_version),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(record_message(&self.vault, meta)))
    }

    async fn delete_record(
        &self,
        request: Request<proto::DeleteRecordRequest>,
    ) -> Result<Response<proto::DeleteRecordResponse>, Status> {
        let ctx = self.context(&request, "DeleteRecord").await?;
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
        const RPC: &str = "FindRecords";
        let ctx = self.context(&request, RPC).await?;
        let request = request.into_inner();
        let key = match request.key {
            Some(proto::find_records_request::Key::Document(document)) => {
                id_type(document.id_type, "document.id_type").map(|id_type| LookupKey::Document {
                    id_type,
                    id_number: document.id_number,
                })
            }
            Some(proto::find_records_request::Key::Phone(phone)) => Ok(LookupKey::Phone(phone)),
            None => Err(vec![violation(
                "key",
                "exactly one of document or phone is required",
            )]),
        };
        let subject = || {
            AuditSubject::new(RPC)
                .purpose(&ctx.policy, &request.purpose)
                .text(&request.justification, MAX_JUSTIFICATION_BYTES)
        };
        let key = checked(&self.vault, &ctx, subject, key).await?;
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
        let ctx = self.context(&request, "CheckAccount").await?;
        let request = request.into_inner();
        let view = self
            .vault
            .check_account(&ctx, &request.record_id)
            .await
            .map_err(to_status)?;
        let status = match view.status {
            AccountStatus::Active => proto::AccountStatus::Active,
            AccountStatus::Suspended => proto::AccountStatus::Suspended,
            AccountStatus::Deleted => proto::AccountStatus::Deleted,
        };
        Ok(Response::new(proto::CheckAccountResponse {
            record_id: request.record_id,
            status: status as i32,
            minor: view.minor,
            under_14: view.under_14,
            guardian_consent_required: view.guardian_consent_required,
            policy_reconsent_required: view.policy_reconsent_required,
        }))
    }

    async fn record_guardian_consent(
        &self,
        request: Request<proto::RecordGuardianConsentRequest>,
    ) -> Result<Response<proto::GuardianConsent>, Status> {
        use proto::record_guardian_consent_request::Guardian as ProtoGuardian;
        const RPC: &str = "RecordGuardianConsent";
        let ctx = self.context(&request, RPC).await?;
        let request = request.into_inner();
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let guardian = match request.guardian.clone() {
            Some(ProtoGuardian::GuardianRecordId(id)) => Ok(Guardian::Record(id)),
            Some(ProtoGuardian::GuardianIdentity(identity)) => {
                id_type(identity.id_type, "guardian_identity.id_type").map(|id_type| {
                    Guardian::Identity(IdentityInput {
                        name: non_empty(identity.name),
                        id_type,
                        id_number: non_empty(identity.id_number),
                        phone: non_empty(identity.phone),
                        ..IdentityInput::default()
                    })
                })
            }
            None => Err(vec![violation(
                "guardian",
                "exactly one of guardian_record_id or guardian_identity is required",
            )]),
        };
        let guardian = checked(&self.vault, &ctx, subject, guardian).await?;
        let relationship = match proto::GuardianRelationship::try_from(request.relationship) {
            Ok(proto::GuardianRelationship::Parent) => Ok(Relationship::Parent),
            Ok(proto::GuardianRelationship::LegalGuardian) => Ok(Relationship::LegalGuardian),
            Ok(proto::GuardianRelationship::Other) => Ok(Relationship::Other),
            _ => Err(vec![violation(
                "relationship",
                "must be PARENT, LEGAL_GUARDIAN or OTHER",
            )]),
        };
        let relationship = checked(&self.vault, &ctx, subject, relationship).await?;
        let consent = self
            .vault
            .record_guardian_consent(
                &ctx,
                ConsentRequest {
                    record_id: request.record_id,
                    guardian,
                    relationship,
                    evidence_ref: request.evidence_ref,
                    policy_version: request.policy_version,
                },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::GuardianConsent {
            consent_id: consent.consent_id.into_string(),
            record_id: consent.record_id.into_string(),
            relationship: request.relationship,
            evidence_ref: consent.evidence_ref,
            policy_version: consent.policy_version,
            grant_time: Some(timestamp(consent.granted_at)),
            guardian_record_id: consent
                .guardian_record_id
                .map(RecordId::into_string)
                .unwrap_or_default(),
        }))
    }

    async fn revoke_guardian_consent(
        &self,
        request: Request<proto::RevokeGuardianConsentRequest>,
    ) -> Result<Response<proto::RevokeGuardianConsentResponse>, Status> {
        let ctx = self.context(&request, "RevokeGuardianConsent").await?;
        let request = request.into_inner();
        let consent_id = non_empty(request.consent_id);
        let revoked_consent_ids = self
            .vault
            .revoke_guardian_consent(
                &ctx,
                &request.record_id,
                consent_id.as_deref(),
                &request.note,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::RevokeGuardianConsentResponse {
            revoked_consent_ids: revoked_consent_ids
                .into_iter()
                .map(ConsentId::into_string)
                .collect(),
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

/// A release as the `GetRecordResponse` that `GetRecord` answers and each released
/// `BatchGetRecords` item carries: each field with the level it was released at.
fn release_message(release: Release) -> proto::GetRecordResponse {
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
    proto::GetRecordResponse {
        record_id: release.record_id.into_string(),
        fields,
        etag: release.etag,
    }
}

pub(crate) fn release_level(level: crate::policy::ReleaseLevel) -> proto::ReleaseLevel {
    use crate::policy::ReleaseLevel as L;
    match level {
        L::Plain => proto::ReleaseLevel::Plain,
        L::Masked => proto::ReleaseLevel::Masked,
        L::Pseudonym => proto::ReleaseLevel::Pseudonym,
        L::Generalized => proto::ReleaseLevel::Generalized,
        L::None => proto::ReleaseLevel::Unspecified,
    }
}

fn record_message(vault: &Vault, meta: RecordMeta) -> proto::Record {
    proto::Record {
        etag: vault.etag(&meta),
        record_id: meta.record_id.into_string(),
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

pub(crate) fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

pub(crate) fn violation(field: &str, reason: &'static str) -> Violation {
    Violation::at(field, reason)
}

/// Keyset cursors travel as opaque page tokens: base64url of "<micros>:<id>".
pub(crate) fn encode_page_token(time: Micros, id: &str) -> String {
    BASE64URL_NOPAD.encode(format!("{time}:{id}").as_bytes())
}

pub(crate) fn decode_page_token(token: &str) -> Result<Cursor, Violation> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || violation("page_token", "is not a token this service issued");
    if token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(bad());
    }
    let decoded = BASE64URL_NOPAD
        .decode(token.as_bytes())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (time, id) = text.split_once(':').ok_or_else(bad)?;
    // The id goes back into a query: it must be one of the ids this service issues.
    if crate::domain::edge::check_text("page_token", id, MAX_PAGE_TOKEN_BYTES).is_err() {
        return Err(bad());
    }
    Ok(Some((time.parse().map_err(|_| bad())?, id.to_owned())))
}

/// Page tokens this service issues are far shorter.
const MAX_PAGE_TOKEN_BYTES: usize = 256;

/// A requested page size: 0 means 100, at most 1000.
pub(crate) fn page_size(requested: i32) -> Result<u32, Violation> {
    match requested {
        0 => Ok(100),
        n if n < 0 => Err(violation("page_size", "must not be negative")),
        n => Ok((n as u32).min(1000)),
    }
}

/// A keyset cursor: continue after this (time, id).
pub(crate) type Cursor = Option<(Micros, String)>;

/// The page size and cursor of a listing, every bad one named.
pub(crate) fn paging(
    page_size_requested: i32,
    page_token: &str,
) -> Result<(u32, Cursor), Vec<Violation>> {
    match (
        page_size(page_size_requested),
        decode_page_token(page_token),
    ) {
        (Ok(limit), Ok(after)) => Ok((limit, after)),
        (limit, after) => Err([limit.err(), after.err()].into_iter().flatten().collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page tokens are unpadded base64url (RFC 4648, section 5) as the `base64` crate wrote
    /// them before `data-encoding` took its place: a token a client holds across an upgrade
    /// still pages on, and padding or the standard alphabet is refused as before.
    #[test]
    fn page_tokens_are_unpadded_base64url() {
        let id = "rec_01hzabcdefghjkmnpqrstvwxyz";
        let token = "MTc2NDU0NzIwMDEyMzQ1NjpyZWNfMDFoemFiY2RlZmdoamttbnBxcnN0dnd4eXo";
        assert_eq!(encode_page_token(1_764_547_200_123_456, id), token);
        assert_eq!(
            decode_page_token(token).unwrap(),
            Some((1_764_547_200_123_456, id.to_owned()))
        );
        assert_eq!(
            decode_page_token("MTo-Pj4").unwrap(),
            Some((1, ">>>".to_owned()))
        );
        for refused in ["MTo+Pj4", "MTo-Pj4=", "MTo-Pj5", &format!("{token}=")] {
            let violation = decode_page_token(refused).unwrap_err();
            assert_eq!(violation.field, "page_token", "{refused}");
        }
    }
}
