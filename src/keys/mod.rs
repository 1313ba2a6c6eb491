//! Keys: the keyring file, the providers that hold key-encryption keys (KEKs), and the key
//! lifecycle (rotate, rewrap, retire, destroy).
//!
//! # Where key material and key state live
//!
//! *State* (which KEK version is `ACTIVE`, `DECRYPT_ONLY`, `RETIRED` or `DESTROYED`) lives in
//! the database, table `key_versions`, because every instance sharing a database must agree
//! on it; a partial unique index keeps exactly one version active. *Material* never enters
//! the database: a database backup must not carry the keys that open it, or destroying a
//! version would not reach the backups. Material lives with a [`KekProvider`]:
//!
//! - the local keyring file (mode 0600, [`local`]), the embedded default. Instances that
//!   share a database must share the keyring file too (one host, or a shared secret mount
//!   such as a Kubernetes secret volume or an NFS path only the vault can read). Rotation
//!   appends the new version to that file while holding the database's key-admin lock, and
//!   only then commits the new state, so the database never names a version whose material
//!   was not written first.
//! - a PKCS#11 module ([`crate::keys::pkcs11`]), where material never leaves the module.
//!
//! # How an instance learns about a version another instance created
//!
//! Lazily and safely. Each instance caches the active version number. Every write of a
//! wrapped key checks, in its own transaction, that the version it wrapped under is still
//! `ACTIVE`, taking a share lock on that `key_versions` row (PostgreSQL; SQLite has a single
//! writer). A stale instance gets [`crate::store::StoreError::StaleKeyVersion`], re-reads the
//! active version from the database, re-reads the keyring file if it does not hold that
//! version, re-wraps and retries. On a read, a wrapped key naming a version the provider
//! does not hold makes the provider re-read its material once before failing. So no record
//! is ever written under a version that is being retired, and no instance needs a restart.
//!
//! # Blind-index and pseudonym keys
//!
//! They are versioned too (`key_versions` kind `index`), and [`index`] holds them. Their
//! material is always in the keyring file, whatever holds the KEKs: lookups MAC in memory.
//! A record names the index version its blind indexes were computed with; lookups compute
//! the candidate index under every live version, the rewrap job moves records to the active
//! one (`vault/reindex.rs`), and a version nothing uses any more can be retired and destroyed
//! like a KEK version. Keyring files written before index keys had versions (a single
//! `blind_index_key` and `pseudonym_key`) read as index version 1, and are rewritten in the
//! versioned form on their first edit.
//!
//! # Destruction and backups
//!
//! `DestroyKeyVersion` removes the version's material from the provider (rewriting the
//! keyring file atomically, or destroying the module's object). A deleted record's wrapped
//! key is gone from the live database, and once every KEK version that ever wrapped it has
//! been destroyed, no copy of the database, however old, can be opened for that person.
//! Records that still exist keep their data key across rewraps, so their ciphertexts in an
//! old copy open with the key the live database holds. This holds only if the keyring file
//! itself is not backed up with the database; keep it out of database backups.
//!
//! Other instances learn of a destruction from the database: every unwrap checks the
//! version's state there (cached briefly), and a background task drops the material and
//! cached data keys of destroyed versions ([`manager::watch_key_states`]).
//!
//! # Secret files
//!
//! The keyring, the PKCS#11 PIN file and the administrator token are refused when group or
//! others may read or write them ([`read_secret_file`] for the small ones).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use data_encoding::BASE64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{
    AuditSigningKey, BlindIndexKey, CryptoError, DataKey, Kek, PseudonymKey, SecretKey,
    parse_wrap_header,
};

pub mod error;
pub mod index;
pub mod local;
pub mod manager;
pub mod pkcs11;

pub use error::{HsmError, KeyError, KeyringError, SecretFileError};
pub use index::{IndexKeyPair, IndexKeys};
pub use local::LocalKekProvider;
pub use manager::{KeyKind, KeyManager, KeyStatus, KeyVersionInfo, KeyVersionState, RotateOutcome};

/// Holds KEK material and performs wrap and unwrap with it. The methods are synchronous,
/// and each implementation keeps them off the async workers' time in its own way: the local
/// provider wraps and unwraps in memory and touches the keyring file only to provision,
/// destroy or re-read versions (a small file, rarely); the PKCS#11
/// provider hands every module call to the module's own thread and waits for the answer,
/// announced with `tokio::task::block_in_place` on a worker, so a slow device never holds
/// a worker's other tasks (see [`pkcs11`], "The module's thread").
pub trait KekProvider: Send + Sync + 'static {
    /// The name wrapped keys carry for this provider (`local`, `hsm`).
    fn key_id(&self) -> &str;
    /// Versions whose material this provider holds right now.
    fn versions(&self) -> Result<Vec<u32>, KeyError>;
    /// Wraps `dek` for `record_id` under `version`.
    fn wrap(&self, version: u32, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, KeyError>;
    /// Unwraps with the version the bytes name.
    fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError>;
    /// Creates material for a new `version`, replacing any orphan left by a rotation whose
    /// database commit failed. Called under the database's key-admin lock.
    fn provision(&self, version: u32) -> Result<(), KeyError>;
    /// Erases `version`'s material irreversibly. Idempotent.
    fn destroy(&self, version: u32) -> Result<(), KeyError>;
    /// Drops whatever this instance holds in memory for `version` (material, cached data
    /// keys it wrapped) after another instance destroyed it. Idempotent.
    fn forget(&self, version: u32) -> Result<(), KeyError>;
    /// Re-reads material another instance may have added or removed.
    fn refresh(&self) -> Result<(), KeyError>;
}

/// Name under which the local keyring's KEKs appear in wrapped keys.
pub const LOCAL_KEY_ID: &str = "local";
/// Format 1 held one blind-index and one pseudonym key; format 2 holds index versions.
const KEYRING_FORMAT: u32 = 2;
const KEYRING_FORMAT_SINGLE_INDEX_KEY: u32 = 1;

/// Keys the vault needs in memory whatever provider holds its KEKs: lookups and pseudonyms
/// need the MAC keys (every index version the file holds), and audit checkpoints the
/// signing key.
#[derive(Debug)]
pub struct ResidentKeys {
    pub index: BTreeMap<u32, IndexKeyPair>,
    /// The index version the file names as active: only a seed for an empty database.
    pub active_index_version: u32,
    pub audit_signing: AuditSigningKey,
}

/// The keys the vault holds in memory. Every key zeroises on drop.
#[derive(Debug)]
pub struct Keyring {
    keks: BTreeMap<u32, Kek>,
    active_version: u32,
    index: BTreeMap<u32, IndexKeyPair>,
    active_index_version: u32,
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
        let mut file: KeyringFile =
            serde_json::from_str(&text).map_err(|source| KeyringError::Json {
                path: path.to_owned(),
                source,
            })?;
        file.upgrade().map_err(malformed)?;
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
        let mut index = BTreeMap::new();
        for entry in &file.index_keys {
            let bad = |what: &str| {
                malformed(format!(
                    "index version {} {what} is not a base64 256-bit key",
                    entry.version
                ))
            };
            let blind_index =
                decode_key(&entry.blind_index_key).map_err(|_| bad("blind_index_key"))?;
            let pseudonym = decode_key(&entry.pseudonym_key).map_err(|_| bad("pseudonym_key"))?;
            index.insert(
                entry.version,
                IndexKeyPair {
                    blind_index: BlindIndexKey::new(blind_index),
                    pseudonym: PseudonymKey::new(pseudonym),
                },
            );
        }
        let active_index_version = file.active_index_version.unwrap_or(1);
        if !index.contains_key(&active_index_version) {
            return Err(malformed(format!(
                "active_index_version {active_index_version} has no key"
            )));
        }
        let audit_signing = decode_key(&file.audit_signing_key)
            .map_err(|_| malformed("audit_signing_key is not a base64 256-bit seed".into()))?;
        Ok(Keyring {
            keks,
            active_version: file.active_version,
            index,
            active_index_version,
            audit_signing: AuditSigningKey::new(audit_signing),
        })
    }

    /// A keyring that lives only in memory, for tests and benchmarks.
    pub fn ephemeral() -> Result<Keyring, CryptoError> {
        let mut keks = BTreeMap::new();
        keks.insert(1, Kek::new(LOCAL_KEY_ID, 1, SecretKey::generate()?));
        let mut index = BTreeMap::new();
        index.insert(
            1,
            IndexKeyPair {
                blind_index: BlindIndexKey::new(SecretKey::generate()?),
                pseudonym: PseudonymKey::new(SecretKey::generate()?),
            },
        );
        Ok(Keyring {
            keks,
            active_version: 1,
            index,
            active_index_version: 1,
            audit_signing: AuditSigningKey::new(SecretKey::generate()?),
        })
    }

    /// The version the file names as active: only a seed for an empty `key_versions` table;
    /// afterwards the database decides.
    pub fn active_version(&self) -> u32 {
        self.active_version
    }

    /// Splits the keyring into its KEKs and the keys that always stay in memory.
    pub fn into_parts(self) -> (BTreeMap<u32, Kek>, ResidentKeys) {
        (
            self.keks,
            ResidentKeys {
                index: self.index,
                active_index_version: self.active_index_version,
                audit_signing: self.audit_signing,
            },
        )
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

    /// The index version the file names as active.
    pub fn active_index_version(&self) -> u32 {
        self.active_index_version
    }

    /// The blind-index and pseudonym keys of one index version.
    pub fn index_keys(&self, version: u32) -> Option<&IndexKeyPair> {
        self.index.get(&version)
    }

    /// Splits off the index keys, for the index-key holder that re-reads the file.
    pub(crate) fn into_index_keys(self) -> BTreeMap<u32, IndexKeyPair> {
        self.index
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
    /// Format 1 only: the one blind-index key, read as index version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blind_index_key: Option<Zeroizing<String>>,
    /// Format 1 only: the one pseudonym key, read as index version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pseudonym_key: Option<Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active_index_version: Option<u32>,
    #[serde(default)]
    index_keys: Vec<IndexKeyEntry>,
    /// Ed25519 seed that signs audit checkpoints.
    audit_signing_key: Zeroizing<String>,
}

impl KeyringFile {
    /// Brings a format-1 file (single index keys) to format 2 in memory: its keys become
    /// index version 1. Writing the result back is up to the caller.
    fn upgrade(&mut self) -> Result<(), String> {
        match self.format {
            KEYRING_FORMAT => {
                if self.index_keys.is_empty() || self.active_index_version.is_none() {
                    return Err("format 2 without index_keys or active_index_version".into());
                }
                Ok(())
            }
            KEYRING_FORMAT_SINGLE_INDEX_KEY => {
                let (Some(blind_index_key), Some(pseudonym_key)) =
                    (self.blind_index_key.take(), self.pseudonym_key.take())
                else {
                    return Err("format 1 without blind_index_key and pseudonym_key".into());
                };
                self.index_keys = vec![IndexKeyEntry {
                    version: 1,
                    created_at: String::new(),
                    blind_index_key,
                    pseudonym_key,
                }];
                self.active_index_version = Some(1);
                self.format = KEYRING_FORMAT;
                Ok(())
            }
            other => Err(format!("unknown format {other}")),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct IndexKeyEntry {
    version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    created_at: String,
    blind_index_key: Zeroizing<String>,
    pseudonym_key: Zeroizing<String>,
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
            .decode(encoded.trim().as_bytes())
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
        blind_index_key: None,
        pseudonym_key: None,
        active_index_version: Some(1),
        index_keys: vec![new_index_entry(1)?],
        audit_signing_key: encode_key(&SecretKey::generate()?),
    };
    let json = Zeroizing::new(serde_json::to_string_pretty(&file).map_err(|source| {
        KeyringError::Json {
            path: path.to_owned(),
            source,
        }
    })?);
    write_private_file(path, json.as_bytes()).map_err(|source| KeyringError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Adds fresh material for KEK `version` to the keyring file and names it active there,
/// replacing an entry of the same version (an orphan of a rotation that never committed).
pub fn add_kek_version(path: &Path, version: u32) -> Result<(), KeyringError> {
    edit_keyring_file(path, |file| {
        file.keks.retain(|entry| entry.version != version);
        file.keks.push(KekEntry {
            version,
            created_at: chrono::Utc::now().to_rfc3339(),
            key: encode_key(&SecretKey::generate()?),
        });
        file.active_version = version;
        Ok(())
    })
}

fn new_index_entry(version: u32) -> Result<IndexKeyEntry, CryptoError> {
    Ok(IndexKeyEntry {
        version,
        created_at: chrono::Utc::now().to_rfc3339(),
        blind_index_key: encode_key(&SecretKey::generate()?),
        pseudonym_key: encode_key(&SecretKey::generate()?),
    })
}

/// Adds fresh blind-index and pseudonym keys for index `version` to the keyring file and
/// names it active there, replacing an orphan of the same version.
pub fn add_index_version(path: &Path, version: u32) -> Result<(), KeyringError> {
    edit_keyring_file(path, |file| {
        file.index_keys.retain(|entry| entry.version != version);
        file.index_keys.push(new_index_entry(version)?);
        file.active_index_version = Some(version);
        Ok(())
    })
}

/// Removes index `version`'s keys from the keyring file; removing one the file does not
/// hold is not an error, so a destroy can be retried.
pub fn remove_index_version(path: &Path, version: u32) -> Result<(), KeyringError> {
    edit_keyring_file(path, |file| {
        if file.active_index_version == Some(version) {
            return Err(KeyringError::Malformed {
                path: path.to_owned(),
                reason: format!(
                    "refusing to remove index version {version}, the file's active one"
                ),
            });
        }
        file.index_keys.retain(|entry| entry.version != version);
        Ok(())
    })
}

/// Removes KEK `version`'s material from the keyring file. Removing a version the file does
/// not hold is not an error, so a destroy that failed after this step can be retried.
pub fn remove_kek_version(path: &Path, version: u32) -> Result<(), KeyringError> {
    edit_keyring_file(path, |file| {
        if file.active_version == version {
            return Err(KeyringError::Malformed {
                path: path.to_owned(),
                reason: format!("refusing to remove version {version}, the file's active one"),
            });
        }
        file.keks.retain(|entry| entry.version != version);
        Ok(())
    })
}

/// Read, change, and atomically replace the keyring file: the new content is written to a
/// private temporary file, synced, and renamed over the old one, so a crash leaves either
/// the old file or the new one, never a torn one.
fn edit_keyring_file(
    path: &Path,
    change: impl FnOnce(&mut KeyringFile) -> Result<(), KeyringError>,
) -> Result<(), KeyringError> {
    let io = |source| KeyringError::Io {
        path: path.to_owned(),
        source,
    };
    check_permissions(path)?;
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    let malformed = |reason: String| KeyringError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let mut file: KeyringFile =
        serde_json::from_str(&text).map_err(|source| KeyringError::Json {
            path: path.to_owned(),
            source,
        })?;
    file.upgrade().map_err(malformed)?;
    change(&mut file)?;
    let json = Zeroizing::new(serde_json::to_string_pretty(&file).map_err(|source| {
        KeyringError::Json {
            path: path.to_owned(),
            source,
        }
    })?);
    let temporary = path.with_extension("json.tmp");
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
        _ => {}
    }
    write_private_file(&temporary, json.as_bytes()).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        // Makes the rename itself durable.
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
    }
    Ok(())
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

/// The permission bits of a file group or others may read or write, which no file holding a
/// secret may be (the same rule as the keyring's).
pub fn exposed_mode(metadata: &std::fs::Metadata) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some(mode);
        }
    }
    let _ = metadata;
    None
}

/// Reads the secret in `path` (surrounding whitespace trimmed), refusing a file group or
/// others can read or write. The mode is checked on the opened file, so a swap between the
/// check and the read is refused too, and every copy of the secret lives in a buffer that
/// wipes itself: the file is read into one allocated once at the file's size.
pub fn read_secret_file(path: &Path, max: u64) -> Result<Zeroizing<String>, SecretFileError> {
    use std::io::Read;
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let malformed = || SecretFileError::Malformed {
        path: path.to_owned(),
        max,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
    if let Some(mode) = exposed_mode(&metadata) {
        return Err(SecretFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if metadata.len() > max {
        return Err(malformed());
    }
    // One byte more than the file holds, so reading to the end never reallocates (which
    // would leave an unwiped copy behind).
    let mut bytes = Zeroizing::new(Vec::with_capacity(metadata.len() as usize + 1));
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(malformed());
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed())?.trim();
    if text.is_empty() {
        return Err(malformed());
    }
    Ok(Zeroizing::new(text.to_owned()))
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
        let phone = |ring: &Keyring| {
            ring.index_keys(1)
                .unwrap()
                .blind_index
                .phone("+8613812345678")
        };
        assert_eq!(phone(&first), phone(&second));
    }

    /// Keyring keys are standard padded base64 as the `base64` crate read and wrote them
    /// before `data-encoding` took its place: the same text both ways, and the url-safe
    /// alphabet, missing padding or a short key are refused as before.
    #[test]
    fn keys_are_standard_padded_base64() {
        let text = "4OHi4+Tl5ufo6err7O3u7/Dx8vP09fb3+Pn6+/z9/v8=";
        let key = decode_key(text).unwrap();
        assert_eq!(key.expose().to_vec(), (0xe0..=0xffu8).collect::<Vec<_>>());
        assert_eq!(encode_key(&key).as_str(), text);
        assert!(decode_key(&format!(" {text}\n")).is_ok());
        for refused in [
            text.trim_end_matches('='),
            "4OHi4-Tl5ufo6err7O3u7_Dx8vP09fb3-Pn6-_z9_v8=",
            &text[4..],
        ] {
            assert_eq!(decode_key(refused).unwrap_err(), CryptoError::KeyLength);
        }
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

    #[cfg(unix)]
    #[test]
    fn secret_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        write_private_file(&path, b" 1234\n").unwrap();
        assert_eq!(read_secret_file(&path, 64).unwrap().as_str(), "1234");
        for mode in [0o640, 0o604, 0o620, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            match read_secret_file(&path, 64) {
                Err(SecretFileError::Exposed { mode: found, .. }) => assert_eq!(found, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_secret_file(&path, 64).is_ok());
        assert!(matches!(
            read_secret_file(&path, 3),
            Err(SecretFileError::Malformed { .. })
        ));
        let empty = dir.path().join("empty");
        write_private_file(&empty, b"\n").unwrap();
        assert!(matches!(
            read_secret_file(&empty, 64),
            Err(SecretFileError::Malformed { .. })
        ));
    }

    #[test]
    fn added_versions_reload_and_removed_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = Keyring::load_or_create(&path, true).unwrap();
        let dek = DataKey::generate().unwrap();
        let under_v1 = first.wrap(&dek, "r1").unwrap();
        add_kek_version(&path, 2).unwrap();
        let second = Keyring::load(&path).unwrap();
        assert_eq!(second.active_version(), 2);
        assert!(second.unwrap(&under_v1, "r1").is_ok());
        assert!(
            remove_kek_version(&path, 2).is_err(),
            "the active one stays"
        );
        remove_kek_version(&path, 1).unwrap();
        remove_kek_version(&path, 1).unwrap();
        let third = Keyring::load(&path).unwrap();
        assert!(matches!(
            third.unwrap(&under_v1, "r1"),
            Err(CryptoError::UnknownKey { version: 1, .. })
        ));
        // The rewritten file is still private, and no temporary file is left behind.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn a_single_index_key_file_reads_as_index_version_1_and_gains_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = Keyring::load_or_create(&path, true).unwrap();
        // Rewrite the file the way keyrings were written before index keys had versions.
        let mut file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let index = file["index_keys"][0].clone();
        let object = file.as_object_mut().unwrap();
        object.remove("index_keys");
        object.remove("active_index_version");
        object.insert("format".into(), 1.into());
        object.insert("blind_index_key".into(), index["blind_index_key"].clone());
        object.insert("pseudonym_key".into(), index["pseudonym_key"].clone());
        std::fs::remove_file(&path).unwrap();
        write_private_file(&path, file.to_string().as_bytes()).unwrap();

        let old = Keyring::load(&path).unwrap();
        assert_eq!(old.active_index_version(), 1);
        let phone = |ring: &Keyring, version| {
            ring.index_keys(version)
                .unwrap()
                .blind_index
                .phone("+8613812345678")
        };
        assert_eq!(phone(&old, 1), phone(&first, 1));

        add_index_version(&path, 2).unwrap();
        let upgraded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(upgraded["format"], 2);
        assert!(upgraded.get("blind_index_key").is_none());
        let both = Keyring::load(&path).unwrap();
        assert_eq!(both.active_index_version(), 2);
        assert_eq!(phone(&both, 1), phone(&first, 1), "version 1 kept its key");
        assert_ne!(phone(&both, 2), phone(&first, 1));
        assert!(
            remove_index_version(&path, 2).is_err(),
            "the active one stays"
        );
        remove_index_version(&path, 1).unwrap();
        remove_index_version(&path, 1).unwrap();
        assert!(Keyring::load(&path).unwrap().index_keys(1).is_none());
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
