//! The local KEK provider: KEK material from the keyring file, held in memory.
//!
//! It owns the in-memory copy of the file's KEKs and keeps it in step with the file:
//! provisioning and destruction edit the file first and the memory second, and
//! [`KekProvider::refresh`] re-reads the file when another instance sharing it has changed
//! it (see the parent module on why instances sharing a database share this file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::crypto::{DataKey, Kek, parse_wrap_header};

use super::error::KeyError;
use super::{KekProvider, Keyring, LOCAL_KEY_ID, add_kek_version, remove_kek_version};

#[derive(Debug)]
pub struct LocalKekProvider {
    path: PathBuf,
    keks: RwLock<BTreeMap<u32, Kek>>,
    /// Serialises re-reads and edits of the file within this process; across processes the
    /// database's key-admin lock does.
    file_lock: Mutex<()>,
}

impl LocalKekProvider {
    pub fn new(path: &Path, keks: BTreeMap<u32, Kek>) -> LocalKekProvider {
        LocalKekProvider {
            path: path.to_owned(),
            keks: RwLock::new(keks),
            file_lock: Mutex::new(()),
        }
    }

    fn reload(&self) -> Result<(), KeyError> {
        let (keks, _) = Keyring::load(&self.path)?.into_parts();
        *self.keks.write().unwrap_or_else(|e| e.into_inner()) = keks;
        Ok(())
    }

    fn lock_file(&self) -> std::sync::MutexGuard<'_, ()> {
        self.file_lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KekProvider for LocalKekProvider {
    fn key_id(&self) -> &str {
        LOCAL_KEY_ID
    }

    fn versions(&self) -> Result<Vec<u32>, KeyError> {
        Ok(self
            .keks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect())
    }

    fn wrap(&self, version: u32, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, KeyError> {
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        let kek = keks
            .get(&version)
            .ok_or(KeyError::MaterialMissing { version })?;
        Ok(kek.wrap(dek, record_id)?)
    }

    fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError> {
        let (reference, _) = parse_wrap_header(wrapped)?;
        if reference.key_id != LOCAL_KEY_ID {
            return Err(KeyError::MaterialMissing {
                version: reference.version,
            });
        }
        let keks = self.keks.read().unwrap_or_else(|e| e.into_inner());
        let kek = keks
            .get(&reference.version)
            .ok_or(KeyError::MaterialMissing {
                version: reference.version,
            })?;
        Ok(kek.unwrap(wrapped, record_id)?)
    }

    fn provision(&self, version: u32) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        add_kek_version(&self.path, version)?;
        self.reload()
    }

    fn destroy(&self, version: u32) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        remove_kek_version(&self.path, version)?;
        // Dropping the in-memory Kek zeroises it.
        self.keks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&version);
        Ok(())
    }

    fn forget(&self, version: u32) -> Result<(), KeyError> {
        // The destroying instance rewrote the shared file; only this copy is left.
        self.keks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&version);
        Ok(())
    }

    fn refresh(&self) -> Result<(), KeyError> {
        let _guard = self.lock_file();
        self.reload()
    }
}
