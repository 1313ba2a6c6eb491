//! The PKCS#11 KEK provider: KEKs are AES-256 secret-key objects in a hardware security
//! module (tested against SoftHSM2), created sensitive, non-extractable, unmodifiable and
//! uncopyable, so their material never enters the vault's memory and their attributes
//! cannot be loosened later. Wrapping a data key is `C_WrapKey` with `CKM_AES_KEY_WRAP`
//! (SP 800-38F KW, RFC 3394) inside the module, in the same format-2 layout as the local
//! provider (KEK id `hsm`): KW of the data key and the 16-byte context digest binding header
//! and record id. KW takes no nonce, so no IV can be lost and no nonce budget runs out.
//! The data key goes in and comes out as a short-lived session object of the module
//! (generic secret, not on the token), destroyed right after the call.
//!
//! Format 1 (`CKM_AES_GCM` through `C_Encrypt`/`C_Decrypt`) still opens, and is still written
//! for a KEK that can only encrypt: one created before KW (it was made with `CKA_ENCRYPT`
//! and not `CKA_WRAP`, and one key serves one mechanism) or in a module without
//! `CKM_AES_KEY_WRAP`. There the IV stored is the IV buffer as the module left it after
//! the call, not the one passed in: some modules write their own GCM IV (the PKCS#11
//! specification allows it), and storing the vault's would make every such wrapped key
//! unopenable. A rotation with a KW-capable module moves everything to KW.
//!
//! Rotation generates the new version's key object in the module (`C_GenerateKey`),
//! destruction destroys it (`C_DestroyObject`); the database keeps the version states as
//! for every provider. Instances sharing a database reach the same token, so a version one
//! instance creates is found by label by the others. A session the module lost (closed,
//! logged out, the device reconnected) is opened and logged in again, and the call retried
//! once.
//!
//! The provider talks to the module through [`KekModule`], the handful of calls it needs,
//! so its own logic (formats, IVs, the cache) is tested against a double as well as SoftHSM2.
//!
//! # The module's thread
//!
//! A module call blocks for as long as the device takes (a network HSM: a round trip), and
//! calls are serialised. None runs on a tokio worker: the real module lives on its own
//! thread (`pdvault-pkcs11`, [`ModuleThread`]), which opens the session, makes every call
//! and closes the session when the provider is dropped. A caller hands its call over and
//! waits for the answer; on a worker of the multi-threaded runtime it announces the wait
//! (`tokio::task::block_in_place`), so the runtime moves the worker's other tasks to
//! another thread meanwhile. `Pkcs11Module::call` asserts in debug builds (the test suite's)
//! that it runs on that thread, outside any runtime, as the SQLite driver asserts for its
//! statements.
//!
//! # The unwrapped-key cache
//!
//! Every unwrap is a round trip into the module, and a module serialises them. To keep
//! reads fast, unwrapped data keys are cached in memory for `cache_ttl_seconds` and at most
//! `cache_max_entries` of them, oldest evicted first; an evicted or expired key is dropped,
//! which zeroises it (and its expanded cipher). The trade: while cached, a data key sits in
//! the vault's memory (as it briefly does during every read anyway), so a memory disclosure
//! in that window exposes the records whose keys are cached, and destroying a KEK version
//! takes effect for cached keys only when they leave the cache; this provider clears the
//! cache on every destruction so that does not wait for the TTL. A TTL of 0 turns the
//! cache off.
//!
//! # SM4
//!
//! The module's KEKs are AES-256, and PKCS#11 defines no SM4 mechanism (modules that offer
//! SM4 do so with vendor-defined ones). Wrapping an SM4 data key under an AES KEK would break
//! the SM4 deployment's promise of one algorithm family, so this provider refuses to wrap
//! SM4 data keys, and startup refuses `keys.suite = "sm4gcm-hmacsm3"` with
//! `keys.provider = "pkcs11"`: an SM4 deployment keeps its KEKs with the local provider
//! (SM4-KW under an HKDF-SM3-derived KEK). Format-1 wraps of SM4 keys made before still open.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::{Zeroize, Zeroizing};

use crate::config::Pkcs11Config;
use crate::crypto::{
    CryptoError, DataKey, SecretKey, Suite, WrappedBody, kw_open, kw_plaintext, random_nonce,
    split_wrapped, wrap_aad, wrap_header, wrap_header_gcm,
};
use crate::keys::KekProvider;
use crate::keys::error::{HsmError, KeyError};

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

fn hsm_error(error: Pkcs11Error) -> KeyError {
    KeyError::Hsm(HsmError::Module(error))
}

/// The calls into a module that the provider makes, by KEK version. Implementations map a
/// KEK the module does not hold to [`KeyError::MaterialMissing`], and a refused decryption
/// or unwrap (wrong key, tag or record) to [`CryptoError::Integrity`]; the module's own
/// failures (device, memory, mechanism) are [`KeyError::Hsm`], never `Integrity`.
pub trait KekModule: Send + Sync + 'static {
    /// Versions of the KEK objects the token holds.
    fn versions(&self) -> Result<Vec<u32>, KeyError>;
    /// Creates `version`'s KEK, replacing any object of that version.
    fn generate(&self, version: u32) -> Result<(), KeyError>;
    /// Destroys every object of `version`; none is not an error.
    fn destroy(&self, version: u32) -> Result<(), KeyError>;
    /// Whether `version`'s KEK wraps with `CKM_AES_KEY_WRAP` (else it encrypts with GCM).
    fn wraps_with_kw(&self, version: u32) -> Result<bool, KeyError>;
    /// `CKM_AES_KEY_WRAP` of `plaintext` (a whole number of 8-byte semiblocks).
    fn wrap_kw(&self, version: u32, plaintext: &[u8]) -> Result<Vec<u8>, KeyError>;
    fn unwrap_kw(&self, version: u32, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// `CKM_AES_GCM` encryption with a 128-bit tag. `iv` holds a fresh random IV on entry
    /// and, on return, the IV the module used (a module may write its own).
    fn encrypt_gcm(
        &self,
        version: u32,
        iv: &mut [u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError>;
    fn decrypt_gcm(
        &self,
        version: u32,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError>;
}

pub struct Pkcs11KekProvider {
    module: Box<dyn KekModule>,
    cache: Mutex<KeyCache>,
    /// Per version, whether its KEK wraps with KW: asked once (KEK attributes are
    /// unmodifiable), forgotten when the version is provisioned again or destroyed.
    kw: Mutex<HashMap<u32, bool>>,
}

impl std::fmt::Debug for Pkcs11KekProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KekProvider").finish_non_exhaustive()
    }
}

impl Pkcs11KekProvider {
    /// Opens a session on the configured token and logs in with the PIN from its file, on
    /// the module's own thread.
    pub fn open(config: &Pkcs11Config) -> Result<Pkcs11KekProvider, KeyError> {
        Ok(Pkcs11KekProvider::with_module(
            Box::new(ModuleThread::open(config)?),
            config.cache_max_entries,
            Duration::from_secs(config.cache_ttl_seconds),
        ))
    }

    /// A provider over any module: the real one ([`Pkcs11KekProvider::open`]) or a double.
    pub fn with_module(
        module: Box<dyn KekModule>,
        cache_max_entries: usize,
        cache_ttl: Duration,
    ) -> Pkcs11KekProvider {
        Pkcs11KekProvider {
            module,
            cache: Mutex::new(KeyCache::new(cache_max_entries, cache_ttl)),
            kw: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kw_map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, bool>> {
        self.kw.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wraps_with_kw(&self, version: u32) -> Result<bool, KeyError> {
        if let Some(&kw) = self.kw_map().get(&version) {
            return Ok(kw);
        }
        let kw = self.module.wraps_with_kw(version)?;
        self.kw_map().insert(version, kw);
        Ok(kw)
    }
}

impl KekProvider for Pkcs11KekProvider {
    fn key_id(&self) -> &str {
        HSM_KEY_ID
    }

    fn versions(&self) -> Result<Vec<u32>, KeyError> {
        self.module.versions()
    }

    fn wrap(&self, version: u32, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, KeyError> {
        if dek.suite() != Suite::Aes256GcmHmacSha256 {
            return Err(HsmError::Sm4DataKey.into());
        }
        let out = if self.wraps_with_kw(version)? {
            let mut out = wrap_header(dek.suite(), HSM_KEY_ID, version)?;
            let plaintext = kw_plaintext(dek, &out, record_id);
            out.extend_from_slice(&self.module.wrap_kw(version, &plaintext)?);
            out
        } else {
            let mut out = wrap_header_gcm(dek.suite(), HSM_KEY_ID, version)?;
            let aad = wrap_aad(&out, record_id);
            let mut iv = random_nonce()?;
            let sealed = self
                .module
                .encrypt_gcm(version, &mut iv, &aad, dek.secret().expose())?;
            // The IV as the module left it: the one it encrypted under.
            out.extend_from_slice(&iv);
            out.extend_from_slice(&sealed);
            out
        };
        // What the module returned must have the layout unwrapping expects.
        split_wrapped(&out).map_err(|_| HsmError::WrapLength)?;
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
        let version = parts.reference.version;
        let dek = match parts.body {
            WrappedBody::Kw(body) => kw_open(
                self.module.unwrap_kw(version, body)?,
                parts.suite,
                parts.header,
                record_id,
            )?,
            WrappedBody::Gcm { nonce, ciphertext } => {
                let aad = wrap_aad(parts.header, record_id);
                let mut material = self.module.decrypt_gcm(version, nonce, &aad, ciphertext)?;
                DataKey::from_secret(SecretKey::from_bytes(&mut material)?, parts.suite)
            }
        };
        self.cache().insert(wrapped, record_id, dek.duplicate());
        Ok(dek)
    }

    fn provision(&self, version: u32) -> Result<(), KeyError> {
        self.kw_map().remove(&version);
        self.module.generate(version)
    }

    fn destroy(&self, version: u32) -> Result<(), KeyError> {
        self.module.destroy(version)?;
        self.kw_map().remove(&version);
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

thread_local! {
    /// Set on the module threads, and nowhere else.
    static MODULE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Asserts (debug builds) that a module call runs on a module thread, outside any tokio
/// runtime: never on a worker, where it would stall every task queued behind it.
fn assert_module_thread() {
    debug_assert!(
        MODULE_THREAD.with(Cell::get) && tokio::runtime::Handle::try_current().is_err(),
        "a PKCS#11 call outside the module's thread"
    );
}

/// A call handed to the module's thread; it sends its own answer back.
type ModuleJob = Box<dyn FnOnce(&Pkcs11Module) + Send>;

/// The real module, owned by its own thread: the [`KekModule`] the provider holds. Each
/// call is handed over with its inputs copied (key material in wiping buffers) and waited
/// for. The thread ends, closing the session, once the provider drops this handle.
struct ModuleThread {
    jobs: crossbeam_channel::Sender<ModuleJob>,
}

fn module_thread_gone() -> KeyError {
    KeyError::Hsm(HsmError::ThreadGone)
}

/// Waits for the module thread's answer. On a worker of a multi-threaded runtime the wait
/// is announced, so the runtime hands the worker's other tasks to another thread; elsewhere
/// (a blocking-pool thread, a plain thread, a single-threaded runtime, which has no other
/// thread to hand them to) it just waits.
fn wait_for_module<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl ModuleThread {
    /// Starts the thread and opens the module on it.
    fn open(config: &Pkcs11Config) -> Result<ModuleThread, KeyError> {
        let config = config.clone();
        let (jobs, queue) = crossbeam_channel::unbounded::<ModuleJob>();
        let (opened, open_outcome) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("pdvault-pkcs11".into())
            .spawn(move || {
                MODULE_THREAD.with(|flag| flag.set(true));
                let module = match Pkcs11Module::open(&config) {
                    Ok(module) => {
                        let _ = opened.send(Ok(()));
                        module
                    }
                    Err(error) => {
                        let _ = opened.send(Err(error));
                        return;
                    }
                };
                // Until every handle is dropped; the session closes with `module`.
                for job in queue {
                    job(&module);
                }
            })
            .map_err(|error| KeyError::Hsm(HsmError::ThreadStart(error)))?;
        wait_for_module(|| open_outcome.recv()).map_err(|_| module_thread_gone())??;
        Ok(ModuleThread { jobs })
    }

    /// Runs `call` on the module's thread and returns its answer.
    fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Pkcs11Module) -> Result<T, KeyError> + Send + 'static,
    ) -> Result<T, KeyError> {
        let (answer, answered) = crossbeam_channel::bounded(1);
        self.jobs
            .send(Box::new(move |module: &Pkcs11Module| {
                let _ = answer.send(call(module));
            }))
            .map_err(|_| module_thread_gone())?;
        wait_for_module(|| answered.recv()).map_err(|_| module_thread_gone())?
    }
}

impl KekModule for ModuleThread {
    fn versions(&self) -> Result<Vec<u32>, KeyError> {
        self.run(|module| module.versions())
    }

    fn generate(&self, version: u32) -> Result<(), KeyError> {
        self.run(move |module| module.generate(version))
    }

    fn destroy(&self, version: u32) -> Result<(), KeyError> {
        self.run(move |module| module.destroy(version))
    }

    fn wraps_with_kw(&self, version: u32) -> Result<bool, KeyError> {
        self.run(move |module| module.wraps_with_kw(version))
    }

    fn wrap_kw(&self, version: u32, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        // A data key and its context: the copy wipes itself.
        let plaintext = Zeroizing::new(plaintext.to_vec());
        self.run(move |module| module.wrap_kw(version, &plaintext))
    }

    fn unwrap_kw(&self, version: u32, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let wrapped = wrapped.to_vec();
        self.run(move |module| module.unwrap_kw(version, &wrapped))
    }

    fn encrypt_gcm(
        &self,
        version: u32,
        iv: &mut [u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let (mut used, aad) = (*iv, aad.to_vec());
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let (sealed, used) = self.run(move |module| {
            let sealed = module.encrypt_gcm(version, &mut used, &aad, &plaintext)?;
            Ok((sealed, used))
        })?;
        *iv = used;
        Ok(sealed)
    }

    fn decrypt_gcm(
        &self,
        version: u32,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (iv, aad, ciphertext) = (iv.to_vec(), aad.to_vec(), ciphertext.to_vec());
        self.run(move |module| module.decrypt_gcm(version, &iv, &aad, &ciphertext))
    }
}

/// The module itself, through one logged-in session; lives on its [`ModuleThread`].
struct Pkcs11Module {
    pkcs11: Pkcs11,
    slot: Slot,
    /// Kept (in a buffer that wipes itself) to log in again when the module lost the
    /// session or its login.
    pin: AuthPin,
    prefix: String,
    /// Whether the module offers `CKM_AES_KEY_WRAP` for wrapping and unwrapping.
    kw_mechanism: bool,
    session: Mutex<Option<Session>>,
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

/// Errors after which the session (or its login) is gone and a new one may succeed.
fn session_lost(error: &Pkcs11Error) -> bool {
    matches!(
        error,
        Pkcs11Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent,
            _,
        )
    )
}

/// How often a listing of the token's KEKs is taken again when reading one object failed.
const LISTING_ATTEMPTS: u32 = 8;

/// Where one pass of a KEK listing failed: the search itself, or reading an object it found
/// (which another session may have changed since).
enum ListError {
    Search(Pkcs11Error),
    ObjectRead(Pkcs11Error),
}

/// Errors by which the module refuses the bytes it was given to unwrap or decrypt: a wrong
/// KEK, a changed wrap, a wrong tag or record. Those are the stored data failing
/// authentication (fail closed, not retried); anything else (a device error, memory, a
/// mechanism the module lost) is the module failing, which is `KEY_UNAVAILABLE` and
/// retryable, not a sign of tampering.
///
/// `CKR_GENERAL_ERROR` is counted with them because SoftHSM2 returns it, and only it, when
/// `C_UnwrapKey`'s KW integrity check fails (`SoftHSM::UnwrapKeySym`): without it a
/// tampered wrapped key would read as a module outage there.
fn refused_input(error: &Pkcs11Error) -> bool {
    matches!(
        error,
        Pkcs11Error::Pkcs11(
            RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
            _,
        )
    )
}

/// What a call into the module can fail with: the module's own error, or a KEK missing.
enum CallError {
    Module(Pkcs11Error),
    Missing,
}

impl From<Pkcs11Error> for CallError {
    fn from(error: Pkcs11Error) -> CallError {
        CallError::Module(error)
    }
}

impl Pkcs11Module {
    fn open(config: &Pkcs11Config) -> Result<Pkcs11Module, KeyError> {
        assert_module_thread();
        let pkcs11 = module(&config.module)?;
        let slot = pkcs11
            .get_slots_with_token()
            .map_err(hsm_error)?
            .into_iter()
            .find(|slot| {
                pkcs11
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == config.token_label)
            })
            .ok_or_else(|| HsmError::NoToken(config.token_label.clone()))?;
        let pin = read_pin(&config.pin_file)?;
        let kw_mechanism = pkcs11
            .get_mechanism_info(slot, MechanismType::AES_KEY_WRAP)
            .is_ok_and(|info| info.wrap() && info.unwrap());
        let module = Pkcs11Module {
            pkcs11,
            slot,
            pin,
            prefix: config.key_label_prefix.clone(),
            kw_mechanism,
            session: Mutex::new(None),
        };
        let session = module.open_session().map_err(hsm_error)?;
        *module.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
        Ok(module)
    }

    fn open_session(&self) -> Result<Session, Pkcs11Error> {
        let session = self.pkcs11.open_rw_session(self.slot)?;
        self.log_in(&session)?;
        Ok(session)
    }

    fn log_in(&self, session: &Session) -> Result<(), Pkcs11Error> {
        match session.login(UserType::User, Some(&self.pin)) {
            // The login is per application and token: another provider in this process
            // may already hold it.
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Runs `call` on this module's session while holding the process-wide module lock
    /// (SoftHSM2, and some hardware modules, fail under concurrent object creation from
    /// several sessions, and a vault process gains nothing from parallel calls into one
    /// token). If the module lost the session or its login, opens and logs in a new one
    /// and runs `call` once more.
    fn call<T>(
        &self,
        version: u32,
        call: impl Fn(&Session) -> Result<T, CallError>,
    ) -> Result<T, KeyError> {
        assert_module_thread();
        static MODULE_LOCK: Mutex<()> = Mutex::new(());
        let _module = MODULE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let mut retried = false;
        loop {
            let session = match slot.take() {
                Some(session) => session,
                None => self.open_session().map_err(hsm_error)?,
            };
            let error = match call(&session) {
                Ok(value) => {
                    *slot = Some(session);
                    return Ok(value);
                }
                // A logged-out session finds no private object: ask before calling it gone.
                Err(CallError::Missing) if !retried && !self.logged_in(&session) => {
                    Pkcs11Error::Pkcs11(
                        RvError::UserNotLoggedIn,
                        cryptoki::context::Function::FindObjects,
                    )
                }
                Err(CallError::Missing) => {
                    *slot = Some(session);
                    return Err(KeyError::MaterialMissing { version });
                }
                Err(CallError::Module(error)) => error,
            };
            if retried || !session_lost(&error) {
                *slot = Some(session);
                return Err(hsm_error(error));
            }
            tracing::warn!(%error, "the PKCS#11 session or its login was lost; opening or logging in again");
            retried = true;
            if session.get_session_info().is_ok() {
                // Still open at the module, only logged out: log in on it again.
                self.log_in(&session).map_err(hsm_error)?;
                *slot = Some(session);
            } else {
                // The module forgot it: closing its handle could close a session that now
                // has the same number, so it is dropped without closing.
                std::mem::forget(session);
            }
        }
    }

    fn logged_in(&self, session: &Session) -> bool {
        session.get_session_info().is_ok_and(|info| {
            matches!(
                info.session_state(),
                SessionState::RwUser | SessionState::RoUser
            )
        })
    }

    /// One pass of [`KekModule::versions`]: the search, then each object's label.
    fn list_versions(&self, session: &Session) -> Result<Vec<u32>, ListError> {
        let objects = session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .map_err(ListError::Search)?;
        let mut versions = Vec::new();
        for object in objects {
            let attributes = match session.get_attributes(object, &[AttributeType::Label]) {
                Ok(attributes) => attributes,
                // Destroyed since the search: whoever's it was, it is no KEK now.
                Err(Pkcs11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(error) => return Err(ListError::ObjectRead(error)),
            };
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
        Ok(versions)
    }

    fn label(&self, version: u32) -> Vec<u8> {
        format!("{}{version}", self.prefix).into_bytes()
    }

    fn find(&self, session: &Session, version: u32) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
        session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(self.label(version)),
        ])
    }

    fn handle(&self, session: &Session, version: u32) -> Result<ObjectHandle, CallError> {
        self.find(session, version)?
            .into_iter()
            .next()
            .ok_or(CallError::Missing)
    }

    /// Runs `call` with a session object holding `value` (a generic secret the module may
    /// wrap), destroyed afterwards whatever happened.
    fn with_secret_object<T>(
        session: &Session,
        value: &[u8],
        call: impl FnOnce(ObjectHandle) -> Result<T, Pkcs11Error>,
    ) -> Result<T, Pkcs11Error> {
        let mut template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Extractable(true),
            Attribute::Value(value.to_vec()),
        ];
        let created = session.create_object(&template);
        if let Attribute::Value(copy) = &mut template[5] {
            copy.zeroize();
        }
        let object = created?;
        let result = call(object);
        let destroyed = session.destroy_object(object);
        let value = result?;
        destroyed?;
        Ok(value)
    }
}

fn gcm<'a>(iv: &'a mut [u8], aad: &'a [u8]) -> Result<Mechanism<'a>, Pkcs11Error> {
    Ok(Mechanism::AesGcm(GcmParams::new(iv, aad, 128.into())?))
}

impl KekModule for Pkcs11Module {
    fn versions(&self) -> Result<Vec<u32>, KeyError> {
        let mut versions = self.call(0, |session| {
            // The search covers every secret key of a token that other deployments and
            // instances share, and it is not atomic with the reads of each object's label
            // that follow. An object destroyed in between is skipped
            // (CKR_OBJECT_HANDLE_INVALID). One changing under the read, its handle reused
            // by a new object, fails it with whatever code the half-changed object gives
            // (SoftHSM2: CKR_GENERAL_ERROR, CKR_ATTRIBUTE_VALUE_INVALID, a length that
            // changed between the two reads of the attribute): such a listing is taken
            // again from the search, and only a failure that persists is the module's.
            let mut attempt = 1;
            loop {
                match self.list_versions(session) {
                    Err(ListError::ObjectRead(_)) if attempt < LISTING_ATTEMPTS => attempt += 1,
                    Err(ListError::ObjectRead(error) | ListError::Search(error)) => {
                        return Err(error.into());
                    }
                    Ok(versions) => return Ok(versions),
                }
            }
        })?;
        versions.sort_unstable();
        versions.dedup();
        Ok(versions)
    }

    fn generate(&self, version: u32) -> Result<(), KeyError> {
        // One key, one mechanism: a KEK wraps (KW) or, in a module without KW, encrypts
        // (GCM); never both.
        let kw = self.kw_mechanism;
        self.call(version, |session| {
            for orphan in self.find(session, version)? {
                session.destroy_object(orphan)?;
            }
            session.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Modifiable(false),
                    Attribute::Copyable(false),
                    Attribute::Wrap(kw),
                    Attribute::Unwrap(kw),
                    Attribute::Encrypt(!kw),
                    Attribute::Decrypt(!kw),
                    Attribute::Label(self.label(version)),
                ],
            )?;
            Ok(())
        })
    }

    fn destroy(&self, version: u32) -> Result<(), KeyError> {
        self.call(version, |session| {
            for object in self.find(session, version)? {
                session.destroy_object(object)?;
            }
            Ok(())
        })
    }

    fn wraps_with_kw(&self, version: u32) -> Result<bool, KeyError> {
        if !self.kw_mechanism {
            return Ok(false);
        }
        self.call(version, |session| {
            let key = self.handle(session, version)?;
            Ok(session
                .get_attributes(key, &[AttributeType::Wrap])?
                .contains(&Attribute::Wrap(true)))
        })
    }

    fn wrap_kw(&self, version: u32, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.call(version, |session| {
            let key = self.handle(session, version)?;
            Ok(Self::with_secret_object(session, plaintext, |object| {
                session.wrap_key(&Mechanism::AesKeyWrap, key, object)
            })?)
        })
    }

    fn unwrap_kw(&self, version: u32, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let outcome = self.call(version, |session| {
            let key = self.handle(session, version)?;
            let object = match session.unwrap_key(
                &Mechanism::AesKeyWrap,
                key,
                wrapped,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ],
            ) {
                Ok(object) => object,
                // A wrong KEK, a changed wrap: fail closed (checked below, not retried).
                Err(error) if refused_input(&error) => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            let attributes = session.get_attributes(object, &[AttributeType::Value]);
            let destroyed = session.destroy_object(object);
            // The value's buffer moves into a wiping one, uncopied.
            let found = attributes?
                .into_iter()
                .find_map(|attribute| match attribute {
                    Attribute::Value(bytes) => Some(Zeroizing::new(bytes)),
                    _ => None,
                });
            destroyed?;
            Ok(found)
        })?;
        outcome.ok_or(KeyError::Crypto(CryptoError::Integrity))
    }

    fn encrypt_gcm(
        &self,
        version: u32,
        iv: &mut [u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let start = *iv;
        let (sealed, used) = self.call(version, |session| {
            let key = self.handle(session, version)?;
            let mut buffer = start;
            let sealed = session.encrypt(&gcm(&mut buffer, aad)?, key, plaintext)?;
            Ok((sealed, buffer))
        })?;
        *iv = used;
        Ok(sealed)
    }

    fn decrypt_gcm(
        &self,
        version: u32,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let outcome = self.call(version, |session| {
            let key = self.handle(session, version)?;
            let mut buffer = iv.to_vec();
            match session.decrypt(&gcm(&mut buffer, aad)?, key, ciphertext) {
                Ok(plaintext) => Ok(Some(Zeroizing::new(plaintext))),
                // A wrong tag and a wrong record both end here: fail closed.
                Err(error) if refused_input(&error) => Ok(None),
                Err(error) => Err(error.into()),
            }
        })?;
        outcome.ok_or(KeyError::Crypto(CryptoError::Integrity))
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
    use aes_gcm::aead::{Aead, KeyInit, Payload};

    /// The assertion the SoftHSM2 tests run through on every module call is live: off the
    /// module's thread (here, the test's own) it fails.
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "a PKCS#11 call outside the module's thread")]
    fn a_module_call_off_its_thread_fails_in_debug_builds() {
        assert_module_thread();
    }

    #[test]
    fn only_refused_input_counts_as_an_integrity_failure() {
        use cryptoki::context::Function;
        let rv = |error| Pkcs11Error::Pkcs11(error, Function::UnwrapKey);
        for refused in [
            RvError::WrappedKeyInvalid,
            RvError::WrappedKeyLenRange,
            RvError::EncryptedDataInvalid,
            RvError::EncryptedDataLenRange,
            RvError::GeneralError,
        ] {
            assert!(refused_input(&rv(refused)), "{refused:?}");
        }
        // The module failing is not the stored data failing: KEY_UNAVAILABLE, retryable.
        for failed in [
            RvError::DeviceError,
            RvError::DeviceMemory,
            RvError::HostMemory,
            RvError::FunctionFailed,
            RvError::MechanismInvalid,
            RvError::KeyHandleInvalid,
            RvError::UnwrappingKeyHandleInvalid,
            RvError::SessionHandleInvalid,
        ] {
            assert!(!refused_input(&rv(failed)), "{failed:?}");
        }
        assert!(!refused_input(&Pkcs11Error::NotSupported));
    }

    /// A module in software, to test the provider's own logic: it can lack KW, and it can
    /// write its own GCM IV over the caller's, as some modules do.
    struct Double {
        kw: bool,
        own_iv: Option<[u8; 12]>,
        keys: Mutex<HashMap<u32, [u8; 32]>>,
    }

    impl Double {
        fn provider(kw: bool, own_iv: Option<[u8; 12]>) -> Pkcs11KekProvider {
            let double = Double {
                kw,
                own_iv,
                keys: Mutex::new(HashMap::new()),
            };
            // No cache: every unwrap reaches the module.
            let provider = Pkcs11KekProvider::with_module(Box::new(double), 0, Duration::ZERO);
            provider.provision(1).unwrap();
            provider
        }

        fn key(&self, version: u32) -> Result<[u8; 32], KeyError> {
            self.keys
                .lock()
                .unwrap()
                .get(&version)
                .copied()
                .ok_or(KeyError::MaterialMissing { version })
        }
    }

    impl KekModule for Double {
        fn versions(&self) -> Result<Vec<u32>, KeyError> {
            Ok(self.keys.lock().unwrap().keys().copied().collect())
        }

        fn generate(&self, version: u32) -> Result<(), KeyError> {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).unwrap();
            self.keys.lock().unwrap().insert(version, key);
            Ok(())
        }

        fn destroy(&self, version: u32) -> Result<(), KeyError> {
            self.keys.lock().unwrap().remove(&version);
            Ok(())
        }

        fn wraps_with_kw(&self, version: u32) -> Result<bool, KeyError> {
            self.key(version).map(|_| self.kw)
        }

        fn wrap_kw(&self, version: u32, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
            let kek = aes_kw::KwAes256::new(&self.key(version)?.into());
            let mut wrapped = vec![0u8; plaintext.len() + aes_kw::IV_LEN];
            kek.wrap_key(plaintext, &mut wrapped)
                .map_err(|_| KeyError::Crypto(CryptoError::KeyLength))?;
            Ok(wrapped)
        }

        fn unwrap_kw(&self, version: u32, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            let kek = aes_kw::KwAes256::new(&self.key(version)?.into());
            let len = wrapped.len().saturating_sub(aes_kw::IV_LEN);
            let mut plaintext = Zeroizing::new(vec![0u8; len]);
            kek.unwrap_key(wrapped, &mut plaintext)
                .map_err(|_| KeyError::Crypto(CryptoError::Integrity))?;
            Ok(plaintext)
        }

        fn encrypt_gcm(
            &self,
            version: u32,
            iv: &mut [u8; 12],
            aad: &[u8],
            plaintext: &[u8],
        ) -> Result<Vec<u8>, KeyError> {
            if let Some(own) = self.own_iv {
                *iv = own;
            }
            let cipher = aes_gcm::Aes256Gcm::new(&self.key(version)?.into());
            Ok(cipher
                .encrypt(
                    (&*iv).into(),
                    Payload {
                        msg: plaintext,
                        aad,
                    },
                )
                .unwrap())
        }

        fn decrypt_gcm(
            &self,
            version: u32,
            iv: &[u8],
            aad: &[u8],
            ciphertext: &[u8],
        ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            let cipher = aes_gcm::Aes256Gcm::new(&self.key(version)?.into());
            cipher
                .decrypt(
                    <&aes_gcm::Nonce<_>>::try_from(iv)
                        .map_err(|_| KeyError::Crypto(CryptoError::Integrity))?,
                    Payload {
                        msg: ciphertext,
                        aad,
                    },
                )
                .map(Zeroizing::new)
                .map_err(|_| KeyError::Crypto(CryptoError::Integrity))
        }
    }

    #[test]
    fn a_module_that_writes_its_own_gcm_iv_still_unwraps() {
        let provider = Double::provider(false, Some([7; 12]));
        let dek = DataKey::generate().unwrap();
        let wrapped = provider.wrap(1, &dek, "r1").unwrap();
        let parts = split_wrapped(&wrapped).unwrap();
        let WrappedBody::Gcm { nonce, .. } = parts.body else {
            panic!("a KEK that only encrypts wraps with GCM");
        };
        assert_eq!(wrapped[0], 1);
        assert_eq!(nonce, [7; 12], "the IV the module used is stored");
        let unwrapped = provider.unwrap(&wrapped, "r1").unwrap();
        assert_eq!(unwrapped.secret().expose(), dek.secret().expose());
        assert!(matches!(
            provider.unwrap(&wrapped, "r2"),
            Err(KeyError::Crypto(CryptoError::Integrity))
        ));
    }

    #[test]
    fn kw_wraps_are_format_2_without_a_nonce_and_bound_to_their_record() {
        let provider = Double::provider(true, Some([7; 12]));
        let dek = DataKey::generate().unwrap();
        let wrapped = provider.wrap(1, &dek, "r1").unwrap();
        assert_eq!(wrapped[0], 2);
        assert!(matches!(
            split_wrapped(&wrapped).unwrap().body,
            WrappedBody::Kw(_)
        ));
        // Deterministic: the same key for the same record wraps the same way.
        assert_eq!(provider.wrap(1, &dek, "r1").unwrap(), wrapped);
        let unwrapped = provider.unwrap(&wrapped, "r1").unwrap();
        assert_eq!(unwrapped.secret().expose(), dek.secret().expose());
        assert!(matches!(
            provider.unwrap(&wrapped, "r2"),
            Err(KeyError::Crypto(CryptoError::Integrity))
        ));
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(provider.unwrap(&bad, "r1").is_err(), "byte {i}");
        }
        provider.destroy(1).unwrap();
        assert!(matches!(
            provider.unwrap(&wrapped, "r1"),
            Err(KeyError::MaterialMissing { version: 1 })
        ));
    }

    #[test]
    fn sm4_data_keys_are_not_wrapped_under_an_aes_module_key() {
        let provider = Double::provider(true, None);
        let dek = DataKey::generate_for(Suite::Sm4GcmHmacSm3).unwrap();
        assert!(matches!(
            provider.wrap(1, &dek, "r1"),
            Err(KeyError::Hsm(HsmError::Sm4DataKey))
        ));
    }

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
