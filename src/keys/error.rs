//! The errors of `keys`: the keyring file's ([`KeyringError`]), a secret file's
//! ([`SecretFileError`]), the PKCS#11 provider's ([`HsmError`]) and the one every key
//! operation returns ([`KeyError`]), which holds the others as its causes.
//!
//! A leaf of the folder: the keyring, the index keys, the providers and the manager all
//! return these, so they live below all of them and import none of them.

use std::path::PathBuf;

use crate::crypto::CryptoError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring file {path} does not exist and keys.create_if_missing is false")]
    Missing { path: PathBuf },
    #[error("cannot read or write keyring file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keyring file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// The file is not the keyring's JSON, or the keyring could not be written as JSON.
    #[error("keyring file {path} is malformed: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("keyring file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// A small secret read from a file: the hardware module's PIN, an administrator token.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable or writable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} does not hold a secret of at most {max} bytes of text")]
    Malformed { path: PathBuf, max: u64 },
}

/// What the PKCS#11 provider (`pkcs11.rs`) fails with, besides a KEK the module does not
/// hold ([`KeyError::MaterialMissing`]) and a refused unwrap ([`CryptoError::Integrity`]).
/// Defined here, beside [`KeyError`], so that neither `keys/mod.rs` nor the manager imports
/// the provider.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module's own error (device, session, memory, mechanism).
    #[error("{0}")]
    Module(#[source] cryptoki::error::Error),
    #[error("no token labelled {0}")]
    NoToken(String),
    #[error("the module's KEKs are AES-256: SM4 data keys are wrapped by the local provider")]
    Sm4DataKey,
    #[error("the module returned a wrap of unexpected length")]
    WrapLength,
    /// The thread that makes every module call could not be started.
    #[error("cannot start the PKCS#11 thread")]
    ThreadStart(#[source] std::io::Error),
    /// That thread has ended (the module panicked or the provider is shutting down).
    #[error("the PKCS#11 module's thread has stopped")]
    ThreadGone,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("storage: {0}")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The database names a version whose material this instance cannot find, even after
    /// re-reading it: the instances do not share their keyring, or it was destroyed.
    #[error("key material for KEK version {version} is not available to this instance")]
    MaterialMissing { version: u32 },
    /// Like `MaterialMissing`, for blind-index and pseudonym keys.
    #[error("index keys of version {version} are not available to this instance")]
    IndexMaterialMissing { version: u32 },
    #[error("key version {0} does not exist")]
    NoSuchVersion(u32),
    #[error("key version {version} is {state}; the operation needs it {wanted}")]
    WrongState {
        version: u32,
        state: String,
        wanted: &'static str,
    },
    #[error("key version {version} still wraps (or indexes) {records} records; rewrap them first")]
    InUse { version: u32, records: i64 },
    #[error("hardware security module: {0}")]
    Hsm(#[from] HsmError),
    #[error("hardware security module: {0}")]
    SecretFile(#[from] SecretFileError),
    /// The version that wrapped this data key is destroyed: what it wrapped stays shut, on
    /// every instance, even one that still held the material when it was destroyed.
    #[error("KEK version {version} is destroyed; the data keys it wrapped cannot be opened")]
    Destroyed { version: u32 },
}

impl KeyError {
    /// The reason clients see in this error's ErrorInfo (`grpc/status.rs` picks the code)
    /// and the one a refused call's audit event records: written once, here.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::NoSuchVersion(_) => "KEY_VERSION_NOT_FOUND",
            KeyError::WrongState { .. } => "KEY_VERSION_STATE",
            KeyError::InUse { .. } => "KEY_VERSION_IN_USE",
            KeyError::Destroyed { .. } => "KEY_VERSION_DESTROYED",
            KeyError::Crypto(CryptoError::Integrity) => "CIPHERTEXT_INVALID",
            KeyError::Store(_) => "STORAGE_UNAVAILABLE",
            KeyError::MaterialMissing { .. }
            | KeyError::IndexMaterialMissing { .. }
            | KeyError::Keyring(_)
            | KeyError::Crypto(_)
            | KeyError::Hsm(_)
            | KeyError::SecretFile(_) => "KEY_UNAVAILABLE",
        }
    }
}

impl From<StoreError> for KeyError {
    fn from(error: StoreError) -> KeyError {
        match error {
            StoreError::KeyVersionState { version, state } => KeyError::WrongState {
                version,
                wanted: "in another state",
                state,
            },
            StoreError::KeyVersionInUse { version, records } => {
                KeyError::InUse { version, records }
            }
            other => KeyError::Store(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    /// A storage failure stays the cause of the key error it becomes, so logs that walk
    /// `source()` show it.
    #[test]
    fn a_storage_failure_is_the_key_errors_source() {
        let error = KeyError::from(StoreError::Unavailable("closed".to_owned()));
        assert!(matches!(error, KeyError::Store(_)));
        let source = error.source().expect("the store error is the source");
        assert_eq!(source.to_string(), "database unavailable: closed");
    }
}
