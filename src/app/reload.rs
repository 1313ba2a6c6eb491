//! Live policy reload: callers, purposes, account rules and the per-call limits are re-read
//! from the configuration the server started with, on SIGHUP or the `Admin.ReloadPolicy`
//! RPC, without dropping a connection.
//!
//! The new configuration goes through exactly the validation startup applies, in full,
//! before anything changes; only then are the whole [`Policy`] and the account rules
//! swapped in, each in one atomic store. A call that already authenticated finishes under
//! the policy it started with; the next call sees the new one. An invalid file changes
//! nothing, and the reason is logged and returned.
//!
//! A reload changes policy, never the identity of the service: only the policy sections
//! ([`RELOADABLE_SECTIONS`]: callers, purposes, the account rules of `accounts`, `minors`
//! and `privacy_policy`, and `limits` except the listener-level [`FIXED_LIMITS`]) are
//! applied live. Every other section (`data_dir`,
//! `database`, `keys`, `listen`, `tls`, `admin`, and the rest, which are read at start
//! only) must be as the running server has it, or the file is refused naming the first key
//! that differs, so a change is never silently ignored either. A reload never creates a
//! credential or locks every caller out: the administrator's token must already exist (it
//! is re-read, so replacing the file rotates it), and a file that is empty or drops every
//! caller is refused rather than read as "all defaults".

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use figment::Provider;
use figment::providers::{Format, Toml};

use crate::app::build::{AdminToken, StartupError, build_policy};
use crate::config::{Config, ConfigError, FlagOverrides};
use crate::grpc::limits::{FIXED_LIMITS, LiveLimits};
use crate::policy::Policy;
use crate::vault::Vault;
use crate::vault::accounts::AccountRules;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Policy(#[from] StartupError),
    /// A setting only a restart can change.
    #[error(
        "{key}: cannot change while the vault runs (a reload applies callers, purposes, \
         accounts, minors, privacy_policy and the per-call limits); restart to apply it"
    )]
    Fixed { key: String },
    #[error("config file {0} is empty; a reload never falls back to the defaults")]
    Empty(PathBuf),
    #[error(
        "callers: the file configures no caller, which would lock every service out; restart \
         to run without callers"
    )]
    NoCallers,
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The top-level sections a reload applies; every other one must stay as it runs.
pub const RELOADABLE_SECTIONS: [&str; 6] = [
    "callers",
    "purposes",
    "accounts",
    "minors",
    "privacy_policy",
    "limits",
];

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
    /// The configuration the server runs, against which a reloaded file is compared; its
    /// lock serialises reloads so two at once cannot interleave read and swap.
    running: tokio::sync::Mutex<Config>,
    vault: Arc<Vault>,
    /// The per-call `limits` admission applies.
    limits: Arc<LiveLimits>,
    generation: AtomicU64,
}

impl PolicyReloader {
    pub fn new(
        source: ConfigSource,
        running: Config,
        vault: Arc<Vault>,
        limits: Arc<LiveLimits>,
    ) -> PolicyReloader {
        PolicyReloader {
            source,
            running: tokio::sync::Mutex::new(running),
            vault,
            limits,
            generation: AtomicU64::new(0),
        }
    }

    /// The policy and account rules the source describes now, if they may replace the
    /// running ones.
    fn candidate(&self, running: &Config) -> Result<(Config, Policy, AccountRules), ReloadError> {
        if let Some(file) = &self.source.file {
            let read = |source| ReloadError::Read {
                path: file.clone(),
                source,
            };
            let text = std::fs::read_to_string(file).map_err(read)?;
            // Comments and blank lines only: what an emptied or truncated file looks like.
            // Parsed by the provider `Config::load` reads the file with.
            let keys = Toml::string(&text).data();
            if keys.is_ok_and(|profiles| profiles.values().all(|keys| keys.is_empty())) {
                return Err(ReloadError::Empty(file.clone()));
            }
        }
        let config = Config::load(self.source.file.as_deref(), &self.source.flags)?;
        if let Some(key) = fixed_change(running, &config) {
            return Err(ReloadError::Fixed { key });
        }
        if config.callers.is_empty() && !running.callers.is_empty() {
            return Err(ReloadError::NoCallers);
        }
        let policy = build_policy(&config, AdminToken::MustExist)?;
        let rules = AccountRules::from_config(&config).map_err(StartupError::from)?;
        Ok((config, policy, rules))
    }

    /// Reads, validates and swaps in the policy, or changes nothing and says why. Either
    /// way the attempt is an audit event naming `actor`.
    pub async fn reload(&self, actor: &str) -> Result<Reloaded, ReloadError> {
        let mut running = self.running.lock().await;
        let result = self.candidate(&running);
        match result {
            Ok((config, policy, rules)) => {
                self.limits.replace(&config.limits);
                self.vault.set_max_batch_size(config.limits.max_batch_size);
                *running = config;
                let policy = Arc::new(policy);
                // Each is whole and valid on its own: a call between the two stores sees
                // the new rules with the policy it authenticated with.
                self.vault.replace_rules(rules);
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

/// The first key outside [`RELOADABLE_SECTIONS`] whose value differs between `running` and
/// `new`, as a dotted path (`database.url`); `None` when only reloadable sections differ.
pub fn fixed_change(running: &Config, new: &Config) -> Option<String> {
    let (Ok(running), Ok(new)) = (serde_json::to_value(running), serde_json::to_value(new)) else {
        // Both are the same type; serialising one cannot fail. Refuse rather than guess.
        return Some("<configuration>".into());
    };
    let (Some(running), Some(new)) = (running.as_object(), new.as_object()) else {
        return Some("<configuration>".into());
    };
    let null = serde_json::Value::Null;
    let fixed_section = running
        .iter()
        .filter(|(section, _)| !RELOADABLE_SECTIONS.contains(&section.as_str()))
        .find_map(|(section, value)| {
            first_difference(section, value, new.get(section).unwrap_or(&null))
        });
    // Of `limits`, the listener-level keys are read at start only.
    let limit = |config: &serde_json::Map<String, serde_json::Value>, key: &str| {
        config
            .get("limits")
            .and_then(|limits| limits.get(key))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    fixed_section.or_else(|| {
        FIXED_LIMITS
            .iter()
            .find(|key| limit(running, key) != limit(new, key))
            .map(|key| format!("limits.{key}"))
    })
}

fn first_difference(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|key| {
                let null = serde_json::Value::Null;
                first_difference(
                    &format!("{path}.{key}"),
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                )
            })
        }
        _ => (a != b).then(|| path.to_owned()),
    }
}

/// Reloads on every SIGHUP until `stop` is cancelled.
#[cfg(unix)]
pub async fn reload_on_sighup(
    reloader: Arc<PolicyReloader>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; reload with the Admin RPC");
            return;
        }
    };
    loop {
        // A reload once begun finishes; shutdown stops the wait for the next signal.
        let received = tokio::select! {
            () = stop.cancelled() => None,
            received = hangup.recv() => received,
        };
        if received.is_none() {
            break;
        }
        tracing::info!("SIGHUP: reloading the policy");
        // The outcome is logged by reload itself.
        let _ = reloader.reload("signal:SIGHUP").await;
    }
}
