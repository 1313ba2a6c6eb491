//! The key manager: this instance's view of the key versions and the one door to KEKs.
//!
//! It owns the cached active KEK version and the provider that holds the material, and it
//! runs the key-lifecycle operations whose state lives in the database. The caching is safe
//! because the database re-checks the version on every write (see the parent module);
//! [`KeyManager::refresh_active`] is how a stale instance catches up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::crypto::{
    AuditSigningKey, BlindIndexKey, CryptoError, DataKey, PseudonymKey, Suite, parse_wrap_header,
};
use crate::store::{KeyVersionRow, Micros, Rotation, Store, StoreError};

use super::{KekProvider, KeyringError, ResidentKeys};

/// The `key_versions.key_kind` of key-encryption keys.
pub const KEK_KIND: &str = "kek";
/// The `key_versions.key_kind` whose one row pins the blind-index and pseudonym MAC suite
/// (in `provider`): indexes computed with one MAC cannot be matched with another.
pub const INDEX_KIND: &str = "index";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("storage: {0}")]
    Store(StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The database names a version whose material this instance cannot find, even after
    /// re-reading it: the instances do not share their keyring, or it was destroyed.
    #[error("key material for KEK version {version} is not available to this instance")]
    MaterialMissing { version: u32 },
    #[error("KEK version {0} does not exist")]
    NoSuchVersion(u32),
    #[error("KEK version {version} is {state}; the operation needs it {wanted}")]
    WrongState {
        version: u32,
        state: String,
        wanted: &'static str,
    },
    #[error("KEK version {version} still wraps {records} records; rewrap them first")]
    InUse { version: u32, records: i64 },
    #[error("hardware security module: {0}")]
    Hsm(String),
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

/// A key version's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyVersionState {
    /// Wraps new data keys; exactly one version is active.
    Active,
    /// Unwraps only; the rewrap job moves its keys to the active version.
    DecryptOnly,
    /// Wraps nothing any more.
    Retired,
    /// Its material is erased.
    Destroyed,
}

impl KeyVersionState {
    pub fn parse(state: &str) -> Option<KeyVersionState> {
        match state {
            "ACTIVE" => Some(KeyVersionState::Active),
            "DECRYPT_ONLY" => Some(KeyVersionState::DecryptOnly),
            "RETIRED" => Some(KeyVersionState::Retired),
            "DESTROYED" => Some(KeyVersionState::Destroyed),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersionInfo {
    pub version: u32,
    pub state: KeyVersionState,
    pub provider: String,
    pub created_at: Micros,
    pub records: i64,
}

impl TryFrom<KeyVersionRow> for KeyVersionInfo {
    type Error = KeyError;

    fn try_from(row: KeyVersionRow) -> Result<KeyVersionInfo, KeyError> {
        Ok(KeyVersionInfo {
            version: row.version,
            state: KeyVersionState::parse(&row.state).ok_or_else(|| {
                KeyError::Store(StoreError::Corrupt(format!(
                    "unknown key state {:?}",
                    row.state
                )))
            })?,
            provider: row.provider,
            created_at: row.created_at,
            records: row.records,
        })
    }
}

#[derive(Clone, Debug)]
pub struct KeyStatus {
    pub active_version: u32,
    pub versions: Vec<KeyVersionInfo>,
}

/// What `RotateKeyEncryptionKey` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotateOutcome {
    pub active_version: u32,
    /// False when another rotation made `active_version` and this one created nothing.
    pub created: bool,
}

pub struct KeyManager {
    provider: Box<dyn KekProvider>,
    store: Arc<dyn Store>,
    active: AtomicU32,
    suite: Suite,
    blind_index: BlindIndexKey,
    pseudonym: PseudonymKey,
    audit_signing: AuditSigningKey,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("provider", &self.provider.key_id())
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl KeyManager {
    /// Connects the provider to the database's key state: on the first start after the
    /// key-lifecycle migration the versions the provider holds are recorded (the seed's
    /// active one active, the others decrypt-only); afterwards the database decides.
    /// New data keys use `suite`; the index MAC is the suite recorded at the first start.
    pub async fn open(
        provider: Box<dyn KekProvider>,
        seed_active: u32,
        suite: Suite,
        resident: ResidentKeys,
        store: Arc<dyn Store>,
        now: Micros,
    ) -> Result<KeyManager, KeyError> {
        store
            .seed_key_versions(INDEX_KIND, suite.as_str(), &[(1, "ACTIVE")], now)
            .await?;
        let pinned = store
            .key_versions(INDEX_KIND)
            .await?
            .into_iter()
            .find_map(|row| Suite::parse(&row.provider))
            .ok_or_else(|| {
                KeyError::Store(StoreError::Corrupt("no index MAC suite recorded".into()))
            })?;
        if pinned != suite {
            tracing::warn!(
                data_keys = suite.as_str(),
                indexes = pinned.as_str(),
                "new data keys use the configured suite; blind indexes and pseudonyms keep \
                 the suite they were first computed with"
            );
        }
        let blind_index = resident.blind_index.for_suite(pinned);
        let pseudonym = resident.pseudonym.for_suite(pinned);
        let audit_signing = resident.audit_signing;
        let seed: Vec<(u32, &str)> = provider
            .versions()?
            .into_iter()
            .map(|v| {
                (
                    v,
                    if v == seed_active {
                        "ACTIVE"
                    } else {
                        "DECRYPT_ONLY"
                    },
                )
            })
            .collect();
        store
            .seed_key_versions(KEK_KIND, provider.key_id(), &seed, now)
            .await?;
        let manager = KeyManager {
            provider,
            store,
            active: AtomicU32::new(0),
            suite,
            blind_index,
            pseudonym,
            audit_signing,
        };
        manager.refresh_active().await?;
        Ok(manager)
    }

    /// Re-reads the active version from the database, and the provider's material when it
    /// does not hold that version yet.
    pub async fn refresh_active(&self) -> Result<u32, KeyError> {
        let active = self
            .store
            .active_key_version(KEK_KIND)
            .await?
            .ok_or_else(|| KeyError::Store(StoreError::Corrupt("no active KEK version".into())))?;
        if !self.provider.versions()?.contains(&active) {
            self.provider.refresh()?;
            if !self.provider.versions()?.contains(&active) {
                return Err(KeyError::MaterialMissing { version: active });
            }
        }
        self.active.store(active, Ordering::Release);
        Ok(active)
    }

    /// The suite new data keys are made for.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// A fresh data key of the configured suite.
    pub fn generate_data_key(&self) -> Result<DataKey, KeyError> {
        Ok(DataKey::generate_for(self.suite)?)
    }

    /// The active version as this instance last saw it.
    pub fn active_version(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// Wraps a data key under the active version; returns the bytes and the version, which
    /// the write must store (the database re-checks it).
    pub fn wrap(&self, dek: &DataKey, record_id: &str) -> Result<(Vec<u8>, u32), KeyError> {
        let version = self.active_version();
        Ok((self.provider.wrap(version, dek, record_id)?, version))
    }

    /// Unwraps with the version the bytes name, re-reading the provider's material once
    /// when it does not hold that version (another instance may have just created it).
    pub fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError> {
        match self.provider.unwrap(wrapped, record_id) {
            Err(KeyError::MaterialMissing { .. }) => {
                self.provider.refresh()?;
                self.provider.unwrap(wrapped, record_id)
            }
            other => other,
        }
    }

    /// The version a wrapped key names.
    pub fn version_of(wrapped: &[u8]) -> Result<u32, KeyError> {
        Ok(parse_wrap_header(wrapped)?.0.version)
    }

    pub fn blind_index(&self) -> &BlindIndexKey {
        &self.blind_index
    }

    pub fn pseudonym(&self) -> &PseudonymKey {
        &self.pseudonym
    }

    /// The Ed25519 key that signs audit checkpoints and expiry markers.
    pub fn audit_signing(&self) -> &AuditSigningKey {
        &self.audit_signing
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates a new active version unless the active one is no longer `expected` (or, with
    /// `None`, no longer the one this call first saw): concurrent rotations, on any number
    /// of instances, then make exactly one new version.
    pub async fn rotate(
        &self,
        expected: Option<u32>,
        now: Micros,
    ) -> Result<RotateOutcome, KeyError> {
        let expected = match expected {
            Some(version) => version,
            None => self.refresh_active().await?,
        };
        let provision = |version: u32| {
            self.provider
                .provision(version)
                .map_err(|error| error.to_string())
        };
        let rotation = self
            .store
            .rotate_key(KEK_KIND, expected, self.provider.key_id(), now, &provision)
            .await?;
        self.refresh_active().await?;
        Ok(match rotation {
            Rotation::Rotated { version, previous } => {
                tracing::info!(version, previous, "rotated the key-encryption key");
                RotateOutcome {
                    active_version: version,
                    created: true,
                }
            }
            Rotation::NotRotated { active } => RotateOutcome {
                active_version: active,
                created: false,
            },
        })
    }

    pub async fn status(&self) -> Result<KeyStatus, KeyError> {
        let versions = self
            .store
            .key_versions(KEK_KIND)
            .await?
            .into_iter()
            .map(KeyVersionInfo::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let active_version = versions
            .iter()
            .find(|v| v.state == KeyVersionState::Active)
            .map(|v| v.version)
            .unwrap_or(0);
        Ok(KeyStatus {
            active_version,
            versions,
        })
    }

    pub async fn retire(&self, version: u32, now: Micros) -> Result<KeyVersionInfo, KeyError> {
        let row = self
            .store
            .retire_key_version(KEK_KIND, version, now)
            .await
            .map_err(|error| state_error(error, version, "DECRYPT_ONLY"))?;
        KeyVersionInfo::try_from(row)
    }

    /// Erases a retired version's material, then records it destroyed.
    pub async fn destroy(&self, version: u32, now: Micros) -> Result<KeyVersionInfo, KeyError> {
        let destroy = |version: u32| {
            self.provider
                .destroy(version)
                .map_err(|error| error.to_string())
        };
        let row = self
            .store
            .destroy_key_version(KEK_KIND, version, now, &destroy)
            .await
            .map_err(|error| state_error(error, version, "RETIRED"))?;
        tracing::warn!(version, "destroyed a key-encryption key version");
        KeyVersionInfo::try_from(row)
    }

    /// The closure a rewrap batch applies to each record: unwrap under whatever version the
    /// key names, wrap under `target`. Field data is never touched.
    pub fn rewrapper(
        &self,
        target: u32,
    ) -> impl Fn(&str, &[u8]) -> Option<Vec<u8>> + Send + Sync + '_ {
        move |record_id: &str, wrapped: &[u8]| {
            let dek = match self.unwrap(wrapped, record_id) {
                Ok(dek) => dek,
                Err(error) => {
                    tracing::error!(%error, record_id, "cannot unwrap a data key for rewrap");
                    return None;
                }
            };
            match self.provider.wrap(target, &dek, record_id) {
                Ok(rewrapped) => Some(rewrapped),
                Err(error) => {
                    tracing::error!(%error, record_id, "cannot wrap a data key for rewrap");
                    None
                }
            }
        }
    }
}

fn state_error(error: StoreError, version: u32, wanted: &'static str) -> KeyError {
    match error {
        StoreError::NotFound => KeyError::NoSuchVersion(version),
        StoreError::KeyVersionState { version, state } => KeyError::WrongState {
            version,
            state,
            wanted,
        },
        other => other.into(),
    }
}
