//! What the application is built from, shared by [`super::Application`] at startup and by the
//! live reload (`reload.rs`): the policy with the administrator's caller (created on first
//! start only; a reload never mints a credential), the store, the key manager, the checkpoint
//! signer, the private data directory, and [`StartupError`], what building any of them fails
//! with. Its own file so that `reload.rs` rebuilds a policy without importing the
//! `Application` that drives it (`mod.rs` → `admin.rs` → `reload.rs` → `build.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{CheckpointError, CheckpointSigner, CheckpointSink};
use crate::config::Config;
use crate::crypto::Suite;
use crate::grpc::tls::TlsError;
use crate::keys::manager::KEK_KIND;
use crate::keys::pkcs11::Pkcs11KekProvider;
use crate::keys::{
    KekProvider, KeyError, KeyManager, Keyring, KeyringError, LocalKekProvider, write_private_file,
};
use crate::policy::{CallerConfig, Grant, Policy, PolicyError, Rpc, token_sha256_hex};
use crate::store::{PostgresStore, SqliteStore, Store, StoreError};

/// The caller name of the credential created on first start.
pub const ADMIN_CALLER: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The data directory holds the database, keyring and tokens: open to anyone but the
    /// vault's user, it is refused, as the keyring file is.
    #[error(
        "data_dir {path}: the directory is open to group or others (mode {mode:o}); chmod 700 it"
    )]
    DataDirPermissions { path: PathBuf, mode: u32 },
    /// A reload found the administrator token file gone: it never mints a new credential.
    #[error(
        "admin.token_path {0}: the administrator token file is missing; a reload never \
         creates a credential (restore the file, or restart to create a new one)"
    )]
    AdminTokenMissing(PathBuf),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("admin token: {0}")]
    SecretFile(#[from] crate::keys::SecretFileError),
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error("{0}")]
    Retention(#[from] crate::policy::retention::RetentionError),
    #[error("audit checkpoints: {0}")]
    Checkpoints(#[from] CheckpointError),
    #[error("audit.checkpoint_sink: empty (use stdout or the path of a file)")]
    CheckpointSink,
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("keys.provider: unknown KEK provider (use local or pkcs11)")]
    UnknownProvider,
    #[error("keys.pkcs11: required when keys.provider is pkcs11")]
    MissingPkcs11,
    #[error("keys.suite: unknown cipher suite (use aes256gcm-hmacsha256 or sm4gcm-hmacsm3)")]
    UnknownSuite,
    /// PKCS#11 modules hold AES KEKs; an SM4 deployment wraps with SM4 (the local provider).
    #[error(
        "keys.suite: sm4gcm-hmacsm3 wraps data keys with SM4, and the PKCS#11 provider's KEKs \
         are AES-256: use keys.provider = \"local\" with SM4, or the AES suite with pkcs11"
    )]
    Sm4WithPkcs11,
    #[error("database.url: unsupported scheme (use sqlite: or postgres://)")]
    UnsupportedDatabase,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}
/// This instance's checkpoint signer, its state file locked for this process.
pub fn open_signer(config: &Config) -> Result<CheckpointSigner, StartupError> {
    let sink =
        CheckpointSink::parse(&config.audit.checkpoint_sink).ok_or(StartupError::CheckpointSink)?;
    let interval = Duration::from_secs(config.audit.checkpoint_interval_secs.max(1));
    Ok(CheckpointSigner::open(
        &config.audit_signer_state_path(),
        sink,
        interval,
    )?)
}

/// Whether building the policy may create the administrator token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminToken {
    /// First start: create it when missing.
    CreateIfMissing,
    /// Live reload: it must exist; a reload never creates a credential.
    MustExist,
}

/// The policy `config` describes, with the administrator caller when enabled. Startup and
/// live reload both build it here, so both validate the same way; only startup may create
/// the administrator's token.
pub fn build_policy(config: &Config, admin_token: AdminToken) -> Result<Policy, StartupError> {
    let mut callers = config.callers.clone();
    if config.admin.enabled {
        callers.push(admin_caller(
            &config.admin_token_path(),
            config,
            admin_token,
        )?);
    }
    Ok(Policy::build(&config.purposes, &callers)?)
}

/// Loads the keyring and connects it to the key state in the database.
pub async fn open_keys(
    config: &Config,
    store: &Arc<dyn Store>,
    now: i64,
) -> Result<Arc<KeyManager>, StartupError> {
    let suite = Suite::parse(&config.keys.suite).ok_or(StartupError::UnknownSuite)?;
    if suite == Suite::Sm4GcmHmacSm3 && config.keys.provider == "pkcs11" {
        return Err(StartupError::Sm4WithPkcs11);
    }
    let path = config.keyring_path();
    let keyring = Keyring::load_or_create(&path, config.keys.create_if_missing)?;
    let seed_active = keyring.active_version();
    let (keks, resident) = keyring.into_parts();
    // With a hardware module the keyring file still holds the blind-index and pseudonym
    // keys of every index version (lookups need them in memory), and its KEK entries are
    // not used.
    let provider: Box<dyn KekProvider> = match config.keys.provider.as_str() {
        "local" => Box::new(LocalKekProvider::new(&path, keks)),
        "pkcs11" => {
            let pkcs11 = config
                .keys
                .pkcs11
                .as_ref()
                .ok_or(StartupError::MissingPkcs11)?;
            let provider = Pkcs11KekProvider::open(pkcs11)?;
            if provider.versions()?.is_empty() {
                // A first start, unless the database already names KEK versions: then
                // the module lost them (or answered a listing wrongly), and generating
                // version 1 would replace, so destroy, a KEK of that name. Refused, never
                // re-provisioned.
                let recorded = store.key_versions(KEK_KIND).await?;
                if let Some(newest) = recorded.iter().map(|row| row.version).max() {
                    return Err(KeyError::MaterialMissing { version: newest }.into());
                }
                drop(keks);
                provider.provision(1)?;
            }
            Box::new(provider)
        }
        _ => return Err(StartupError::UnknownProvider),
    };
    let seed_active = if config.keys.provider == "local" {
        seed_active
    } else {
        provider.versions()?.into_iter().max().unwrap_or(1)
    };
    let manager = KeyManager::open(
        provider,
        seed_active,
        suite,
        resident,
        Some(&path),
        store.clone(),
        now,
    )
    .await?
    .with_state_cache(Duration::from_millis(config.keys.state_cache_ms.max(1)));
    Ok(Arc::new(manager))
}

/// Opens the store `database.url` names (or the embedded SQLite default).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartupError> {
    let url = config.database_url();
    let max = config.database.max_connections;
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open_url(&url, max).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(&url, max).await?))
    } else {
        Err(StartupError::UnsupportedDatabase)
    }
}

/// Opens the existing database `database.url` names for reading only: no file or database
/// is created and no migration runs (`pdvault audit verify`).
pub async fn open_store_read_only(config: &Config) -> Result<Arc<dyn Store>, StartupError> {
    let url = config.database_url();
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open_read_only(&url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_read_only(&url).await?))
    } else {
        Err(StartupError::UnsupportedDatabase)
    }
}

/// The administrator caller, creating its token (mode 0600) on first start. The token is
/// random per installation; only its hash is kept in memory.
fn admin_caller(
    path: &Path,
    config: &Config,
    admin_token: AdminToken,
) -> Result<CallerConfig, StartupError> {
    let io_error = |source| StartupError::Io {
        path: path.to_owned(),
        source,
    };
    let exists = path.try_exists().map_err(io_error)?;
    if !exists && admin_token == AdminToken::MustExist {
        return Err(StartupError::AdminTokenMissing(path.to_owned()));
    }
    if !exists {
        let token = zeroize::Zeroizing::new(generate_token().map_err(io_error)?);
        write_private_file(path, format!("{}\n", token.as_str()).as_bytes()).map_err(io_error)?;
        tracing::warn!(
            path = %path.display(),
            "created the initial administrator credential; keep it secret, and configure \
             least-privilege callers for services"
        );
    }
    // Refused when group or others can read it, as the keyring is: the token grants
    // everything.
    let token = crate::keys::read_secret_file(path, MAX_TOKEN_FILE)?;
    Ok(CallerConfig {
        name: ADMIN_CALLER.to_owned(),
        token_sha256: token_sha256_hex(&token),
        rpcs: Rpc::ALL.iter().map(|rpc| rpc.as_str().to_owned()).collect(),
        purposes: config.purposes.keys().cloned().collect(),
        grants: Grant::ALL.iter().map(|g| g.as_str().to_owned()).collect(),
        ..CallerConfig::default()
    })
}

/// Tokens are short; a much longer file is not a token file.
const MAX_TOKEN_FILE: u64 = 4096;

/// A fresh bearer token: 256 bits from the OS generator.
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).map_err(std::io::Error::other)?;
    Ok(format!(
        "pdv_{}",
        data_encoding::BASE32_NOPAD
            .encode(bytes.as_ref())
            .to_lowercase()
    ))
}

/// Creates the data directory with mode 0700, or checks that an existing one is closed to
/// group and others: it holds the database, keyring, tokens and signer state.
pub fn create_private_dir(dir: &Path) -> Result<(), StartupError> {
    let io_error = |source| StartupError::Io {
        path: dir.to_owned(),
        source,
    };
    if dir.try_exists().map_err(io_error)? {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)
                .map_err(io_error)?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(StartupError::DataDirPermissions {
                    path: dir.to_owned(),
                    mode,
                });
            }
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| StartupError::Io {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn an_admin_token_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let config = Config::default();
        // Created private, and read back.
        let caller = admin_caller(&path, &config, AdminToken::CreateIfMissing).unwrap();
        assert_eq!(caller.name, ADMIN_CALLER);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Refused at start and on every policy reload alike.
        match admin_caller(&path, &config, AdminToken::MustExist) {
            Err(StartupError::SecretFile(crate::keys::SecretFileError::Exposed {
                mode, ..
            })) => assert_eq!(mode, 0o644),
            other => panic!("{:?}", other.map(|caller| caller.name)),
        }
    }
}
