//! `grpc.health.v1.Health`: what load balancers and `grpc_health_probe` ask before sending
//! traffic. The vault is serving only while both things every call needs answer: the
//! database (a round trip on a pooled connection) and the key provider (a data key wrapped
//! and unwrapped under the active key, exactly as a create and a read would use it).
//!
//! Probes run on a timer rather than per health request, so a storm of probes cannot load
//! the database, and each has a timeout: a database that hangs is as unhealthy as one that
//! refuses.
//!
//! Audit checkpoints are reported apart, as the service name `pdvault.audit.checkpoint`:
//! NOT_SERVING while the signer refuses to sign (the trail in the database does not continue
//! from what it signed), while the witness sink fails, or once the newest checkpoint is older
//! than twice the interval. It is an alarm for operators, not a reason to take the vault out
//! of a load balancer, so it does not touch the vault's own status.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::HealthConfig;
use crate::vault::Vault;

/// The service names health is reported for: the server as a whole ("") and the vault.
const SERVICES: [&str; 2] = ["", "pdvault.v1.Vault"];
/// The health name of this instance's audit checkpoints.
pub const CHECKPOINT_SERVICE: &str = "pdvault.audit.checkpoint";
const PROBE_RECORD_ID: &str = "health-probe";

/// Why a probe failed; logged, never returned to clients.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("database: {0}")]
    Database(#[source] crate::store::StoreError),
    #[error("key provider: {0}")]
    Keys(#[source] crate::keys::KeyError),
    /// The blocking task of the key provider's probe panicked or was cancelled.
    #[error("key provider: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("{0} probe timed out")]
    Timeout(&'static str),
}

/// Probes the vault's dependencies every `interval_ms` and publishes the result, forever.
/// Status changes are logged once each, not on every probe.
pub async fn monitor(reporter: HealthReporter, vault: Arc<Vault>, config: HealthConfig) {
    let interval = Duration::from_millis(config.interval_ms.max(10));
    let timeout = Duration::from_millis(config.probe_timeout_ms.max(1));
    let mut last: Option<bool> = None;
    let mut last_checkpoint_health: Option<bool> = None;
    loop {
        if let Some(signer) = vault.checkpoint_signer() {
            let health = signer.health();
            crate::telemetry::metrics::record_checkpoint_health(&health);
            let ok = health.ok();
            if last_checkpoint_health != Some(ok) {
                if ok {
                    tracing::info!("health: audit checkpoints current");
                } else {
                    tracing::error!(
                        age_secs = health.age.as_secs(),
                        stale = health.stale,
                        alarm = health.alarm.as_deref().unwrap_or(""),
                        witness_failure = health.witness_failure.as_deref().unwrap_or(""),
                        "health: audit checkpoints NOT current"
                    );
                }
                let status = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter
                    .set_service_status(CHECKPOINT_SERVICE, status)
                    .await;
                last_checkpoint_health = Some(ok);
            }
        }
        let result = probe(&vault, timeout).await;
        let serving = result.is_ok();
        if last != Some(serving) {
            match &result {
                Ok(()) => tracing::info!("health: serving"),
                Err(error) => tracing::warn!(%error, "health: not serving"),
            }
            set_all(&reporter, serving).await;
            last = Some(serving);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Marks every service NOT_SERVING, as on shutdown.
pub async fn set_not_serving(reporter: &HealthReporter) {
    set_all(reporter, false).await;
}

async fn set_all(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// One round of probes.
pub async fn probe(vault: &Vault, timeout: Duration) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout, vault.store().ping())
        .await
        .map_err(|_| ProbeError::Timeout("database"))?
        .map_err(ProbeError::Database)?;
    let keys = Arc::clone(vault.keys());
    let round_trip = tokio::task::spawn_blocking(move || {
        let dek = keys.generate_data_key()?;
        let (wrapped, _) = keys.wrap(&dek, PROBE_RECORD_ID)?;
        keys.unwrap_cached_state(&wrapped, PROBE_RECORD_ID)
            .map(drop)
    });
    tokio::time::timeout(timeout, round_trip)
        .await
        .map_err(|_| ProbeError::Timeout("key provider"))?
        .map_err(ProbeError::Task)?
        .map_err(ProbeError::Keys)
}
