//! Blind-index and pseudonym keys, per index version, held in memory.
//!
//! It owns the in-memory copy of the keyring file's index keys and keeps it in step with
//! the file the way the local KEK provider does: provisioning and destruction edit the file
//! first (under the database's key-admin lock, taken by the caller) and memory second, and
//! a version this instance does not hold yet makes it re-read the file once. Index keys
//! always live in the keyring file, whichever provider holds the KEKs: every lookup MACs
//! with them, so they must be in memory anyway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::{BlindIndexKey, PseudonymKey, SecretKey, Suite};

use super::error::KeyError;
use super::{Keyring, add_index_version, remove_index_version};

/// One index version's keys: the blind-index key (which also derives the state key that
/// seals age gates) and the pseudonym key.
#[derive(Debug)]
pub struct IndexKeyPair {
    pub blind_index: BlindIndexKey,
    pub pseudonym: PseudonymKey,
}

impl IndexKeyPair {
    fn for_suite(self, suite: Suite) -> IndexKeyPair {
        IndexKeyPair {
            blind_index: self.blind_index.for_suite(suite),
            pseudonym: self.pseudonym.for_suite(suite),
        }
    }
}

#[derive(Debug)]
pub struct IndexKeys {
    /// `None` for a keyring that lives only in memory.
    path: Option<PathBuf>,
    /// The MAC suite pinned in the database at the first start.
    suite: Suite,
    versions: RwLock<BTreeMap<u32, Arc<IndexKeyPair>>>,
    /// Serialises re-reads and edits of the file within this process.
    file_lock: Mutex<()>,
}

impl IndexKeys {
    pub fn new(
        path: Option<&Path>,
        suite: Suite,
        versions: BTreeMap<u32, IndexKeyPair>,
    ) -> IndexKeys {
        IndexKeys {
            path: path.map(Path::to_owned),
            suite,
            versions: RwLock::new(Self::pinned(versions, suite)),
            file_lock: Mutex::new(()),
        }
    }

    fn pinned(
        versions: BTreeMap<u32, IndexKeyPair>,
        suite: Suite,
    ) -> BTreeMap<u32, Arc<IndexKeyPair>> {
        versions
            .into_iter()
            .map(|(version, pair)| (version, Arc::new(pair.for_suite(suite))))
            .collect()
    }

    /// Versions whose keys this instance holds right now.
    pub fn versions(&self) -> Vec<u32> {
        self.read().keys().copied().collect()
    }

    /// The keys of `version`, re-reading the file once when this instance does not hold
    /// them (another instance may have just rotated).
    pub fn get(&self, version: u32) -> Result<Arc<IndexKeyPair>, KeyError> {
        if let Some(pair) = self.read().get(&version) {
            return Ok(pair.clone());
        }
        self.refresh()?;
        self.read()
            .get(&version)
            .cloned()
            .ok_or(KeyError::IndexMaterialMissing { version })
    }

    /// Creates keys for a new `version`, replacing an orphan of a rotation that never
    /// committed. Called under the database's key-admin lock.
    pub fn provision(&self, version: u32) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        match &self.path {
            Some(path) => {
                add_index_version(path, version)?;
                self.reload(path)
            }
            None => {
                let pair = IndexKeyPair {
                    blind_index: BlindIndexKey::new(SecretKey::generate()?),
                    pseudonym: PseudonymKey::new(SecretKey::generate()?),
                };
                self.write()
                    .insert(version, Arc::new(pair.for_suite(self.suite)));
                Ok(())
            }
        }
    }

    /// Erases `version`'s keys irreversibly (from the file, then from memory; the last
    /// in-flight user's `Arc` zeroises them on drop). Idempotent.
    pub fn destroy(&self, version: u32) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        if let Some(path) = &self.path {
            remove_index_version(path, version)?;
        }
        self.write().remove(&version);
        Ok(())
    }

    /// Drops `version`'s keys from this instance's memory only: another instance destroyed
    /// the version (and removed it from the file). Idempotent.
    pub fn forget(&self, version: u32) {
        self.write().remove(&version);
    }

    /// Re-reads the file another instance may have changed.
    pub fn refresh(&self) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        match &self.path {
            Some(path) => self.reload(path),
            None => Ok(()),
        }
    }

    fn reload(&self, path: &Path) -> Result<(), KeyError> {
        let index = Keyring::load(path)?.into_index_keys();
        *self.write() = Self::pinned(index, self.suite);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<IndexKeyPair>>> {
        self.versions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Arc<IndexKeyPair>>> {
        self.versions.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_file(&self) -> std::sync::MutexGuard<'_, ()> {
        self.file_lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}
