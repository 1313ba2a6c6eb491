//! The application: the server plumbing around the vault, and the top of the module graph
//! (nothing below imports `app`). This file is [`Application`]; beside it:
//!
//! - `transport.rs`: accepted connections (per-address and idle limits, keepalive).
//! - `health.rs`: `grpc.health.v1`, driven by database and key-provider probes.
//! - `reload.rs`: live policy reload (SIGHUP and `Admin.ReloadPolicy`).
//! - `build.rs`: what startup and the reload both build from a configuration (policy, store,
//!   keys, signer, data directory) and `StartupError`.
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
//! cap; see [`crate::grpc::admission`], which holds the three layers in order), then the timeout. Connections come from
//! [`crate::app::transport::Incoming`] (per-peer limit, idle limit, TCP keepalive, back-off when
//! descriptors run out); each advertises `limits.max_streams_per_connection` and is pinged
//! over HTTP/2 so a dead peer's connection is closed.
//!
//! Before serving, the checkpoint signer (one per instance, its state file locked) signs a
//! checkpoint that introduces this process's audit chain and closes any chain an earlier
//! process of this instance left open.
//!
//! Every background task belongs to one of two [`Tasks`] groups (see [`crate::tasks`]):
//! the vault's (maintenance, sweeps, health, reloads, rewrap jobs, export streams) and the
//! infrastructure they use until their end (the audit writer, the key-state watcher, the
//! metrics listener). Nothing is aborted at shutdown.
//!
//! Shutdown, in order, when [`Application::run_until`]'s signal fires: the vault's tasks are
//! cancelled (each stops at its next safe point: a rewrap job before its next batch) and,
//! once the health monitor has returned, health is NOT_SERVING; no connection is accepted
//! and in-flight calls finish within the grace period (each call commits its audit event
//! before it answers); the vault's tasks are waited for, within the same grace period (a
//! rewrap job records its summary event and its row INTERRUPTED); the audit writer is
//! closed, flushes what is still queued and stops; a last signed checkpoint closes this
//! process's chain at its final head; the key-state watcher and the metrics listener stop;
//! then the database pool closes.

pub mod admin;
pub mod build;
pub mod health;
pub mod reload;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::transport::ServerTlsConfig;

use crate::app::admin::AdminService;
pub use crate::app::build::{
    ADMIN_CALLER, AdminToken, StartupError, build_policy, create_private_dir, generate_token,
    open_keys, open_signer, open_store, open_store_read_only,
};
use crate::app::reload::{ConfigSource, PolicyReloader};
use crate::app::transport::ConnectionLimits;
use crate::audit::AuditLog;
use crate::config::{AuditConfig, Config};
use crate::grpc::admission;
use crate::grpc::keys::KeyManagementService;
use crate::grpc::limits::LiveLimits;
use crate::grpc::{AccountSecurityService, AuditService, VaultService};
use crate::proto::account_security_server::AccountSecurityServer;
use crate::proto::admin_server::AdminServer;
use crate::proto::audit_server::AuditServer;
use crate::proto::key_management_server::KeyManagementServer;
use crate::proto::vault_server::VaultServer;
use crate::tasks::Tasks;
use crate::vault::accounts::AccountRules;
use crate::vault::key_admin::KeyAdmin;
use crate::vault::{Clock, SystemClock, Vault};

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: Option<TcpListener>,
    tls: Option<ServerTlsConfig>,
    config: Config,
    vault: Arc<Vault>,
    /// The tasks every other one needs until its end: the audit writer (`audit_writer`),
    /// the key-state watcher and the metrics listener. Stopped last.
    infrastructure: Tasks,
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
        let infrastructure = Tasks::new();
        let (audit, audit_writer) = AuditLog::start_in(
            Arc::clone(&store),
            clock.now().timestamp_micros(),
            &infrastructure,
        )
        .await?;
        signer.start_chains(audit.chains()).await;
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
            infrastructure,
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
        if let Some(reloader) = self.reloader.clone() {
            let tasks = self.vault.tasks();
            tasks.spawn(crate::app::reload::reload_on_sighup(
                reloader,
                tasks.token(),
            ));
        }
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then drains in-flight calls and the background
    /// tasks for at most the grace period, the audit writer's queue, and closes the store
    /// (the order is in the module header).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let config = self.config;
        let limits = &config.limits;
        let jobs = self.vault.tasks().clone();
        let infrastructure = self.infrastructure;
        jobs.spawn(audit_maintenance(
            Arc::clone(&self.vault),
            config.audit.clone(),
            jobs.token(),
        ));
        jobs.spawn(crate::vault::expire_request_ids_periodically(
            Arc::clone(&self.vault),
            jobs.token(),
        ));
        jobs.spawn(crate::vault::rewrap::interrupt_abandoned_periodically(
            Arc::clone(&self.vault),
            jobs.token(),
        ));
        // Destructions by other instances reach this one through it, until the last call
        // and job are done.
        infrastructure.spawn(crate::keys::manager::watch_key_states(
            Arc::clone(self.vault.keys()),
            infrastructure.token(),
        ));
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Not serving until the first probe says otherwise.
        crate::app::health::set_not_serving(&reporter).await;
        let monitor = jobs.spawn(crate::app::health::monitor(
            reporter.clone(),
            Arc::clone(&self.vault),
            config.health.clone(),
            jobs.token(),
        ));
        if let Some(listener) = self.metrics_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics listening");
            }
            infrastructure.spawn(crate::telemetry::metrics::serve(
                listener,
                crate::telemetry::metrics::install(),
                infrastructure.clone(),
            ));
        }
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
        let layers = admission::layers(Arc::clone(&self.vault), Arc::clone(&self.limits), limits);
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

        let grace = Duration::from_millis(config.shutdown.grace_period_ms);
        // When the grace period ends: set once the signal fired.
        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(None::<Instant>);
        let stopping = stopping_rx.clone();
        let signal = {
            let (reporter, jobs) = (reporter.clone(), jobs.clone());
            async move {
                shutdown.await;
                let deadline = Instant::now() + grace;
                tracing::info!(
                    "shutting down: no new connections; draining in-flight calls; background \
                     jobs stop at their next safe point"
                );
                jobs.cancel();
                // Once the monitor has returned, no late probe marks the vault SERVING again.
                let _ = monitor.await;
                crate::app::health::set_not_serving(&reporter).await;
                let _ = stopping_tx.send(Some(deadline));
            }
        };
        let grace_elapsed = async move {
            let deadline = match stopping_rx.wait_for(Option::is_some).await {
                Ok(deadline) => *deadline,
                Err(_) => None,
            };
            if let Some(deadline) = deadline {
                tokio::time::sleep_until(deadline).await;
            }
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
        // Cancelled with the signal already (here too when serving failed without one). A
        // job still in a batch at the deadline is left to commit or roll it back whole.
        let deadline = (*stopping.borrow()).unwrap_or_else(|| Instant::now() + grace);
        if !jobs.stop(deadline).await {
            tracing::warn!(
                running = jobs.len(),
                "background jobs still running at the end of the grace period; each finishes \
                 or rolls back its batch on its own"
            );
        }
        // Calls still holding a vault handle now get AUDIT_UNAVAILABLE: nothing leaves
        // unaudited. What is queued is flushed before the writer stops. The writer gets a
        // grace period of its own, counted from here, even when the first one is spent: it
        // holds events that were accepted before the signal. What follows shares that one
        // deadline, so the whole shutdown takes at most two grace periods from the signal
        // (plus the final checkpoint's write).
        self.vault.audit().close();
        let closing = Instant::now() + grace;
        let drained = tokio::time::timeout_at(closing, self.audit_writer)
            .await
            .is_ok();
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
        if !infrastructure.stop(closing).await {
            tracing::warn!(
                running = infrastructure.len(),
                "the key-state watcher or a metrics scrape did not stop within the grace period"
            );
        }
        // A call abandoned at the end of the grace period may still hold a connection;
        // closing waits for it no longer than the writer's deadline either.
        if tokio::time::timeout_at(closing, self.vault.store().close())
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
/// segments past retention, until `stop` is cancelled (a round once begun finishes; the
/// shutdown checkpoint follows the writer's last flush). Failures are logged (a refusal
/// raises the signer's alarm) and retried on the next tick: a missed checkpoint widens the
/// window a cut tail could go unseen, and shows in health once the newest is older than two
/// intervals, but must not stop serving.
async fn audit_maintenance(
    vault: Arc<Vault>,
    config: AuditConfig,
    stop: tokio_util::sync::CancellationToken,
) {
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
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
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
