//! Builds a running vault from configuration: opens the store and applies migrations,
//! loads the keyring, creates the initial administrator credential on first start, builds
//! the policy and binds the listener.
//!
//! [`Application::build`] binds before it returns, so with `listen = 127.0.0.1:0` tests
//! learn the real port from [`Application::local_addr`] and talk to a fully started server.
//! Shutdown: [`Application::run_until`] stops accepting connections when its signal fires
//! and waits for in-flight calls to finish before returning.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::crypto::Suite;
use crate::grpc::VaultService;
use crate::grpc_keys::KeyManagementService;
use crate::hsm::Pkcs11KekProvider;
use crate::key_admin::KeyAdmin;
use crate::keys::{
    KekProvider, KeyError, KeyManager, Keyring, KeyringError, LocalKekProvider, write_private_file,
};
use crate::policy::{CallerConfig, Policy, PolicyError, Rpc, token_sha256_hex};
use crate::proto::key_management_server::KeyManagementServer;
use crate::proto::vault_server::VaultServer;
use crate::store::{PostgresStore, SqliteStore, Store, StoreError};
use crate::vault::{Clock, SystemClock, Vault};

/// The caller name of the credential created on first start.
pub const ADMIN_CALLER: &str = "admin";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error("{0}")]
    Retention(#[from] crate::retention::RetentionError),
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("keys.provider: unknown KEK provider (use local or pkcs11)")]
    UnknownProvider,
    #[error("keys.pkcs11: required when keys.provider is pkcs11")]
    MissingPkcs11,
    #[error("keys.suite: unknown cipher suite (use aes256gcm-hmacsha256 or sm4gcm-hmacsm3)")]
    UnknownSuite,
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
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    vault: Arc<Vault>,
    admin_token_path: Option<PathBuf>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Application, StartupError> {
        Application::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`Application::build`], with the clock the vault judges dates by.
    pub async fn build_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Application, StartupError> {
        create_private_dir(&config.data_dir)?;
        let store = open_store(&config).await?;
        store.migrate().await?;
        let keys = open_keys(&config, &store, clock.now().timestamp_micros()).await?;
        let mut callers = config.callers.clone();
        let admin_token_path = if config.admin.enabled {
            let path = config.admin_token_path();
            callers.push(admin_caller(&path, &config)?);
            Some(path)
        } else {
            None
        };
        let policy = Policy::build(&config.purposes, &callers)?;
        let retention = crate::retention::Retention::build(&config.retention)?;
        let vault =
            Arc::new(Vault::new(store, keys, Arc::new(policy), clock).with_retention(retention));
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Application {
            listener,
            local_addr,
            vault,
            admin_token_path,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the initial administrator token lives, when that credential is enabled.
    pub fn admin_token_path(&self) -> Option<&Path> {
        self.admin_token_path.as_deref()
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then drains in-flight calls.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, "pdvault listening");
        let service = VaultServer::new(VaultService::new(self.vault.clone()));
        let keys = KeyManagementServer::new(KeyManagementService::new(KeyAdmin::new(self.vault)));
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(keys)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await?;
        tracing::info!("pdvault stopped");
        Ok(())
    }
}

/// Loads the keyring and connects it to the key state in the database.
pub async fn open_keys(
    config: &Config,
    store: &Arc<dyn Store>,
    now: i64,
) -> Result<Arc<KeyManager>, StartupError> {
    let path = config.keyring_path();
    let keyring = Keyring::load_or_create(&path, config.keys.create_if_missing)?;
    let seed_active = keyring.active_version();
    let (keks, blind_index, pseudonym) = keyring.into_parts();
    // With a hardware module the keyring file still holds the blind-index and pseudonym
    // keys (lookups need them in memory), and its KEK entries are not used.
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
    let suite = Suite::parse(&config.keys.suite).ok_or(StartupError::UnknownSuite)?;
    let manager = KeyManager::open(
        provider,
        seed_active,
        suite,
        (blind_index, pseudonym),
        store.clone(),
        now,
    )
    .await?;
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

/// The administrator caller, creating its token (mode 0600) on first start. The token is
/// random per installation; only its hash is kept in memory.
fn admin_caller(path: &Path, config: &Config) -> Result<CallerConfig, StartupError> {
    let io_error = |source| StartupError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        let token = zeroize::Zeroizing::new(generate_token().map_err(io_error)?);
        write_private_file(path, format!("{}\n", token.as_str()).as_bytes()).map_err(io_error)?;
        tracing::warn!(
            path = %path.display(),
            "created the initial administrator credential; keep it secret, and configure \
             least-privilege callers for services"
        );
    }
    let token = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io_error)?);
    Ok(CallerConfig {
        name: ADMIN_CALLER.to_owned(),
        token_sha256: token_sha256_hex(token.trim()),
        rpcs: Rpc::ALL.iter().map(|rpc| rpc.as_str().to_owned()).collect(),
        purposes: config.purposes.keys().cloned().collect(),
    })
}

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

fn create_private_dir(dir: &Path) -> Result<(), StartupError> {
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

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested; draining in-flight calls");
}
