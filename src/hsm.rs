//! The PKCS#11 KEK provider: KEKs are AES-256 secret-key objects in a hardware security
//! module (tested against SoftHSM2), created sensitive and non-extractable, so their
//! material never enters the vault's memory. Wrapping and unwrapping a data key are
//! `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM` inside the module, producing the same
//! self-describing layout as the local provider (KEK id `hsm`), with the same associated
//! data binding the header and the record id.
//!
//! Rotation generates the new version's key object in the module (`C_GenerateKey`),
//! destruction destroys it (`C_DestroyObject`); the database keeps the version states as
//! for every provider. Instances sharing a database reach the same token, so a version one
//! instance creates is found by label by the others.
//!
//! # The unwrapped-key cache
//!
//! Every unwrap is a round trip into the module, and a module serialises them. To keep
//! reads fast, unwrapped data keys are cached in memory for `cache_ttl_seconds` and at most
//! `cache_max_entries` of them, oldest evicted first; an evicted or expired key is dropped,
//! which zeroises it. The trade: while cached, a data key sits in the vault's memory (as it
//! briefly does during every read anyway), so a memory disclosure in that window exposes
//! the records whose keys are cached, and destroying a KEK version takes effect for cached
//! keys only when they leave the cache; this provider clears the cache on every destruction
//! so that does not wait for the TTL. A TTL of 0 turns the cache off.
//!
//! The data key's suite (AES or SM4) is recorded in the header as for the local provider;
//! the wrapping itself is always AES-256-GCM, which every PKCS#11 module offers.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::config::Pkcs11Config;
use crate::crypto::{
    CryptoError, DataKey, SecretKey, random_nonce, split_wrapped, wrap_aad, wrap_header,
};
use crate::keys::{KekProvider, KeyError};

/// The KEK id wrapped keys carry when this provider wrapped them.
pub const HSM_KEY_ID: &str = "hsm";

/// A PKCS#11 library may be initialised once per process; every provider in the process
/// (several test instances, say) shares it.
fn module(path: &Path) -> Result<Pkcs11, KeyError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(module) = modules.get(path) {
        return Ok(module.clone());
    }
    let module = Pkcs11::new(path).map_err(hsm_error)?;
    module
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(hsm_error)?;
    modules.insert(path.to_owned(), module.clone());
    Ok(module)
}

fn hsm_error(error: cryptoki::error::Error) -> KeyError {
    KeyError::Hsm(error.to_string())
}

pub struct Pkcs11KekProvider {
    session: Mutex<Session>,
    prefix: String,
    cache: Mutex<KeyCache>,
}

impl std::fmt::Debug for Pkcs11KekProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KekProvider")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Pkcs11KekProvider {
    /// Opens a session on the configured token and logs in with the PIN from its file.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11KekProvider, KeyError> {
        let module = module(&config.module)?;
        let slot = module
            .get_slots_with_token()
            .map_err(hsm_error)?
            .into_iter()
            .find(|slot| {
                module
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == config.token_label)
            })
            .ok_or_else(|| KeyError::Hsm(format!("no token labelled {}", config.token_label)))?;
        let session = module.open_rw_session(slot).map_err(hsm_error)?;
        let pin = read_pin(&config.pin_file)?;
        match session.login(UserType::User, Some(&pin)) {
            // The login is per application and token: another provider in this process
            // may already hold it.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(error) => return Err(hsm_error(error)),
        }
        Ok(Pkcs11KekProvider {
            session: Mutex::new(session),
            prefix: config.key_label_prefix.clone(),
            cache: Mutex::new(KeyCache::new(
                config.cache_max_entries,
                Duration::from_secs(config.cache_ttl_seconds),
            )),
        })
    }

    /// This provider's session, holding the process-wide module lock: SoftHSM2 (and some
    /// hardware modules) fail under concurrent object creation from several sessions, and a
    /// single vault process gains nothing from parallel calls into one token.
    fn session(&self) -> SessionGuard<'_> {
        static MODULE_LOCK: Mutex<()> = Mutex::new(());
        let module = MODULE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        SessionGuard {
            session,
            _module: module,
        }
    }

    fn label(&self, version: u32) -> Vec<u8> {
        format!("{}{version}", self.prefix).into_bytes()
    }

    fn find(&self, session: &Session, version: u32) -> Result<Vec<ObjectHandle>, KeyError> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.label(version)),
            ])
            .map_err(hsm_error)
    }

    fn handle(&self, session: &Session, version: u32) -> Result<ObjectHandle, KeyError> {
        self.find(session, version)?
            .into_iter()
            .next()
            .ok_or(KeyError::MaterialMissing { version })
    }

    fn gcm<'a>(iv: &'a mut [u8], aad: &'a [u8]) -> Result<Mechanism<'a>, KeyError> {
        Ok(Mechanism::AesGcm(
            GcmParams::new(iv, aad, 128.into()).map_err(hsm_error)?,
        ))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KekProvider for Pkcs11KekProvider {
    fn key_id(&self) -> &str {
        HSM_KEY_ID
    }

    fn versions(&self) -> Result<Vec<u32>, KeyError> {
        let session = self.session();
        let objects = session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .map_err(hsm_error)?;
        let mut versions = Vec::new();
        for object in objects {
            let attributes = session
                .get_attributes(object, &[AttributeType::Label])
                .map_err(hsm_error)?;
            for attribute in attributes {
                if let Attribute::Label(label) = attribute {
                    let version = std::str::from_utf8(&label)
                        .ok()
                        .and_then(|label| label.strip_prefix(&self.prefix))
                        .and_then(|number| number.parse::<u32>().ok());
                    versions.extend(version);
                }
            }
        }
        versions.sort_unstable();
        versions.dedup();
        Ok(versions)
    }

    fn wrap(&self, version: u32, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, KeyError> {
        let header = wrap_header(dek.suite(), HSM_KEY_ID, version)?;
        let aad = wrap_aad(&header, record_id);
        let nonce = random_nonce()?;
        let mut iv = nonce;
        let session = self.session();
        let key = self.handle(&session, version)?;
        let sealed = session
            .encrypt(&Self::gcm(&mut iv, &aad)?, key, dek.secret().expose())
            .map_err(hsm_error)?;
        let mut out = header;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, KeyError> {
        let parts = split_wrapped(wrapped)?;
        if parts.reference.key_id != HSM_KEY_ID {
            return Err(KeyError::MaterialMissing {
                version: parts.reference.version,
            });
        }
        if let Some(cached) = self.cache().get(wrapped, record_id) {
            return Ok(cached);
        }
        let aad = wrap_aad(parts.header, record_id);
        let mut iv = [0u8; 12];
        iv.copy_from_slice(parts.nonce);
        let mut material = {
            let session = self.session();
            let key = self.handle(&session, parts.reference.version)?;
            Zeroizing::new(
                session
                    .decrypt(&Self::gcm(&mut iv, &aad)?, key, parts.ciphertext)
                    // A wrong tag and a wrong record both end here: fail closed.
                    .map_err(|_| KeyError::Crypto(CryptoError::Integrity))?,
            )
        };
        let dek = DataKey::from_secret(SecretKey::from_bytes(&mut material)?, parts.suite);
        self.cache().insert(wrapped, record_id, dek.duplicate());
        Ok(dek)
    }

    fn provision(&self, version: u32) -> Result<(), KeyError> {
        let session = self.session();
        for orphan in self.find(&session, version)? {
            session.destroy_object(orphan).map_err(hsm_error)?;
        }
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(self.label(version)),
                ],
            )
            .map_err(hsm_error)?;
        Ok(())
    }

    fn destroy(&self, version: u32) -> Result<(), KeyError> {
        let session = self.session();
        for object in self.find(&session, version)? {
            session.destroy_object(object).map_err(hsm_error)?;
        }
        drop(session);
        self.cache().clear();
        Ok(())
    }

    fn forget(&self, version: u32) -> Result<(), KeyError> {
        // The object is gone from the module; data keys it unwrapped may still be cached.
        self.cache().forget_version(version);
        Ok(())
    }

    fn refresh(&self) -> Result<(), KeyError> {
        // Objects are looked up in the module on every use; nothing is held to refresh.
        Ok(())
    }
}

/// PINs are short; a file much longer than any PIN is not a PIN file.
const MAX_PIN_FILE: u64 = 1024;

/// The user PIN from its file, which must be private to the vault's user (as the keyring
/// must): a PIN file others can read hands them the module's keys. Held in a buffer that
/// wipes itself (`AuthPin` zeroises on drop, and the text it was copied from too).
fn read_pin(path: &Path) -> Result<AuthPin, KeyError> {
    let pin = crate::keys::read_secret_file(path, MAX_PIN_FILE)?;
    // `From<&str>` allocates exactly the PIN's length, so boxing it does not reallocate.
    Ok(AuthPin::from(pin.as_str()))
}

/// A session, used while the module lock is held.
struct SessionGuard<'a> {
    session: std::sync::MutexGuard<'a, Session>,
    _module: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for SessionGuard<'_> {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.session
    }
}

/// A bounded, expiring map from wrapped keys to the data keys they unwrap to. Entries leave
/// in insertion order (all share one TTL, so the oldest expires first); leaving drops the
/// data key, which zeroises it.
struct KeyCache {
    max_entries: usize,
    ttl: Duration,
    order: VecDeque<(Instant, Vec<u8>)>,
    keys: HashMap<Vec<u8>, DataKey>,
}

impl KeyCache {
    fn new(max_entries: usize, ttl: Duration) -> KeyCache {
        KeyCache {
            max_entries,
            ttl,
            order: VecDeque::new(),
            keys: HashMap::new(),
        }
    }

    /// The record id is part of the entry: a wrapped key copied to another record must not
    /// open there from the cache when the module would refuse it.
    fn entry(wrapped: &[u8], record_id: &str) -> Vec<u8> {
        let mut entry = Vec::with_capacity(wrapped.len() + 1 + record_id.len());
        entry.extend_from_slice(wrapped);
        entry.push(0);
        entry.extend_from_slice(record_id.as_bytes());
        entry
    }

    fn enabled(&self) -> bool {
        self.max_entries > 0 && !self.ttl.is_zero()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((inserted, _)) = self.order.front() {
            if self.order.len() <= self.max_entries && now.duration_since(*inserted) < self.ttl {
                break;
            }
            if let Some((_, entry)) = self.order.pop_front() {
                self.keys.remove(&entry);
            }
        }
    }

    fn get(&mut self, wrapped: &[u8], record_id: &str) -> Option<DataKey> {
        if !self.enabled() {
            return None;
        }
        self.expire(Instant::now());
        self.keys
            .get(&KeyCache::entry(wrapped, record_id))
            .map(DataKey::duplicate)
    }

    fn insert(&mut self, wrapped: &[u8], record_id: &str, dek: DataKey) {
        if !self.enabled() {
            return;
        }
        let entry = KeyCache::entry(wrapped, record_id);
        self.order.push_back((Instant::now(), entry.clone()));
        self.keys.insert(entry, dek);
        self.expire(Instant::now());
    }

    fn clear(&mut self) {
        self.order.clear();
        self.keys.clear();
    }

    /// Drops every data key wrapped under KEK `version` (each entry begins with the
    /// wrapped key, whose header names its version).
    fn forget_version(&mut self, version: u32) {
        let wrapped_under = |entry: &[u8]| {
            crate::crypto::parse_wrap_header(entry).is_ok_and(|(kek, _)| kek.version == version)
        };
        self.order.retain(|(_, entry)| !wrapped_under(entry));
        self.keys.retain(|entry, _| !wrapped_under(entry));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_evicts_the_oldest() {
        let mut cache = KeyCache::new(2, Duration::from_secs(3600));
        for record in ["r1", "r2", "r3"] {
            cache.insert(b"wrapped", record, DataKey::generate().unwrap());
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(b"wrapped", "r1").is_none());
        assert!(cache.get(b"wrapped", "r3").is_some());
        // Bound to the record: the same wrapped bytes under another record miss.
        assert!(cache.get(b"wrapped", "r4").is_none());
    }

    #[test]
    fn forgetting_a_version_drops_only_the_keys_it_wrapped() {
        let mut cache = KeyCache::new(10, Duration::from_secs(3600));
        let under = |version| {
            let mut wrapped =
                wrap_header(crate::crypto::Suite::default(), HSM_KEY_ID, version).unwrap();
            wrapped.extend_from_slice(&[7u8; 60]);
            wrapped
        };
        cache.insert(&under(1), "r1", DataKey::generate().unwrap());
        cache.insert(&under(2), "r2", DataKey::generate().unwrap());
        cache.forget_version(1);
        assert!(cache.get(&under(1), "r1").is_none());
        assert!(cache.get(&under(2), "r2").is_some());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn expired_keys_leave_and_a_zero_ttl_caches_nothing() {
        let mut cache = KeyCache::new(10, Duration::from_secs(60));
        cache.insert(b"w", "r1", DataKey::generate().unwrap());
        cache.expire(Instant::now() + Duration::from_secs(61));
        assert_eq!(cache.len(), 0);
        let mut off = KeyCache::new(10, Duration::ZERO);
        off.insert(b"w", "r1", DataKey::generate().unwrap());
        assert!(off.get(b"w", "r1").is_none());
    }
}
