//! The key ring: which key-encryption keys exist, which one wraps new data keys, and the
//! separate keys for blind indexes and pseudonyms.
//!
//! Key material is loaded from a keyring file. In the embedded default the file is created
//! on first start inside the data directory with mode 0600; in production it is provisioned
//! out of band and named in config (`keys.keyring_path`, `keys.create_if_missing = false`).
//! This module owns that file I/O so that [`crate::crypto`] never touches the filesystem.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{
    AuditSigningKey, BlindIndexKey, CryptoError, DataKey, Kek, PseudonymKey, SecretKey,
    parse_wrap_header,
};

/// Name under which the local keyring's KEKs appear in wrapped keys.
pub const LOCAL_KEY_ID: &str = "local";
const KEYRING_FORMAT: u32 = 1;

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
    #[error("keyring file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// The keys the vault holds in memory. Every key zeroises on drop.
#[derive(Debug)]
pub struct Keyring {
    keks: BTreeMap<u32, Kek>,
    active_version: u32,
    blind_index: BlindIndexKey,
    pseudonym: PseudonymKey,
    audit_signing: AuditSigningKey,
}

impl Keyring {
    /// Loads the keyring at `path`, creating a fresh one there first when allowed.
    pub fn load_or_create(path: &Path, create_if_missing: bool) -> Result<Keyring, KeyringError> {
        if !path.exists() {
            if !create_if_missing {
                return Err(KeyringError::Missing {
                    path: path.to_owned(),
                });
            }
            write_new_keyring(path)?;
            tracing::info!(path = %path.display(), "created a new local keyring");
        }
        Keyring::load(path)
    }

    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        check_permissions(path)?;
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| KeyringError::Io {
                    path: path.to_owned(),
                    source,
                })?,
            );
        let malformed = |reason: String| KeyringError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let file: KeyringFile =
            serde_json::from_str(&text).map_err(|e| malformed(format!("{e}")))?;
        if file.format != KEYRING_FORMAT {
            return Err(malformed(format!("unknown format {}", file.format)));
        }
        let mut keks = BTreeMap::new();
        for entry in &file.keks {
            let key = decode_key(&entry.key).map_err(|_| {
                malformed(format!(
                    "KEK version {} is not a base64 256-bit key",
                    entry.version
                ))
            })?;
            keks.insert(entry.version, Kek::new(LOCAL_KEY_ID, entry.version, key));
        }
        if !keks.contains_key(&file.active_version) {
            return Err(malformed(format!(
                "active_version {} has no key",
                file.active_version
            )));
        }
        let blind_index = decode_key(&file.blind_index_key)
            .map_err(|_| malformed("blind_index_key is not a base64 256-bit key".into()))?;
        let pseudonym = decode_key(&file.pseudonym_key)
            .map_err(|_| malformed("pseudonym_key is not a base64 256-bit key".into()))?;
        let audit_signing = decode_key(&file.audit_signing_key)
            .map_err(|_| malformed("audit_signing_key is not a base64 256-bit seed".into()))?;
        Ok(Keyring {
            keks,
            active_version: file.active_version,
            blind_index: BlindIndexKey::new(blind_index),
            pseudonym: PseudonymKey::new(pseudonym),
            audit_signing: AuditSigningKey::new(audit_signing),
        })
    }

    /// A keyring that lives only in memory, for tests and benchmarks.
    pub fn ephemeral() -> Result<Keyring, CryptoError> {
        let mut keks = BTreeMap::new();
        keks.insert(1, Kek::new(LOCAL_KEY_ID, 1, SecretKey::generate()?));
        Ok(Keyring {
            keks,
            active_version: 1,
            blind_index: BlindIndexKey::new(SecretKey::generate()?),
            pseudonym: PseudonymKey::new(SecretKey::generate()?),
            audit_signing: AuditSigningKey::new(SecretKey::generate()?),
        })
    }

    pub fn active_kek(&self) -> &Kek {
        &self.keks[&self.active_version]
    }

    /// Wraps a record's data key under the active KEK.
    pub fn wrap(&self, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, CryptoError> {
        self.active_kek().wrap(dek, record_id)
    }

    /// Unwraps with whichever KEK version the wrapped bytes name.
    pub fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, CryptoError> {
        let (reference, _) = parse_wrap_header(wrapped)?;
        match self.keks.get(&reference.version) {
            Some(kek) if reference.key_id == LOCAL_KEY_ID => kek.unwrap(wrapped, record_id),
            _ => Err(CryptoError::UnknownKey {
                key_id: reference.key_id,
                version: reference.version,
            }),
        }
    }

    pub fn blind_index(&self) -> &BlindIndexKey {
        &self.blind_index
    }

    pub fn pseudonym(&self) -> &PseudonymKey {
        &self.pseudonym
    }

    pub fn audit_signing(&self) -> &AuditSigningKey {
        &self.audit_signing
    }
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    format: u32,
    active_version: u32,
    keks: Vec<KekEntry>,
    blind_index_key: Zeroizing<String>,
    pseudonym_key: Zeroizing<String>,
    /// Ed25519 seed that signs audit checkpoints.
    audit_signing_key: Zeroizing<String>,
}

#[derive(Serialize, Deserialize)]
struct KekEntry {
    version: u32,
    created_at: String,
    key: Zeroizing<String>,
}

fn decode_key(encoded: &str) -> Result<SecretKey, CryptoError> {
    let mut bytes = Zeroizing::new(
        BASE64
            .decode(encoded.trim())
            .map_err(|_| CryptoError::KeyLength)?,
    );
    SecretKey::from_bytes(&mut bytes)
}

fn encode_key(key: &SecretKey) -> Zeroizing<String> {
    Zeroizing::new(BASE64.encode(key.expose()))
}

fn write_new_keyring(path: &Path) -> Result<(), KeyringError> {
    let file = KeyringFile {
        format: KEYRING_FORMAT,
        active_version: 1,
        keks: vec![KekEntry {
            version: 1,
            created_at: chrono::Utc::now().to_rfc3339(),
            key: encode_key(&SecretKey::generate()?),
        }],
        blind_index_key: encode_key(&SecretKey::generate()?),
        pseudonym_key: encode_key(&SecretKey::generate()?),
        audit_signing_key: encode_key(&SecretKey::generate()?),
    };
    let json = Zeroizing::new(serde_json::to_string_pretty(&file).map_err(|e| {
        KeyringError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })?);
    write_private_file(path, json.as_bytes()).map_err(|source| KeyringError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with mode 0600 from the start (never world-readable, not even briefly) and
/// refuses to overwrite an existing file.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn check_permissions(path: &Path) -> Result<(), KeyringError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).map_err(|source| KeyringError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keyring_is_private_and_reloads_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = Keyring::load_or_create(&path, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let dek = DataKey::generate().unwrap();
        let wrapped = first.wrap(&dek, "r1").unwrap();
        let second = Keyring::load_or_create(&path, true).unwrap();
        assert!(second.unwrap(&wrapped, "r1").is_ok());
        assert_eq!(
            first.blind_index().phone("+8613812345678"),
            second.blind_index().phone("+8613812345678")
        );
    }

    #[test]
    fn missing_keyring_is_an_error_when_creation_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let err = Keyring::load_or_create(&dir.path().join("k.json"), false).unwrap_err();
        assert!(matches!(err, KeyringError::Missing { .. }));
    }

    #[cfg(unix)]
    #[test]
    fn group_readable_keyring_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::load_or_create(&path, true).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyringError::Permissions { .. })
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let ring = Keyring::ephemeral().unwrap();
        let printed = format!("{ring:?}");
        // One KEK, the blind-index key and the pseudonym key, each redacted.
        assert_eq!(printed.matches("SecretKey(<redacted>)").count(), 3);
        assert!(printed.contains("AuditSigningKey(<redacted>)"));
    }
}
