//! Live policy reload: purposes and callers are re-read from the configuration the server
//! started with, on SIGHUP or the `Admin.ReloadPolicy` RPC, without dropping a connection.
//!
//! The new configuration goes through exactly the validation startup applies, in full,
//! before anything changes; only then is the whole [`Policy`] swapped in one atomic store.
//! A call that already authenticated finishes under the policy it started with; the next
//! call sees the new one. An invalid file changes nothing, and the reason is logged and
//! returned. Other settings (listen address, database, TLS) are read at start only.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Config, ConfigError, FlagOverrides};
use crate::policy::Policy;
use crate::startup::{StartupError, build_policy};
use crate::vault::Vault;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Policy(#[from] StartupError),
}

/// Where the running configuration came from, so it can be read again the same way.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub flags: FlagOverrides,
}

/// What a successful reload put in force.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    pub policy: Arc<Policy>,
}

pub struct PolicyReloader {
    source: ConfigSource,
    vault: Arc<Vault>,
    generation: AtomicU64,
    /// Serialises reloads so two at once cannot interleave read and swap.
    running: tokio::sync::Mutex<()>,
}

impl PolicyReloader {
    pub fn new(source: ConfigSource, vault: Arc<Vault>) -> PolicyReloader {
        PolicyReloader {
            source,
            vault,
            generation: AtomicU64::new(0),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads, validates and swaps in the policy, or changes nothing and says why. Either
    /// way the attempt is an audit event naming `actor`.
    pub async fn reload(&self, actor: &str) -> Result<Reloaded, ReloadError> {
        let _running = self.running.lock().await;
        let result = Config::load(self.source.file.as_deref(), &self.source.flags)
            .map_err(ReloadError::from)
            .and_then(|config| Ok(build_policy(&config)?));
        match result {
            Ok(policy) => {
                let policy = Arc::new(policy);
                self.vault.replace_policy(Arc::clone(&policy));
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::info!(
                    generation,
                    callers = policy.caller_names().count(),
                    purposes = policy.purpose_names().count(),
                    "policy reloaded"
                );
                self.audit(actor, "OK", None).await;
                Ok(Reloaded { generation, policy })
            }
            Err(error) => {
                tracing::error!(%error, "policy reload refused; the running policy stays in force");
                self.audit(actor, "INVALID", Some("POLICY_INVALID".into()))
                    .await;
                Err(error)
            }
        }
    }

    async fn audit(&self, actor: &str, outcome: &str, reason: Option<String>) {
        if let Err(error) = self
            .vault
            .audit_operation(actor, "ReloadPolicy", outcome, reason)
            .await
        {
            tracing::error!(%error, "could not audit a policy reload");
        }
    }
}

/// Reloads on every SIGHUP, for as long as the server runs.
#[cfg(unix)]
pub async fn reload_on_sighup(reloader: Arc<PolicyReloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; reload with the Admin RPC");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the policy");
        // The outcome is logged by reload itself.
        let _ = reloader.reload("signal:SIGHUP").await;
    }
}
