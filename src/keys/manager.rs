//! The key manager: this instance's view of the key versions and the one door to KEKs and
//! index keys.
//!
//! It owns the cached active KEK version and the provider that holds the material, the
//! cached index view (the active index version and the live ones, which lookups compute
//! candidates for) with the index keys, and it runs the key-lifecycle operations whose state
//! lives in the database. The caching is safe because the database re-checks the versions
//! on every write (see the parent module), and lookups re-check the live index versions
//! after they ran; [`KeyManager::refresh_active`] and [`KeyManager::refresh_index`] are how
//! a stale instance catches up.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use crate::crypto::{AuditSigningKey, CryptoError, DataKey, Suite, parse_wrap_header};
use crate::store::{KeyVersionRow, Micros, Rotation, Store, StoreError};

use super::{IndexKeyPair, IndexKeys, KekProvider, KeyringError, ResidentKeys};

/// The `key_versions.key_kind` of key-encryption keys.
pub const KEK_KIND: &str = "kek";
/// The `key_versions.key_kind` of blind-index and pseudonym key versions. Their `provider`
/// column pins the MAC suite (the one of the first start): indexes computed with one MAC
/// cannot be matched with another, so every index version uses it.
pub const INDEX_KIND: &str = "index";

/// Which key a lifecycle operation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Key-encryption keys: wrap the records' data keys.
    Kek,
    /// Blind-index and pseudonym keys (one version covers both).
    Index,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Kek => KEK_KIND,
            KeyKind::Index => INDEX_KIND,
        }
    }
}

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

/// This instance's view of the index versions, as the database last told it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IndexView {
    active: u32,
    /// The active version first, then the decrypt-only ones (which may still index records).
    live: Vec<u32>,
}

pub struct KeyManager {
    provider: Box<dyn KekProvider>,
    store: Arc<dyn Store>,
    active: AtomicU32,
    suite: Suite,
    index: IndexKeys,
    index_suite: Suite,
    index_view: RwLock<IndexView>,
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
    /// Index keys are re-read from `keyring_path` when another instance rotated them.
    pub async fn open(
        provider: Box<dyn KekProvider>,
        seed_active: u32,
        suite: Suite,
        resident: ResidentKeys,
        keyring_path: Option<&Path>,
        store: Arc<dyn Store>,
        now: Micros,
    ) -> Result<KeyManager, KeyError> {
        let index_seed: Vec<(u32, &str)> = resident
            .index
            .keys()
            .map(|&v| {
                let state = if v == resident.active_index_version {
                    "ACTIVE"
                } else {
                    "DECRYPT_ONLY"
                };
                (v, state)
            })
            .collect();
        store
            .seed_key_versions(INDEX_KIND, suite.as_str(), &index_seed, now)
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
        let index = IndexKeys::new(keyring_path, pinned, resident.index);
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
            index,
            index_suite: pinned,
            index_view: RwLock::new(IndexView::default()),
            audit_signing,
        };
        manager.refresh_active().await?;
        manager.refresh_index().await?;
        Ok(manager)
    }

    /// Re-reads the active and live index versions from the database, and the keyring
    /// file when it lacks one of them. Returns the active index version.
    pub async fn refresh_index(&self) -> Result<u32, KeyError> {
        let view = self.read_index_view().await?;
        if view != self.index_view() {
            // Versions were added or retired (perhaps destroyed) elsewhere: re-read the
            // file, which also drops destroyed keys from this instance's memory.
            self.index.refresh()?;
        }
        for &version in &view.live {
            self.index.get(version)?;
        }
        let active = view.active;
        *self.index_view.write().unwrap_or_else(|e| e.into_inner()) = view;
        Ok(active)
    }

    async fn read_index_view(&self) -> Result<IndexView, KeyError> {
        let states = self.store.key_version_states(INDEX_KIND).await?;
        let active = states
            .iter()
            .find(|(_, state)| state == "ACTIVE")
            .map(|(version, _)| *version)
            .ok_or_else(|| {
                KeyError::Store(StoreError::Corrupt("no active index version".into()))
            })?;
        let mut live = vec![active];
        live.extend(
            states
                .iter()
                .filter(|(_, state)| state == "DECRYPT_ONLY")
                .map(|(version, _)| *version),
        );
        Ok(IndexView { active, live })
    }

    fn index_view(&self) -> IndexView {
        self.index_view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the live index versions this instance computes lookups for are still the
    /// database's; if not, catches up and returns false (the caller looks up again). Run
    /// after a lookup: a record re-indexed to a version this instance did not know yet was
    /// re-indexed after that version became active, so a check that still sees the old
    /// set proves the lookup's snapshot held every record under a version it computed for.
    pub async fn index_view_is_current(&self) -> Result<bool, KeyError> {
        let current = self.read_index_view().await?;
        let mine = self.index_view();
        if current == mine {
            return Ok(true);
        }
        let covered = current.live.iter().all(|v| mine.live.contains(v));
        self.refresh_index().await?;
        Ok(covered)
    }

    /// The active index version and its keys: what new indexes, new age gates and released
    /// pseudonyms use.
    pub fn active_index(&self) -> Result<(u32, Arc<IndexKeyPair>), KeyError> {
        let active = self.index_view().active;
        Ok((active, self.index.get(active)?))
    }

    /// Every live index version with its keys, the active one first: a lookup or a
    /// uniqueness check computes its candidate under each.
    pub fn live_index_keys(&self) -> Result<Vec<(u32, Arc<IndexKeyPair>)>, KeyError> {
        self.index_view()
            .live
            .into_iter()
            .map(|version| Ok((version, self.index.get(version)?)))
            .collect()
    }

    /// The keys of one index version (a record's, to open its age gate).
    pub fn index_keys(&self, version: u32) -> Result<Arc<IndexKeyPair>, KeyError> {
        self.index.get(version)
    }

    /// The MAC suite every index version uses.
    pub fn index_suite(&self) -> Suite {
        self.index_suite
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
        kind: KeyKind,
        expected: Option<u32>,
        now: Micros,
    ) -> Result<RotateOutcome, KeyError> {
        let expected = match expected {
            Some(version) => version,
            None => self.refresh(kind).await?,
        };
        let provision = |version: u32| {
            match kind {
                KeyKind::Kek => self.provider.provision(version),
                KeyKind::Index => self.index.provision(version),
            }
            .map_err(|error| error.to_string())
        };
        let provider = match kind {
            KeyKind::Kek => self.provider.key_id(),
            KeyKind::Index => self.index_suite.as_str(),
        };
        let rotation = self
            .store
            .rotate_key(kind.as_str(), expected, provider, now, &provision)
            .await?;
        self.refresh(kind).await?;
        Ok(match rotation {
            Rotation::Rotated { version, previous } => {
                tracing::info!(kind = kind.as_str(), version, previous, "rotated a key");
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

    async fn refresh(&self, kind: KeyKind) -> Result<u32, KeyError> {
        match kind {
            KeyKind::Kek => self.refresh_active().await,
            KeyKind::Index => self.refresh_index().await,
        }
    }

    pub async fn status(&self, kind: KeyKind) -> Result<KeyStatus, KeyError> {
        let versions = self
            .store
            .key_versions(kind.as_str())
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

    pub async fn retire(
        &self,
        kind: KeyKind,
        version: u32,
        now: Micros,
    ) -> Result<KeyVersionInfo, KeyError> {
        let row = self
            .store
            .retire_key_version(kind.as_str(), version, now)
            .await
            .map_err(|error| state_error(error, version, "DECRYPT_ONLY"))?;
        if kind == KeyKind::Index {
            // Lookups stop computing candidates under it.
            self.refresh_index().await?;
        }
        KeyVersionInfo::try_from(row)
    }

    /// Erases a retired version's material, then records it destroyed.
    pub async fn destroy(
        &self,
        kind: KeyKind,
        version: u32,
        now: Micros,
    ) -> Result<KeyVersionInfo, KeyError> {
        let destroy = |version: u32| {
            match kind {
                KeyKind::Kek => self.provider.destroy(version),
                KeyKind::Index => self.index.destroy(version),
            }
            .map_err(|error| error.to_string())
        };
        let row = self
            .store
            .destroy_key_version(kind.as_str(), version, now, &destroy)
            .await
            .map_err(|error| state_error(error, version, "RETIRED"))?;
        tracing::warn!(kind = kind.as_str(), version, "destroyed a key version");
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
