//! Builds a running vault from configuration: opens the store and applies migrations,
//! loads the keyring, creates the initial administrator credential on first start, builds
//! the policy and binds the listener.
//!
//! [`Application::build`] binds before it returns, so with `listen = 127.0.0.1:0` tests
//! learn the real port from [`Application::local_addr`] and talk to a fully started server.
//!
//! Shutdown, in order: [`Application::run_until`] stops accepting connections when its
//! signal fires and waits for in-flight calls to finish; dropping the last vault handle
//! closes the audit queue, whose writer flushes what is left and stops; the maintenance task
//! is stopped; a last signed checkpoint seals every chain's head; then it returns.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::accounts::AccountRules;
use crate::audit::AuditLog;
use crate::config::{AuditConfig, Config};
use crate::grpc::{AccountSecurityService, AuditService, VaultService};
use crate::keys::{Keyring, KeyringError, write_private_file};
use crate::policy::{CallerConfig, Grant, Policy, PolicyError, Rpc, token_sha256_hex};
use crate::proto::account_security_server::AccountSecurityServer;
use crate::proto::audit_server::AuditServer;
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
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
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
    store: Arc<dyn Store>,
    keys: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    audit_writer: tokio::task::JoinHandle<()>,
    audit_config: AuditConfig,
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
        let keys = Keyring::load_or_create(&config.keyring_path(), config.keys.create_if_missing)?;
        let mut callers = config.callers.clone();
        let admin_token_path = if config.admin.enabled {
            let path = config.admin_token_path();
            callers.push(admin_caller(&path, &config)?);
            Some(path)
        } else {
            None
        };
        let policy = Policy::build(&config.purposes, &callers)?;
        let rules = AccountRules::from_config(&config)?;
        let keys = Arc::new(keys);
        let (audit, audit_writer) =
            AuditLog::start(Arc::clone(&store), clock.now().timestamp_micros()).await?;
        let vault = Arc::new(Vault::new(
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::new(policy),
            Arc::clone(&clock),
            audit,
            rules,
        ));
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
            store,
            keys,
            clock,
            audit_writer,
            audit_config: config.audit,
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
        let maintenance = tokio::spawn(audit_maintenance(
            Arc::clone(&self.store),
            Arc::clone(&self.keys),
            Arc::clone(&self.clock),
            self.audit_config.clone(),
        ));
        let served = tonic::transport::Server::builder()
            .add_service(VaultServer::new(VaultService::new(Arc::clone(&self.vault))))
            .add_service(AuditServer::new(AuditService::new(Arc::clone(&self.vault))))
            .add_service(AccountSecurityServer::new(AccountSecurityService::new(
                Arc::clone(&self.vault),
            )))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await;
        // The server has dropped its services; dropping ours closes the audit queue.
        drop(self.vault);
        if self.audit_writer.await.is_err() {
            tracing::error!("audit writer task failed");
        }
        maintenance.abort();
        let now = self.clock.now().timestamp_micros();
        match crate::audit::write_checkpoint(self.store.as_ref(), self.keys.audit_signing(), now)
            .await
        {
            Ok(_) => tracing::info!("final audit checkpoint written"),
            Err(error) => tracing::error!(%error, "could not write the final audit checkpoint"),
        }
        served?;
        tracing::info!("pdvault stopped");
        Ok(())
    }
}

/// Signs checkpoints every `checkpoint_interval_secs` and, about hourly, removes audit
/// segments past retention. Failures are logged and retried on the next tick: a missed
/// checkpoint widens the window a cut tail could go unseen, but must not stop serving.
async fn audit_maintenance(
    store: Arc<dyn Store>,
    keys: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    config: AuditConfig,
) {
    let interval = std::time::Duration::from_secs(config.checkpoint_interval_secs.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let ticks_per_expiry = (3600 / config.checkpoint_interval_secs.max(1)).max(1);
    let retention_micros = i64::try_from(config.retention_days)
        .unwrap_or(i64::MAX / 86_400_000_000)
        .saturating_mul(86_400_000_000);
    for tick in 1u64.. {
        ticker.tick().await;
        let now = clock.now().timestamp_micros();
        if let Err(error) =
            crate::audit::write_checkpoint(store.as_ref(), keys.audit_signing(), now).await
        {
            tracing::error!(%error, "audit checkpoint failed");
        }
        if tick % ticks_per_expiry == 0 {
            let cutoff = now.saturating_sub(retention_micros);
            match crate::audit::expire(store.as_ref(), keys.audit_signing(), cutoff, now).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "expired audit events past retention"),
                Err(error) => tracing::error!(%error, "audit retention failed"),
            }
        }
    }
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
        grants: Grant::ALL.iter().map(|g| g.as_str().to_owned()).collect(),
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
