//! The application: the server plumbing around the vault, and the top of the module graph
//! (nothing below imports `app`). This file is [`Application`]; beside it:
//!
//! - `transport.rs`: accepted connections (per-address and idle limits, keepalive).
//! - `health.rs`: `grpc.health.v1`, driven by database and key-provider probes.
//! - `reload.rs`: live policy reload (SIGHUP and `Admin.ReloadPolicy`).
//! - `admin.rs`: the `Admin` gRPC service. It sits here, not in `grpc/`, because what it
//!   does is operate the application (reload); `grpc/` holds the vault's own services and
//!   never imports `app`.
//!
//! [`Application`] builds a running vault from configuration: validates it, creates the data directory
//! private (or refuses an existing one open to group or others), opens the store and
//! applies migrations, loads the keyring, creates the initial administrator credential on
//! first start (only here: a reload never does), builds the policy, checks transport
//! security and binds the listeners.
//!
//! [`Application::build`] binds before it returns, so with `listen = 127.0.0.1:0` tests
//! learn the real port from [`Application::local_addr`] and talk to a fully started server.
//!
//! Serving stacks every gRPC service (vault, audit, account security, admin, health,
//! reflection v1 and v1alpha) behind the same layers: request ids and metrics outermost, then
//! admission (authentication, rates, the request read under a deadline, the concurrency
//! cap; see [`crate::grpc::admission`]), then the timeout. Connections come from
//! [`crate::app::transport::Incoming`] (per-peer limit, idle limit, TCP keepalive, back-off when
//! descriptors run out); each advertises `limits.max_streams_per_connection` and is pinged
//! over HTTP/2 so a dead peer's connection is closed.
//!
//! Before serving, the checkpoint signer (one per instance, its state file locked) signs a
//! checkpoint that introduces this process's audit chain and closes any chain an earlier
//! process of this instance left open.
//!
//! Shutdown, in order: [`Application::run_until`] marks health NOT_SERVING, stops accepting
//! connections when its signal fires and lets in-flight calls finish within the grace
//! period (each call commits its audit event before it answers); the audit writer is closed,
//! flushes what is still queued and stops; a last signed checkpoint closes this process's
//! chain at its final head; then the database pool closes.

pub mod admin;
pub mod health;
pub mod reload;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;

use crate::app::admin::AdminService;
use crate::app::reload::{ConfigSource, PolicyReloader};
use crate::app::transport::ConnectionLimits;
use crate::audit::{AuditLog, CheckpointError, CheckpointSigner, CheckpointSink};
use crate::config::{AuditConfig, Config};
use crate::crypto::Suite;
use crate::grpc::admission::AdmissionLayer;
use crate::grpc::keys::KeyManagementService;
use crate::grpc::limits::LiveLimits;
use crate::grpc::tls::TlsError;
use crate::grpc::{AccountSecurityService, AuditService, VaultService};
use crate::keys::pkcs11::Pkcs11KekProvider;
use crate::keys::{
    KekProvider, KeyError, KeyManager, Keyring, KeyringError, LocalKekProvider, write_private_file,
};
use crate::policy::{CallerConfig, Grant, Policy, PolicyError, Rpc, token_sha256_hex};
use crate::proto::account_security_server::AccountSecurityServer;
use crate::proto::admin_server::AdminServer;
use crate::proto::audit_server::AuditServer;
use crate::proto::key_management_server::KeyManagementServer;
use crate::proto::vault_server::VaultServer;
use crate::store::{PostgresStore, SqliteStore, Store, StoreError};
use crate::telemetry::RequestLayer;
use crate::vault::accounts::AccountRules;
use crate::vault::key_admin::KeyAdmin;
use crate::vault::{Clock, SystemClock, Vault};

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

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: Option<TcpListener>,
    tls: Option<ServerTlsConfig>,
    config: Config,
    vault: Arc<Vault>,
    audit_writer: tokio::task::JoinHandle<()>,
    reloader: Option<Arc<PolicyReloader>>,
    admin_token_path: Option<PathBuf>,
    /// The per-call limits, shared by admission and the policy reloader.
    limits: Arc<LiveLimits>,
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
        config.validate()?;
        crate::grpc::tls::check_listen(config.listen, &config.tls)?;
        let tls = crate::grpc::tls::server_tls_config(&config.tls)?;
        create_private_dir(&config.data_dir)?;
        let store = open_store(&config).await?;
        store.migrate().await?;
        let keys = open_keys(&config, &store, clock.now().timestamp_micros()).await?;
        let policy = build_policy(&config, AdminToken::CreateIfMissing)?;
        let rules = AccountRules::from_config(&config)?;
        let admin_token_path = config.admin.enabled.then(|| config.admin_token_path());
        let retention = crate::policy::retention::Retention::build(&config.retention)?;
        let signer = Arc::new(open_signer(&config)?);
        let (audit, audit_writer) =
            AuditLog::start(Arc::clone(&store), clock.now().timestamp_micros()).await?;
        signer.start_chain(audit.chain_id()).await;
        // A refusal or failure here is an alarm (logged, in health and metrics), not a
        // reason to stay down: the database's administrators must not be able to stop the
        // vault by tampering with the trail.
        let _ = signer
            .checkpoint(
                store.as_ref(),
                keys.audit_signing(),
                clock.now().timestamp_micros(),
                false,
            )
            .await;
        let vault = Arc::new(
            Vault::new(store, keys, Arc::new(policy), clock, audit, rules)
                .with_retention(retention)
                .with_request_id_ttl(config.retention.request_id_ttl())
                .with_checkpoint_signer(signer),
        );
        vault.set_max_batch_size(config.limits.max_batch_size);
        let (listener, local_addr) = bind(config.listen).await?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(bind(addr).await?.0),
            None => None,
        };
        let limits = Arc::new(LiveLimits::new(&config.limits));
        Ok(Application {
            listener,
            local_addr,
            metrics_listener,
            tls,
            config,
            vault,
            audit_writer,
            reloader: None,
            admin_token_path,
            limits,
        })
    }

    /// Lets SIGHUP and `Admin.ReloadPolicy` re-read the configuration from `source`; what
    /// it reads is compared with the configuration this application runs.
    pub fn with_reload(mut self, source: ConfigSource) -> Application {
        self.reloader = Some(Arc::new(PolicyReloader::new(
            source,
            self.config.clone(),
            Arc::clone(&self.vault),
            Arc::clone(&self.limits),
        )));
        self
    }

    /// The address of the Prometheus listener, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
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

    /// Serves until SIGINT or SIGTERM, reloading the policy on SIGHUP.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        #[cfg(unix)]
        let hangup = self
            .reloader
            .clone()
            .map(|reloader| tokio::spawn(crate::app::reload::reload_on_sighup(reloader)));
        let result = self.run_until(shutdown_signal()).await;
        #[cfg(unix)]
        if let Some(hangup) = hangup {
            hangup.abort();
        }
        result
    }

    /// Serves until `shutdown` completes, then drains in-flight calls for at most the
    /// grace period and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let config = self.config;
        let limits = &config.limits;
        let maintenance = tokio::spawn(audit_maintenance(
            Arc::clone(&self.vault),
            config.audit.clone(),
        ));
        let request_ids = tokio::spawn(crate::vault::expire_request_ids_periodically(Arc::clone(
            &self.vault,
        )));
        let abandoned_jobs = tokio::spawn(crate::vault::rewrap::interrupt_abandoned_periodically(
            Arc::clone(&self.vault),
        ));
        // Destructions by other instances reach this one through it.
        let key_states = tokio::spawn(crate::keys::manager::watch_key_states(Arc::clone(
            self.vault.keys(),
        )));
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Not serving until the first probe says otherwise.
        crate::app::health::set_not_serving(&reporter).await;
        let monitor = tokio::spawn(crate::app::health::monitor(
            reporter.clone(),
            Arc::clone(&self.vault),
            config.health.clone(),
        ));
        let metrics = self.metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics listening");
            }
            tokio::spawn(crate::telemetry::metrics::serve(
                listener,
                crate::telemetry::metrics::install(),
            ))
        });
        // Installed even without a listener, so the hooks always have a recorder.
        crate::telemetry::metrics::install();
        // Both reflection versions: grpcurl speaks v1, Python's grpcio-reflection and several
        // GUI clients only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let vault_service = VaultServer::new(VaultService::new(Arc::clone(&self.vault)))
            .max_decoding_message_size(limits.max_message_bytes);
        let audit_service = AuditServer::new(AuditService::new(Arc::clone(&self.vault)))
            .max_decoding_message_size(limits.max_message_bytes);
        let account_service =
            AccountSecurityServer::new(AccountSecurityService::new(Arc::clone(&self.vault)))
                .max_decoding_message_size(limits.max_message_bytes);
        let key_service = KeyManagementServer::new(KeyManagementService::new(KeyAdmin::new(
            Arc::clone(&self.vault),
        )))
        .max_decoding_message_size(limits.max_message_bytes);
        let admin_service = AdminServer::new(AdminService::new(
            Arc::clone(&self.vault),
            self.reloader.clone(),
        ))
        .max_decoding_message_size(limits.max_message_bytes);
        let layers = tower::ServiceBuilder::new()
            .layer(RequestLayer)
            .layer(AdmissionLayer::new(
                Arc::clone(&self.vault),
                Arc::clone(&self.limits),
                limits,
            ))
            .layer(self.limits.timeout_layer());
        let connections = ConnectionLimits::from_config(limits);
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection.max(1))
            .http2_keepalive_interval(Some(connections.http2_keepalive()))
            .http2_keepalive_timeout(Some(connections.http2_keepalive()));
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            .layer(layers)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(vault_service)
            .add_service(audit_service)
            .add_service(account_service)
            .add_service(key_service)
            .add_service(admin_service);

        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        let signal = {
            let reporter = reporter.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: no new connections; draining in-flight calls");
                monitor.abort();
                crate::app::health::set_not_serving(&reporter).await;
                let _ = stopping_tx.send(true);
            }
        };
        let grace = Duration::from_millis(config.shutdown.grace_period_ms);
        let grace_elapsed = async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        };
        tracing::info!(addr = %self.local_addr, tls = config.tls.cert_path.is_some(), "pdvault listening");
        let incoming = crate::app::transport::Incoming::new(self.listener, connections);
        let served = router.serve_with_incoming_shutdown(incoming, signal);
        let result = tokio::select! {
            result = served => result.map_err(StartupError::from),
            () = grace_elapsed => {
                tracing::warn!(
                    grace_ms = config.shutdown.grace_period_ms,
                    "grace period over with calls still in flight; abandoning them"
                );
                Ok(())
            }
        };
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        maintenance.abort();
        request_ids.abort();
        abandoned_jobs.abort();
        key_states.abort();
        // Calls still holding a vault handle now get AUDIT_UNAVAILABLE: nothing leaves
        // unaudited. What is queued is flushed before the writer stops.
        self.vault.audit().close();
        let drained = tokio::time::timeout(grace, self.audit_writer).await.is_ok();
        if !drained {
            tracing::error!("audit writer did not drain within the grace period");
        }
        if let Some(signer) = self.vault.checkpoint_signer() {
            // Closing the chain promises nothing follows its head: only once the writer is
            // done.
            let now = self.vault.now_micros();
            let store = self.vault.store();
            let key = self.vault.keys().audit_signing();
            if signer
                .checkpoint(store.as_ref(), key, now, drained)
                .await
                .is_ok()
            {
                tracing::info!(closed = drained, "final audit checkpoint written");
            }
            signer.close();
        }
        // A call abandoned at the end of the grace period may still hold a connection;
        // closing waits for it no longer than the grace period either.
        if tokio::time::timeout(grace, self.vault.store().close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close within the grace period");
        }
        tracing::info!("pdvault stopped");
        result
    }
}

/// Signs checkpoints every `checkpoint_interval_secs` and, about hourly, removes audit
/// segments past retention. Failures are logged (a refusal raises the signer's alarm) and
/// retried on the next tick: a missed checkpoint widens the window a cut tail could go
/// unseen, and shows in health once the newest is older than two intervals, but must not
/// stop serving.
async fn audit_maintenance(vault: Arc<Vault>, config: AuditConfig) {
    let (store, keys) = (vault.store(), vault.keys());
    let signer = vault.checkpoint_signer().cloned();
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
        let now = vault.now_micros();
        if let Some(signer) = &signer {
            // The signer logs its own failures and alarms.
            let _ = signer
                .checkpoint(store.as_ref(), keys.audit_signing(), now, false)
                .await;
        }
        // Zero keeps the trail forever (config::validate refuses retentions that would
        // destroy it).
        if config.retention_days != 0 && tick % ticks_per_expiry == 0 {
            let cutoff = now.saturating_sub(retention_micros);
            match crate::audit::expire(store.as_ref(), keys.audit_signing(), cutoff, now).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "expired audit events past retention"),
                Err(error) => tracing::error!(%error, "audit retention failed"),
            }
        }
    }
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

/// Accepted connections with Nagle's algorithm off: gRPC writes small frames, and Nagle
/// against the peer's delayed ACK stalls a response for up to 40 ms. tonic's own
/// `tcp_nodelay` setting does not reach a listener handed in like this one.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let bind_error = |source| StartupError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
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
