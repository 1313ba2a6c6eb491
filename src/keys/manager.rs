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
//!
//! Destruction is the one change caching must not delay: every unwrap checks the state of
//! the version it needs against a cache of the database's KEK states at most
//! `keys.state_cache_ms` old (re-read on the request path when older), and refuses a
//! destroyed version with [`KeyError::Destroyed`], whatever material or cached data keys
//! this instance still holds. [`watch_key_states`] re-reads the states in the background
//! and drops the material and cached data keys of every version destroyed elsewhere, so a
//! `DestroyKeyVersion` on one instance reaches every instance within that interval.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::crypto::{AuditSigningKey, DataKey, Suite, parse_wrap_header};
use crate::domain::ids::RecordId;
use crate::store::{KeyVersionRow, Micros, Store, StoreError};

use super::error::KeyError;
use super::index::{IndexKeyPair, IndexKeys};
use super::{KekProvider, ResidentKeys};

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

/// How long an unwrap trusts the KEK states it last read, unless configured otherwise
/// (`keys.state_cache_ms`): the longest a destruction elsewhere can go unnoticed here.
pub const DEFAULT_STATE_CACHE: Duration = Duration::from_secs(2);

/// The database's key version states as this instance last read them.
#[derive(Default)]
struct StateCache {
    read_at: Option<Instant>,
    kek: BTreeMap<u32, KeyVersionState>,
    /// Destroyed versions whose material and cached keys this instance has dropped.
    forgotten_kek: BTreeSet<u32>,
    forgotten_index: BTreeSet<u32>,
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
    states: RwLock<StateCache>,
    /// One re-read of the states at a time; callers that waited find them fresh.
    states_read: tokio::sync::Mutex<()>,
    state_cache: Duration,
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
        seed_versions(store.as_ref(), INDEX_KIND, suite.as_str(), &index_seed, now).await?;
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
        seed_versions(store.as_ref(), KEK_KIND, provider.key_id(), &seed, now).await?;
        let manager = KeyManager {
            provider,
            store,
            active: AtomicU32::new(0),
            suite,
            index,
            index_suite: pinned,
            index_view: RwLock::new(IndexView::default()),
            audit_signing,
            states: RwLock::new(StateCache::default()),
            states_read: tokio::sync::Mutex::new(()),
            state_cache: DEFAULT_STATE_CACHE,
        };
        manager.refresh_active().await?;
        manager.refresh_index().await?;
        manager.refresh_states().await?;
        Ok(manager)
    }

    /// How long unwraps trust the KEK states they last read (`keys.state_cache_ms`).
    pub fn with_state_cache(mut self, state_cache: Duration) -> KeyManager {
        self.state_cache = state_cache;
        self
    }

    /// How often [`watch_key_states`] re-reads the states: the configured cache lifetime.
    pub fn state_cache(&self) -> Duration {
        self.state_cache
    }

    /// Re-reads every key version's state from the database and drops this instance's
    /// material and cached data keys of each version destroyed since the last read (by any
    /// instance). Returns the versions (KEK, index) it dropped. Re-reads run one at a time
    /// (`states_read`), so an older read never lands after a newer one.
    pub async fn refresh_states(&self) -> Result<(Vec<u32>, Vec<u32>), KeyError> {
        let _reading = self.states_read.lock().await;
        self.refresh_states_holding_lock().await
    }

    /// [`Self::refresh_states`] for a caller that already holds `states_read`.
    async fn refresh_states_holding_lock(&self) -> Result<(Vec<u32>, Vec<u32>), KeyError> {
        // Stamped before the query: the cache is no fresher than the moment the read began,
        // so `keys.state_cache_ms` bounds how long a destruction goes unnoticed, query
        // latency included.
        let started = Instant::now();
        let kek = parse_states(self.store.key_version_states(KEK_KIND).await?)?;
        let index = parse_states(self.store.key_version_states(INDEX_KIND).await?)?;
        let destroyed = |states: &BTreeMap<u32, KeyVersionState>, forgotten: &BTreeSet<u32>| {
            states
                .iter()
                .filter(|(version, state)| {
                    **state == KeyVersionState::Destroyed && !forgotten.contains(version)
                })
                .map(|(version, _)| *version)
                .collect::<Vec<u32>>()
        };
        let (new_kek, new_index) = {
            let mut cache = self.states.write().unwrap_or_else(|e| e.into_inner());
            let kek = merge_states(&cache.kek, kek);
            let new_kek = destroyed(&kek, &cache.forgotten_kek);
            let new_index = destroyed(&index, &cache.forgotten_index);
            cache.kek = kek;
            cache.read_at = Some(
                cache
                    .read_at
                    .map_or(started, |read_at| read_at.max(started)),
            );
            (new_kek, new_index)
        };
        // The states are published (so unwraps refuse) before the material goes: dropping
        // it is the second line, not the one refusals depend on.
        for &version in &new_kek {
            self.provider.forget(version)?;
        }
        for &version in &new_index {
            self.index.forget(version);
        }
        if !new_kek.is_empty() || !new_index.is_empty() {
            tracing::info!(
                kek = ?new_kek,
                index = ?new_index,
                "dropped the material of key versions destroyed in the database"
            );
        }
        let mut cache = self.states.write().unwrap_or_else(|e| e.into_inner());
        cache.forgotten_kek.extend(new_kek.iter().copied());
        cache.forgotten_index.extend(new_index.iter().copied());
        Ok((new_kek, new_index))
    }

    /// Whether the cached states are older than `keys.state_cache_ms`.
    fn states_stale(&self) -> bool {
        self.states
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= self.state_cache)
    }

    fn cached_state(&self, version: u32) -> Option<KeyVersionState> {
        self.states
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .kek
            .get(&version)
            .copied()
    }

    /// Refuses a KEK version the database says is destroyed, reading the states first when
    /// the cached ones are older than `keys.state_cache_ms`.
    pub async fn check_unwrappable(&self, version: u32) -> Result<(), KeyError> {
        if self.states_stale() {
            let _reading = self.states_read.lock().await;
            if self.states_stale() {
                self.refresh_states_holding_lock().await?;
            }
        }
        if self.cached_state(version).is_none() {
            // Perhaps created since the last read: read once more before refusing.
            let _reading = self.states_read.lock().await;
            self.refresh_states_holding_lock().await?;
        }
        self.check_cached(version)
    }

    /// The check against the cached states alone, for synchronous callers (the rewrap and
    /// re-index closures, the health probe), which [`watch_key_states`] keeps fresh.
    fn check_cached(&self, version: u32) -> Result<(), KeyError> {
        match self.cached_state(version) {
            Some(KeyVersionState::Destroyed) => Err(KeyError::Destroyed { version }),
            Some(_) => Ok(()),
            // A version the database never recorded opens nothing: fail closed.
            None => Err(KeyError::MaterialMissing { version }),
        }
    }

    /// The KEK versions whose material this instance's provider holds right now.
    pub fn provider_versions(&self) -> Result<Vec<u32>, KeyError> {
        self.provider.versions()
    }

    /// The index versions whose keys this instance holds in memory right now.
    pub fn index_versions_held(&self) -> Vec<u32> {
        self.index.versions()
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
        if self.cached_state(active).is_none() {
            // A version this instance has not seen yet: unwraps under it (the health probe's
            // among them) must not wait for the next re-read of the states to succeed.
            self.refresh_states().await?;
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

    /// Unwraps with the version the bytes name, once the database's state of that version
    /// (cached for at most `keys.state_cache_ms`) says it is not destroyed.
    pub async fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError> {
        self.check_unwrappable(KeyManager::version_of(wrapped)?)
            .await?;
        self.unwrap_checked(wrapped, record_id)
    }

    /// As [`KeyManager::unwrap`], for synchronous callers: checks the cached states without
    /// re-reading them (the background task keeps them at most one interval old).
    pub fn unwrap_cached_state(
        &self,
        wrapped: &[u8],
        record_id: &str,
    ) -> Result<DataKey, KeyError> {
        self.check_cached(KeyManager::version_of(wrapped)?)?;
        self.unwrap_checked(wrapped, record_id)
    }

    /// Unwraps, re-reading the provider's material once when it does not hold the version
    /// (another instance may have just created it). The state check is the caller's.
    fn unwrap_checked(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError> {
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
        let provider = match kind {
            KeyKind::Kek => self.provider.key_id(),
            KeyKind::Index => self.index_suite.as_str(),
        };
        let mut tx = self.store.key_admin(kind.as_str()).await?;
        // Read under the key-admin lock: a rotation that committed while this one waited
        // is visible now.
        let active = tx.active().await?.ok_or_else(|| {
            KeyError::Store(StoreError::Corrupt(format!(
                "no active {} version",
                kind.as_str()
            )))
        })?;
        if active != expected {
            drop(tx);
            self.refresh(kind).await?;
            return Ok(RotateOutcome {
                active_version: active,
                created: false,
            });
        }
        let version = tx.next_version().await?;
        // Material first, state second: the database never names a version whose material
        // was not written. If the commit fails, the material is an orphan that the next
        // rotation to this number replaces.
        match kind {
            KeyKind::Kek => self.provider.provision(version),
            KeyKind::Index => self.index.provision(version),
        }?;
        tx.set_state(active, "DECRYPT_ONLY").await?;
        tx.insert(version, "ACTIVE", provider, now).await?;
        tx.commit().await?;
        self.refresh(kind).await?;
        tracing::info!(
            kind = kind.as_str(),
            version,
            previous = active,
            "rotated a key"
        );
        Ok(RotateOutcome {
            active_version: version,
            created: true,
        })
    }

    async fn refresh(&self, kind: KeyKind) -> Result<u32, KeyError> {
        match kind {
            KeyKind::Kek => self.refresh_active().await,
            KeyKind::Index => self.refresh_index().await,
        }
    }

    /// One version's row as the database holds it now.
    async fn version_row(&self, kind: KeyKind, version: u32) -> Result<KeyVersionRow, KeyError> {
        self.store
            .key_versions(kind.as_str())
            .await?
            .into_iter()
            .find(|row| row.version == version)
            .ok_or(KeyError::NoSuchVersion(version))
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
        let retire = async {
            let mut tx = self.store.key_admin(kind.as_str()).await?;
            let state = tx.state(version).await?;
            if state != "DECRYPT_ONLY" {
                return Err(StoreError::KeyVersionState { version, state });
            }
            // The rotation that made this version decrypt-only waited for every write in
            // flight under it (they hold a share lock on its row, or SQLite's write lock),
            // and no write passes the active check since: this count cannot grow afterwards.
            let records = tx.records_under(version).await?;
            if records > 0 {
                return Err(StoreError::KeyVersionInUse { version, records });
            }
            tx.retire(version, now).await?;
            tx.commit().await
        };
        retire
            .await
            .map_err(|error| state_error(error, version, "DECRYPT_ONLY"))?;
        let row = self.version_row(kind, version).await?;
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
        let mut tx = self
            .store
            .key_admin(kind.as_str())
            .await
            .map_err(|error| state_error(error, version, "RETIRED"))?;
        let state = tx
            .state(version)
            .await
            .map_err(|error| state_error(error, version, "RETIRED"))?;
        if state != "RETIRED" {
            return Err(state_error(
                StoreError::KeyVersionState { version, state },
                version,
                "RETIRED",
            ));
        }
        // Material first, under the key-admin lock, then the state that says so.
        match kind {
            KeyKind::Kek => self.provider.destroy(version),
            KeyKind::Index => self.index.destroy(version),
        }?;
        tx.destroy(version, now).await?;
        tx.commit().await?;
        let row = self.version_row(kind, version).await?;
        tracing::warn!(kind = kind.as_str(), version, "destroyed a key version");
        // This instance refuses the version at once, not after its cached states expire.
        if let Err(error) = self.refresh_states().await {
            tracing::warn!(%error, "cannot re-read the key version states");
        }
        KeyVersionInfo::try_from(row)
    }

    /// The closure a rewrap batch applies to each record: unwrap under whatever version the
    /// key names, wrap under `target`. Field data is never touched.
    pub fn rewrapper(
        &self,
        target: u32,
    ) -> impl Fn(&RecordId, &[u8]) -> Option<Vec<u8>> + Send + Sync + '_ {
        move |record_id: &RecordId, wrapped: &[u8]| {
            let dek = match self.unwrap_cached_state(wrapped, record_id.as_str()) {
                Ok(dek) => dek,
                Err(error) => {
                    tracing::error!(%error, %record_id, "cannot unwrap a data key for rewrap");
                    return None;
                }
            };
            match self.provider.wrap(target, &dek, record_id.as_str()) {
                Ok(rewrapped) => Some(rewrapped),
                Err(error) => {
                    tracing::error!(%error, %record_id, "cannot wrap a data key for rewrap");
                    None
                }
            }
        }
    }
}

/// The states a re-read publishes: what the database said, except that a version this
/// instance already knows as destroyed stays destroyed. Destruction is terminal (its
/// material is gone), so a read that says otherwise is older than the one that saw it
/// destroyed, and must not re-open the version for unwraps.
fn merge_states(
    cached: &BTreeMap<u32, KeyVersionState>,
    mut read: BTreeMap<u32, KeyVersionState>,
) -> BTreeMap<u32, KeyVersionState> {
    for (version, state) in cached {
        if *state == KeyVersionState::Destroyed {
            read.insert(*version, KeyVersionState::Destroyed);
        }
    }
    read
}

fn parse_states(rows: Vec<(u32, String)>) -> Result<BTreeMap<u32, KeyVersionState>, KeyError> {
    rows.into_iter()
        .map(|(version, state)| {
            KeyVersionState::parse(&state)
                .map(|state| (version, state))
                .ok_or_else(|| {
                    KeyError::Store(StoreError::Corrupt(format!("unknown key state {state:?}")))
                })
        })
        .collect()
}

/// Re-reads the key version states every `keys.state_cache_ms` until `stop` is cancelled
/// (the application does so last at shutdown), so versions destroyed by another instance
/// lose their material and cached data keys here too, and unwraps seldom wait for a read.
/// A failed read is logged; unwraps then read the states themselves, and fail closed.
pub async fn watch_key_states(keys: Arc<KeyManager>, stop: tokio_util::sync::CancellationToken) {
    let mut ticker = tokio::time::interval(keys.state_cache().max(Duration::from_millis(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Err(error) = keys.refresh_states().await {
            tracing::warn!(%error, "cannot re-read the key version states");
        }
    }
}

/// Records `versions` of `kind` when the database knows none yet (first start after the
/// key-lifecycle migration), under the key-admin lock, so concurrent first starts agree: the
/// first wins.
async fn seed_versions(
    store: &dyn Store,
    kind: &str,
    provider: &str,
    versions: &[(u32, &str)],
    now: Micros,
) -> Result<(), StoreError> {
    let mut tx = store.key_admin(kind).await?;
    if tx.known_versions().await? == 0 {
        for (version, state) in versions {
            tx.insert(*version, state, provider, now).await?;
        }
    }
    tx.commit().await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destroyed_version_stays_destroyed_whatever_a_later_read_says() {
        use KeyVersionState::{Active, Destroyed, Retired};
        let cached = BTreeMap::from([(1, Destroyed), (2, Retired), (3, Active)]);
        // A read that started before version 1's destruction and one that lost the row.
        let merged = merge_states(&cached, BTreeMap::from([(1, Retired), (2, Retired)]));
        assert_eq!(merged.get(&1), Some(&Destroyed));
        let merged = merge_states(&cached, BTreeMap::from([(2, Retired), (3, Active)]));
        assert_eq!(merged.get(&1), Some(&Destroyed));
        // Everything else is the database's word: versions move forward and appear.
        let read = BTreeMap::from([(1, Destroyed), (2, Destroyed), (3, Retired), (4, Active)]);
        assert_eq!(merge_states(&cached, read.clone()), read);
    }
}
