//! The one place errors become a `tonic::Status`.
//!
//! Every layer fails with its own typed error ([`VaultError`], [`KeyError`], [`AdminError`],
//! [`RewrapError`], [`LimitError`], this layer's own [`RequestError`], and the application's
//! refused reload through [`policy_invalid`]); each becomes a status here and nowhere else,
//! so the codes and reasons clients see are written down once.
//! A status carries a message naming fields, versions and reasons, never a value the caller
//! sent, and the richer error model's details: a `google.rpc.ErrorInfo` in domain `pdvault`
//! whose reason clients switch on (with metadata where a number helps the caller: a size
//! limit, a key version), and for bad input a `google.rpc.BadRequest` naming every bad field.
//!
//! Codes and reasons are a contract: tests and the Python clients check them, and
//! the README lists them. The code is chosen here; the ErrorInfo reason is the error's own
//! `reason()` (`VaultError`, `KeyError`, `AdminError`, `RewrapError`), because a refused
//! call's audit event records the same reason and the two must not drift apart. The unit
//! tests below pin every variant to its code and reason, and the audit's reason to the
//! status's.
//!
//! Causes below the surface (a database error, the module's error, a bug) are logged here
//! and never returned: the client learns `STORAGE_UNAVAILABLE` or `INTERNAL`, the operator
//! reads the cause. Refusals are counted in the denial metric here too, once each, as they
//! are answered.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::limits::LimitError;
use crate::keys::KeyError;
use crate::vault::VaultError;
use crate::vault::key_admin::AdminError;
use crate::vault::rewrap::RewrapError;

/// ErrorInfo domain for every error this service raises.
pub const ERROR_DOMAIN: &str = "pdvault";
/// ErrorInfo reason of `INVALID_ARGUMENT` beside its BadRequest.
pub const FIELD_INVALID: &str = "FIELD_INVALID";
/// ErrorInfo reason of a request that is not a well-formed gRPC message.
pub const MALFORMED_REQUEST: &str = "MALFORMED_REQUEST";

/// What the gRPC layer itself refuses, before a call reaches the vault or instead of it:
/// credentials that prove no caller, a message that does not arrive, is too large or is not
/// well-formed, and the limits' refusals the admission layer applies.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid bearer token")]
    InvalidToken,
    #[error("client certificate names more than one caller")]
    CertificateAmbiguous,
    #[error("bearer token and client certificate name different callers")]
    CallerMismatch,
    #[error("missing bearer token or mapped client certificate")]
    Unauthenticated,
    #[error("the request message did not arrive within the read deadline")]
    ReadTimeout,
    #[error("request message larger than the limit of {max} bytes")]
    TooLarge { max: usize },
    /// The gRPC framing is wrong: says what, never what was sent.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The message does not decode. prost's error names the field path and the wire
    /// problem, never field values.
    #[error("malformed request: {0}")]
    Decode(#[source] prost::DecodeError),
    /// `Admin.ReloadPolicy` on a server started without configuration it can read again.
    #[error("this server has no configuration source to reload from")]
    ReloadUnavailable,
    #[error(transparent)]
    Limit(#[from] LimitError),
}

impl From<RequestError> for Status {
    fn from(error: RequestError) -> Status {
        use RequestError as E;
        let (code, reason) = match &error {
            E::InvalidToken => (Code::Unauthenticated, "INVALID_TOKEN"),
            E::CertificateAmbiguous => (Code::Unauthenticated, "CERTIFICATE_AMBIGUOUS"),
            E::CallerMismatch => (Code::Unauthenticated, "CALLER_MISMATCH"),
            E::Unauthenticated => (Code::Unauthenticated, "UNAUTHENTICATED"),
            E::ReadTimeout => (Code::DeadlineExceeded, "REQUEST_READ_TIMEOUT"),
            E::TooLarge { max } => {
                crate::telemetry::metrics::record_denial("MESSAGE_TOO_LARGE");
                return error_info_with(
                    Code::OutOfRange,
                    &error.to_string(),
                    "MESSAGE_TOO_LARGE",
                    [("maxBytes", max.to_string())],
                );
            }
            E::Malformed(_) | E::Decode(_) => (Code::InvalidArgument, MALFORMED_REQUEST),
            E::ReloadUnavailable => {
                return error_info(
                    Code::FailedPrecondition,
                    &error.to_string(),
                    "RELOAD_UNAVAILABLE",
                );
            }
            E::Limit(limit) => return Status::from(*limit),
        };
        crate::telemetry::metrics::record_denial(reason);
        error_info(code, &error.to_string(), reason)
    }
}

/// Counts a refusal in the denial metric without answering with it: another refusal (the
/// address's rate) answers the call, and both are counted, as each would be alone.
pub(crate) fn count_unanswered(error: RequestError) {
    drop(Status::from(error));
}

impl From<LimitError> for Status {
    fn from(error: LimitError) -> Status {
        let (code, reason) = match error {
            LimitError::Overloaded => (Code::Unavailable, "OVERLOADED"),
            LimitError::InFlight | LimitError::CallerRate | LimitError::PeerRate => {
                (Code::ResourceExhausted, "RATE_LIMITED")
            }
            // Not a refusal of the caller: the server ran out of time (logged where it
            // happened).
            LimitError::Timeout => {
                return error_info(
                    Code::DeadlineExceeded,
                    &error.to_string(),
                    "REQUEST_TIMEOUT",
                );
            }
        };
        crate::telemetry::metrics::record_denial(reason);
        error_info(code, &error.to_string(), reason)
    }
}

impl From<VaultError> for Status {
    fn from(error: VaultError) -> Status {
        to_status(error)
    }
}

/// The status of a vault error: `INVALID_ARGUMENT` with a BadRequest naming every field,
/// or its code and reason; storage and internal causes are logged, not returned.
pub fn to_status(error: VaultError) -> Status {
    use VaultError as E;
    let reason = error.reason();
    let code = match &error {
        E::InvalidArgument(violations) => {
            let mut details = ErrorDetails::with_bad_request(
                violations
                    .iter()
                    .map(|v| FieldViolation::new(v.field.clone(), v.description()))
                    .collect::<Vec<_>>(),
            );
            details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
            return Status::with_error_details(Code::InvalidArgument, error.to_string(), details);
        }
        E::OperationNotGranted(_) | E::PurposeNotGranted | E::ExportNotAllowed => {
            Code::PermissionDenied
        }
        E::RecordDeleted
        | E::AccountSuspended
        | E::GuardianConsentRequired
        | E::GuardianNotAdult
        | E::NotAMinor
        | E::ExportChanged => Code::FailedPrecondition,
        E::NotFound => Code::NotFound,
        E::DuplicateIdentity => Code::AlreadyExists,
        E::EtagMismatch => Code::Aborted,
        E::AuditUnavailable => Code::Unavailable,
        E::DataLoss => {
            tracing::error!("a stored ciphertext failed authentication");
            Code::DataLoss
        }
        E::Storage(cause) => {
            tracing::error!(error = %cause, "storage failure");
            return storage_unavailable(reason);
        }
        E::Crypto(_) | E::Task(_) | E::Encode(_) | E::Internal(_) => {
            tracing::error!(%error, "internal error");
            return internal(reason);
        }
        E::Key(cause) => return key_status(cause),
    };
    if matches!(code, Code::PermissionDenied | Code::FailedPrecondition) {
        crate::telemetry::metrics::record_denial(reason);
    }
    error_info(code, &error.to_string(), reason)
}

/// The status of a key error, wherever it surfaced (a read, a rotation, a rewrap).
/// Messages carry versions and counts, never material.
pub fn key_status(error: &KeyError) -> Status {
    let message = error.to_string();
    let reason = error.reason();
    let version = |version: &u32| [("version", version.to_string())];
    match error {
        KeyError::NoSuchVersion(v) => error_info_with(Code::NotFound, &message, reason, version(v)),
        KeyError::WrongState { version: v, .. } => {
            error_info_with(Code::FailedPrecondition, &message, reason, version(v))
        }
        KeyError::InUse { version: v, .. } => {
            error_info_with(Code::FailedPrecondition, &message, reason, version(v))
        }
        KeyError::Destroyed { version: v } => {
            crate::telemetry::metrics::record_denial(reason);
            error_info_with(Code::FailedPrecondition, &message, reason, version(v))
        }
        KeyError::MaterialMissing { version: v }
        | KeyError::IndexMaterialMissing { version: v } => {
            tracing::error!(error = %message, "key material unavailable");
            error_info_with(Code::Unavailable, &message, reason, version(v))
        }
        KeyError::Crypto(crate::crypto::CryptoError::Integrity) => {
            tracing::error!("a wrapped key failed authentication");
            error_info(Code::DataLoss, "stored data failed authentication", reason)
        }
        KeyError::Store(cause) => {
            tracing::error!(error = %cause, "storage failure");
            storage_unavailable(reason)
        }
        KeyError::Keyring(_) | KeyError::Crypto(_) | KeyError::Hsm(_) | KeyError::SecretFile(_) => {
            tracing::error!(error = %message, "key provider failure");
            error_info(Code::Unavailable, "key provider unavailable", reason)
        }
    }
}

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Status {
        let reason = error.reason();
        match error {
            AdminError::NotGranted(_) => {
                error_info(Code::PermissionDenied, &error.to_string(), reason)
            }
            AdminError::Key(error) => key_status(&error),
            AdminError::Vault(error) => to_status(error),
            AdminError::AuditUnavailable => {
                error_info(Code::Unavailable, &error.to_string(), reason)
            }
            AdminError::Rewrap(error) => error.into(),
        }
    }
}

impl From<RewrapError> for Status {
    fn from(error: RewrapError) -> Status {
        let reason = error.reason();
        match error {
            RewrapError::Key(error) => key_status(&error),
            RewrapError::Store(error) => to_status(VaultError::from(error)),
            RewrapError::Failed { .. } | RewrapError::Stalled { .. } => {
                error_info(Code::FailedPrecondition, &error.to_string(), reason)
            }
            RewrapError::Cancelled => {
                error_info(Code::Cancelled, "the rewrap job was cancelled", reason)
            }
            // Retryable: the records say where the next job resumes.
            RewrapError::Interrupted => error_info(Code::Unavailable, &error.to_string(), reason),
        }
    }
}

/// A reload refused (`app::reload`'s `ReloadError`, taken as any error because `grpc` sits
/// below `app`). Configuration errors name keys and sources, never identity values, so they
/// are safe to return to an administrator.
pub fn policy_invalid(error: &dyn std::error::Error) -> Status {
    error_info(
        Code::FailedPrecondition,
        &format!("configuration refused: {error}"),
        "POLICY_INVALID",
    )
}

/// `UNAVAILABLE` / `STORAGE_UNAVAILABLE` (the error's `reason()`): the cause is logged,
/// never returned.
fn storage_unavailable(reason: &'static str) -> Status {
    error_info(Code::Unavailable, "storage unavailable", reason)
}

/// `INTERNAL`, with its reason (the error's `reason()`): the cause is logged, never
/// returned.
fn internal(reason: &'static str) -> Status {
    error_info(Code::Internal, "internal error", reason)
}

fn error_info(code: Code, message: &str, reason: &'static str) -> Status {
    error_info_with(code, message, reason, [])
}

/// A status with its ErrorInfo. Metadata holds numbers the server chose (a limit, a key
/// version), never a request value.
fn error_info_with<const N: usize>(
    code: Code,
    message: &str,
    reason: &'static str,
    metadata: [(&'static str, String); N],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::crypto::CryptoError;
    use crate::domain::Violation;
    use crate::keys::{HsmError, KeyringError, SecretFileError};
    use crate::store::StoreError;

    fn reason_of(status: &Status) -> String {
        status
            .get_details_error_info()
            .map(|info| {
                assert_eq!(info.domain, ERROR_DOMAIN);
                info.reason
            })
            .unwrap_or_default()
    }

    fn violation(field: &str, reason: &'static str) -> Violation {
        Violation::at(field, reason)
    }

    fn check(what: &str, status: Status, code: Code, reason: &str) {
        assert_eq!(
            (status.code(), reason_of(&status).as_str()),
            (code, reason),
            "{what}: {status:?}"
        );
    }

    /// A cancelled task's `JoinError`, the only way to make one.
    async fn join_error() -> tokio::task::JoinError {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        task.await.unwrap_err()
    }

    /// A field tag with no value after it: a truncated message.
    fn decode_error() -> prost::DecodeError {
        use prost::Message;
        prost_types::Timestamp::decode(&[0x08_u8][..]).unwrap_err()
    }

    fn json_error() -> serde_json::Error {
        serde_json::from_str::<u8>("not json").unwrap_err()
    }

    /// Fails to compile when a variant is added, until it is given a row below.
    fn listed(error: &VaultError) {
        use VaultError as E;
        match error {
            E::InvalidArgument(_)
            | E::OperationNotGranted(_)
            | E::PurposeNotGranted
            | E::NotFound
            | E::RecordDeleted
            | E::DuplicateIdentity
            | E::EtagMismatch
            | E::AccountSuspended
            | E::GuardianConsentRequired
            | E::GuardianNotAdult
            | E::NotAMinor
            | E::ExportNotAllowed
            | E::ExportChanged
            | E::DataLoss
            | E::AuditUnavailable
            | E::Storage(_)
            | E::Key(_)
            | E::Crypto(_)
            | E::Task(_)
            | E::Encode(_)
            | E::Internal(_) => {}
        }
    }

    #[tokio::test]
    async fn every_vault_error_has_its_documented_code_and_reason() {
        use Code as C;
        let cases = [
            (
                VaultError::InvalidArgument(vec![violation("record_id", "is required")]),
                C::InvalidArgument,
                FIELD_INVALID,
            ),
            (
                VaultError::OperationNotGranted("GetRecord"),
                C::PermissionDenied,
                "OPERATION_NOT_GRANTED",
            ),
            (
                VaultError::PurposeNotGranted,
                C::PermissionDenied,
                "PURPOSE_NOT_GRANTED",
            ),
            (VaultError::NotFound, C::NotFound, "RECORD_NOT_FOUND"),
            (
                VaultError::RecordDeleted,
                C::FailedPrecondition,
                "RECORD_DELETED",
            ),
            (
                VaultError::DuplicateIdentity,
                C::AlreadyExists,
                "DUPLICATE_IDENTITY",
            ),
            (VaultError::EtagMismatch, C::Aborted, "ETAG_MISMATCH"),
            (
                VaultError::AccountSuspended,
                C::FailedPrecondition,
                "ACCOUNT_SUSPENDED",
            ),
            (
                VaultError::GuardianConsentRequired,
                C::FailedPrecondition,
                "GUARDIAN_CONSENT_REQUIRED",
            ),
            (
                VaultError::GuardianNotAdult,
                C::FailedPrecondition,
                "GUARDIAN_NOT_ADULT",
            ),
            (VaultError::NotAMinor, C::FailedPrecondition, "NOT_A_MINOR"),
            (
                VaultError::ExportNotAllowed,
                C::PermissionDenied,
                "EXPORT_NOT_ALLOWED",
            ),
            (
                VaultError::ExportChanged,
                C::FailedPrecondition,
                "EXPORT_CHANGED",
            ),
            (VaultError::DataLoss, C::DataLoss, "CIPHERTEXT_INVALID"),
            (
                VaultError::AuditUnavailable,
                C::Unavailable,
                "AUDIT_UNAVAILABLE",
            ),
            (
                VaultError::Storage(StoreError::Unavailable("closed".into())),
                C::Unavailable,
                "STORAGE_UNAVAILABLE",
            ),
            (
                VaultError::Key(KeyError::NoSuchVersion(3)),
                C::NotFound,
                "KEY_VERSION_NOT_FOUND",
            ),
            (
                VaultError::Crypto(CryptoError::Random),
                C::Internal,
                "INTERNAL",
            ),
            (
                VaultError::Task(join_error().await),
                C::Internal,
                "INTERNAL",
            ),
            (VaultError::Encode(json_error()), C::Internal, "INTERNAL"),
            (VaultError::Internal("a bug"), C::Internal, "INTERNAL"),
        ];
        for (error, code, reason) in cases {
            listed(&error);
            let described = format!("{error:?}");
            check(&described, Status::from(error), code, reason);
        }
    }

    #[test]
    fn every_vault_error_becomes_a_status_with_a_reason() {
        let errors = [
            VaultError::InvalidArgument(vec![violation("record_id", "is required")]),
            VaultError::OperationNotGranted("GetRecord"),
            VaultError::PurposeNotGranted,
            VaultError::NotFound,
            VaultError::RecordDeleted,
            VaultError::DuplicateIdentity,
            VaultError::EtagMismatch,
            VaultError::AccountSuspended,
            VaultError::GuardianConsentRequired,
            VaultError::GuardianNotAdult,
            VaultError::NotAMinor,
            VaultError::ExportNotAllowed,
            VaultError::ExportChanged,
            VaultError::DataLoss,
            VaultError::AuditUnavailable,
            VaultError::Storage(StoreError::NotFound),
            VaultError::Key(KeyError::NoSuchVersion(3)),
            VaultError::Internal("a bug"),
        ];
        for error in errors {
            let described = format!("{error:?}");
            let status = to_status(error);
            assert!(!reason_of(&status).is_empty(), "{described}: {status:?}");
        }
        let internal = to_status(VaultError::Internal("secret cause"));
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(reason_of(&internal), "INTERNAL");
        assert!(!internal.message().contains("secret cause"));
        let invalid = to_status(VaultError::InvalidArgument(vec![violation(
            "purpose", "bad",
        )]));
        assert_eq!(reason_of(&invalid), FIELD_INVALID);
        let fields: Vec<String> = invalid
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["purpose"]);
    }

    #[test]
    fn a_bound_is_in_the_description_and_never_in_the_reason() {
        let bounded = Violation::bounded("justification", "must be at most {limit} bytes", 512);
        let status = to_status(VaultError::InvalidArgument(vec![
            bounded,
            violation("purpose", "is required"),
        ]));
        assert_eq!(
            status.message(),
            "invalid request: justification: must be at most 512 bytes; purpose: is required"
        );
        let described: Vec<(String, String)> = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect();
        assert_eq!(
            described,
            [
                ("justification".into(), "must be at most 512 bytes".into()),
                ("purpose".into(), "is required".into()),
            ]
        );
    }

    #[test]
    fn a_cause_stays_in_the_log_and_out_of_the_status() {
        let storage = to_status(VaultError::Storage(StoreError::Unavailable(
            "host db.internal refused".into(),
        )));
        assert_eq!(storage.message(), "storage unavailable");
        let keys = key_status(&KeyError::Hsm(HsmError::NoToken("vault-token".into())));
        assert_eq!(keys.message(), "key provider unavailable");
        let encode = VaultError::Encode(json_error());
        assert!(
            std::error::Error::source(&encode).is_some(),
            "the cause is kept as a source"
        );
        assert_eq!(to_status(encode).message(), "internal error");
        let audit = crate::audit::AuditError::Unavailable(Arc::new(StoreError::NotFound));
        assert!(std::error::Error::source(&audit).is_some());
    }

    #[test]
    fn every_key_error_has_its_documented_code_and_reason() {
        use Code as C;
        let path = || PathBuf::from("/keys");
        let cases = [
            (
                KeyError::NoSuchVersion(3),
                C::NotFound,
                "KEY_VERSION_NOT_FOUND",
            ),
            (
                KeyError::WrongState {
                    version: 2,
                    state: "retired".into(),
                    wanted: "ACTIVE",
                },
                C::FailedPrecondition,
                "KEY_VERSION_STATE",
            ),
            (
                KeyError::InUse {
                    version: 2,
                    records: 7,
                },
                C::FailedPrecondition,
                "KEY_VERSION_IN_USE",
            ),
            (
                KeyError::Destroyed { version: 1 },
                C::FailedPrecondition,
                "KEY_VERSION_DESTROYED",
            ),
            (
                KeyError::MaterialMissing { version: 4 },
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
            (
                KeyError::IndexMaterialMissing { version: 4 },
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
            (
                KeyError::Crypto(CryptoError::Integrity),
                C::DataLoss,
                "CIPHERTEXT_INVALID",
            ),
            (
                KeyError::Crypto(CryptoError::KeyLength),
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
            (
                KeyError::Store(StoreError::Unavailable("closed".into())),
                C::Unavailable,
                "STORAGE_UNAVAILABLE",
            ),
            (
                KeyError::Keyring(KeyringError::Missing { path: path() }),
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
            (
                KeyError::Hsm(HsmError::WrapLength),
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
            (
                KeyError::SecretFile(SecretFileError::Exposed {
                    path: path(),
                    mode: 0o644,
                }),
                C::Unavailable,
                "KEY_UNAVAILABLE",
            ),
        ];
        for (error, code, reason) in cases {
            check(&format!("{error:?}"), key_status(&error), code, reason);
        }
        let destroyed = key_status(&KeyError::Destroyed { version: 5 });
        let info = destroyed.get_details_error_info().unwrap();
        assert_eq!(info.metadata.get("version").map(String::as_str), Some("5"));
    }

    /// One of every kind of key error.
    fn key_errors() -> Vec<KeyError> {
        let path = || PathBuf::from("/keys");
        vec![
            KeyError::NoSuchVersion(3),
            KeyError::WrongState {
                version: 2,
                state: "retired".into(),
                wanted: "ACTIVE",
            },
            KeyError::InUse {
                version: 2,
                records: 7,
            },
            KeyError::Destroyed { version: 1 },
            KeyError::MaterialMissing { version: 4 },
            KeyError::IndexMaterialMissing { version: 4 },
            KeyError::Crypto(CryptoError::Integrity),
            KeyError::Crypto(CryptoError::KeyLength),
            KeyError::Store(StoreError::Unavailable("closed".into())),
            KeyError::Keyring(KeyringError::Missing { path: path() }),
            KeyError::Hsm(HsmError::WrapLength),
            KeyError::SecretFile(SecretFileError::Exposed {
                path: path(),
                mode: 0o644,
            }),
        ]
    }

    /// A refused call's audit event records the reason its caller's status carries, for
    /// every error (bad input: the fields the BadRequest names), so the trail and the
    /// client cannot tell two stories.
    #[tokio::test]
    async fn the_audit_records_the_reason_the_status_carries() {
        let mut vault_errors = vec![
            VaultError::OperationNotGranted("GetRecord"),
            VaultError::PurposeNotGranted,
            VaultError::NotFound,
            VaultError::RecordDeleted,
            VaultError::DuplicateIdentity,
            VaultError::EtagMismatch,
            VaultError::AccountSuspended,
            VaultError::GuardianConsentRequired,
            VaultError::GuardianNotAdult,
            VaultError::NotAMinor,
            VaultError::ExportNotAllowed,
            VaultError::ExportChanged,
            VaultError::DataLoss,
            VaultError::AuditUnavailable,
            VaultError::Storage(StoreError::Unavailable("closed".into())),
            VaultError::Crypto(CryptoError::Random),
            VaultError::Task(join_error().await),
            VaultError::Encode(json_error()),
            VaultError::Internal("a bug"),
        ];
        vault_errors.extend(key_errors().into_iter().map(VaultError::Key));
        for error in vault_errors {
            listed(&error);
            let described = format!("{error:?}");
            let (_, audited) = crate::vault::refusal_outcome(&error);
            let status = to_status(error);
            assert_eq!(audited, reason_of(&status), "{described}");
        }
        let invalid = VaultError::InvalidArgument(vec![
            violation("record_id", "is required"),
            violation("purpose", "is required"),
        ]);
        let (outcome, audited) = crate::vault::refusal_outcome(&invalid);
        let status = to_status(invalid);
        let fields: Vec<String> = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!((outcome, audited), ("INVALID_ARGUMENT", fields.join(",")));

        let mut admin_errors = vec![
            AdminError::NotGranted("RotateKeyEncryptionKey"),
            AdminError::Vault(VaultError::OperationNotGranted("RekeyRecord")),
            AdminError::Vault(VaultError::NotFound),
        ];
        admin_errors.extend(key_errors().into_iter().map(AdminError::Key));
        for error in admin_errors {
            let described = format!("{error:?}");
            let (_, audited) = crate::vault::key_admin::refusal(&error)
                .unwrap_or_else(|| panic!("{described} is audited"));
            assert_eq!(audited, reason_of(&Status::from(error)), "{described}");
        }
        // Audited otherwise (the job's summary) or not at all (the trail is down).
        for error in [
            AdminError::AuditUnavailable,
            AdminError::Rewrap(RewrapError::Cancelled),
        ] {
            assert!(crate::vault::key_admin::refusal(&error).is_none());
        }
    }

    #[test]
    fn every_admin_and_rewrap_error_has_its_documented_code_and_reason() {
        use Code as C;
        let cases = [
            (
                AdminError::NotGranted("RotateKeyEncryptionKey"),
                C::PermissionDenied,
                "OPERATION_NOT_GRANTED",
            ),
            (
                AdminError::Key(KeyError::InUse {
                    version: 1,
                    records: 2,
                }),
                C::FailedPrecondition,
                "KEY_VERSION_IN_USE",
            ),
            (
                AdminError::Vault(VaultError::OperationNotGranted("RekeyRecord")),
                C::PermissionDenied,
                "OPERATION_NOT_GRANTED",
            ),
            (
                AdminError::AuditUnavailable,
                C::Unavailable,
                "AUDIT_UNAVAILABLE",
            ),
            (
                AdminError::Rewrap(RewrapError::Key(KeyError::NoSuchVersion(9))),
                C::NotFound,
                "KEY_VERSION_NOT_FOUND",
            ),
            (
                AdminError::Rewrap(RewrapError::Store(StoreError::Unavailable("closed".into()))),
                C::Unavailable,
                "STORAGE_UNAVAILABLE",
            ),
            (
                AdminError::Rewrap(RewrapError::Failed {
                    failed: 1,
                    remaining: 1,
                }),
                C::FailedPrecondition,
                "REWRAP_INCOMPLETE",
            ),
            (
                AdminError::Rewrap(RewrapError::Stalled { remaining: 3 }),
                C::FailedPrecondition,
                "REWRAP_INCOMPLETE",
            ),
            (
                AdminError::Rewrap(RewrapError::Cancelled),
                C::Cancelled,
                "CANCELLED",
            ),
            (
                AdminError::Rewrap(RewrapError::Interrupted),
                C::Unavailable,
                "REWRAP_INCOMPLETE",
            ),
        ];
        for (error, code, reason) in cases {
            check(&format!("{error:?}"), Status::from(error), code, reason);
        }
    }

    #[test]
    fn every_request_and_limit_error_has_its_documented_code_and_reason() {
        use Code as C;
        let cases = [
            (
                RequestError::InvalidToken,
                C::Unauthenticated,
                "INVALID_TOKEN",
            ),
            (
                RequestError::CertificateAmbiguous,
                C::Unauthenticated,
                "CERTIFICATE_AMBIGUOUS",
            ),
            (
                RequestError::CallerMismatch,
                C::Unauthenticated,
                "CALLER_MISMATCH",
            ),
            (
                RequestError::Unauthenticated,
                C::Unauthenticated,
                "UNAUTHENTICATED",
            ),
            (
                RequestError::ReadTimeout,
                C::DeadlineExceeded,
                "REQUEST_READ_TIMEOUT",
            ),
            (
                RequestError::TooLarge { max: 4096 },
                C::OutOfRange,
                "MESSAGE_TOO_LARGE",
            ),
            (
                RequestError::Malformed("truncated message"),
                C::InvalidArgument,
                MALFORMED_REQUEST,
            ),
            (
                RequestError::Decode(decode_error()),
                C::InvalidArgument,
                MALFORMED_REQUEST,
            ),
            (
                RequestError::ReloadUnavailable,
                C::FailedPrecondition,
                "RELOAD_UNAVAILABLE",
            ),
            (
                RequestError::Limit(LimitError::Overloaded),
                C::Unavailable,
                "OVERLOADED",
            ),
            (
                RequestError::Limit(LimitError::InFlight),
                C::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                RequestError::Limit(LimitError::CallerRate),
                C::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                RequestError::Limit(LimitError::PeerRate),
                C::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                RequestError::Limit(LimitError::Timeout),
                C::DeadlineExceeded,
                "REQUEST_TIMEOUT",
            ),
        ];
        for (error, code, reason) in cases {
            check(&format!("{error:?}"), Status::from(error), code, reason);
        }
        let large = Status::from(RequestError::TooLarge { max: 4096 });
        assert_eq!(
            large.message(),
            "request message larger than the limit of 4096 bytes"
        );
        let info = large.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata.get("maxBytes").map(String::as_str),
            Some("4096")
        );
    }

    #[test]
    fn a_refused_reload_is_policy_invalid_and_names_the_key() {
        let error = crate::config::ConfigError::Invalid("callers[1].purposes: unknown".into());
        let status = policy_invalid(&error);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason_of(&status), "POLICY_INVALID");
        assert!(
            status
                .message()
                .starts_with("configuration refused: invalid configuration: callers[1].purposes:"),
            "{status:?}"
        );
    }
}
