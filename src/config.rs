//! Configuration, layered defaults < file < environment < flags.
//!
//! Every layer is merged by figment before anything is validated, so an error names the key
//! at fault and the layer it came from (`database.max_connections ... in env var
//! PDVAULT_DATABASE__MAX_CONNECTIONS`). Environment variables are `PDVAULT_` followed by the
//! key path with `__` between levels.
//!
//! Zero means one thing in every setting: the feature is off (no limit, no deadline, no
//! cache, no expiry). A setting that cannot be off (the audit trail's checkpoints, a
//! timeout, a pool size) refuses zero instead of reading it as "as small as possible", and
//! [`Config::validate`] refuses values that would destroy the audit trail.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::policy::{CallerConfig, PurposeConfig, default_purposes};
// The `retention` section is declared beside the rules it configures (policy/retention.rs),
// which sit below this module; re-exported so every section is reachable from here.
pub use crate::policy::retention::RetentionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A setting `Config::validate` refuses: `key: reason`.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The layers do not make a `Config` (a wrong type, an unknown key); the message names
    /// each key, and the environment variable when one set it.
    #[error("invalid configuration: {}", describe_figment_error(.0))]
    Load(#[source] Box<figment::Error>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Where the embedded defaults keep their files (SQLite database, keyring, admin token).
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub keys: KeysConfig,
    pub admin: AdminConfig,
    pub audit: AuditConfig,
    pub accounts: AccountsConfig,
    pub minors: MinorsConfig,
    pub privacy_policy: PrivacyPolicyConfig,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub limits: LimitsConfig,
    pub shutdown: ShutdownConfig,
    /// Purposes by name; merged over the shipped defaults key by key.
    pub purposes: BTreeMap<String, PurposeConfig>,
    pub callers: Vec<CallerConfig>,
    pub retention: RetentionConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite:...` or `postgres://...`. Unset: `<data_dir>/pdvault.db`.
    pub url: Option<String>,
    pub max_connections: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Keyring file. Unset: `<data_dir>/keyring.json`.
    pub keyring_path: Option<PathBuf>,
    /// Create a fresh keyring when the file is missing. Turn off in production, where a
    /// missing keyring means a misconfiguration, not a first start.
    pub create_if_missing: bool,
    /// Cipher suite for new data keys: `aes256gcm-hmacsha256` or `sm4gcm-hmacsm3`. Records
    /// keep the suite they were sealed with until re-keyed. The blind-index and pseudonym
    /// MAC is the suite of the deployment's first start (recorded in the database).
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Where KEKs live: `local` (the keyring file) or `pkcs11` (a hardware module, see
    /// `keys.pkcs11`). All instances sharing a database must use the same provider.
    #[serde(default = "default_provider")]
    pub provider: String,
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Config>,
    /// How long an unwrap trusts the key version states it last read from the database, and
    /// how often they are re-read in the background: the longest a `DestroyKeyVersion` on
    /// another instance can take to reach this one (material and cached data keys dropped,
    /// unwraps refused).
    #[serde(default = "default_state_cache_ms")]
    pub state_cache_ms: u64,
}

fn default_state_cache_ms() -> u64 {
    2_000
}

/// A PKCS#11 module holding the KEKs (`keys.provider = "pkcs11"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The module's shared library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token that holds the KEKs.
    pub token_label: String,
    /// File holding the user PIN (mode 0600); the PIN is never put in configuration.
    pub pin_file: PathBuf,
    /// KEK objects are labelled `<prefix><version>`.
    #[serde(default = "default_key_label_prefix")]
    pub key_label_prefix: String,
    /// Unwrapped data keys kept in memory, at most this many...
    #[serde(default = "default_cache_entries")]
    pub cache_max_entries: usize,
    /// ...for at most this long. 0 turns the cache off.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_seconds: u64,
}

fn default_provider() -> String {
    "local".to_owned()
}

fn default_key_label_prefix() -> String {
    "pdvault-kek-v".to_owned()
}

fn default_cache_entries() -> usize {
    10_000
}

fn default_cache_ttl() -> u64 {
    300
}

fn default_suite() -> String {
    crate::crypto::Suite::default().as_str().to_owned()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Create the initial administrator credential on first start and honour it after.
    pub enabled: bool,
    /// Where the administrator token is written (mode 0600). Unset: `<data_dir>/admin.token`.
    pub token_path: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Seconds between signed checkpoints of every chain's head. A tail cut off after the
    /// last checkpoint is not detectable, so this bounds that window.
    pub checkpoint_interval_secs: u64,
    /// Days audit events are kept; older checkpointed segments are removed (default three
    /// years). 0: kept forever. Under [`MIN_AUDIT_RETENTION_DAYS`] is refused. Deleting a
    /// record never deletes its trail.
    pub retention_days: u64,
    /// Where every checkpoint is also written, one JSON line each: `stdout`, or the path of
    /// a file appended to and synced (put it on storage the database's administrators
    /// cannot rewrite; it is what `pdvault audit verify --checkpoints` reads).
    pub checkpoint_sink: String,
    /// This instance's checkpoint signer state (its id, last checkpoint, last signed head
    /// of every chain it vouches for). Unset: `<data_dir>/audit-signer.json`.
    pub signer_state_path: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    /// Purposes still served while an account is suspended.
    pub suspended_allowed_purposes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinorsConfig {
    /// Below this age (周岁) a person is a minor and needs a guardian's consent on file.
    pub age_of_majority: u32,
    /// PIPL's line for sensitive personal information, reported as `under_14`.
    pub sensitive_age: u32,
    /// IANA time zone in which birthdays turn over.
    pub time_zone: String,
    /// Purposes that do not need a guardian's consent.
    pub consent_exempt_purposes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicyConfig {
    /// The privacy-policy version in force; records that accepted another one are flagged
    /// `policy_reconsent_required`. Empty: no version is tracked.
    pub current_version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `pdvault=debug`.
    pub filter: String,
}

/// Transport security. TLS is on when `cert_path` is set; client certificates are asked
/// for when `client_ca_path` is set too.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the server presents.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key_path: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to (turns on mTLS).
    pub client_ca_path: Option<PathBuf>,
    /// Let clients without a certificate connect (they then need a bearer token).
    pub client_auth_optional: bool,
    /// Allow plaintext gRPC on a non-loopback address. Only behind a trusted proxy.
    pub allow_insecure: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often the database and key provider are probed, in milliseconds.
    pub interval_ms: u64,
    /// How long one probe may take before it counts as a failure, in milliseconds.
    pub probe_timeout_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus HTTP listener (`GET /metrics`). Unset: no listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest a call may run before it fails with DEADLINE_EXCEEDED, in milliseconds.
    pub request_timeout_ms: u64,
    /// Calls served at once across all connections; more are refused with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// Sustained calls per minute per caller; 0 turns the limit off.
    pub caller_requests_per_minute: u32,
    /// Calls a caller may make in a burst above its sustained rate.
    pub caller_burst: u32,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once (advertised to the client as
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Connections one peer address may hold open at once; more are closed on accept.
    /// 0 turns the limit off.
    pub max_connections_per_peer: usize,
    /// Once a call's headers arrive, its request message must arrive within this many
    /// milliseconds, or the call fails with DEADLINE_EXCEEDED before it takes a slot.
    pub request_read_timeout_ms: u64,
    /// A connection whose peer sends nothing (not even an HTTP/2 PING acknowledgement) for
    /// this many milliseconds is closed. The server pings every third of it, so live
    /// clients keep their connections.
    pub idle_timeout_ms: u64,
    /// Calls without a valid credential (refused ones, and reflection, which needs none)
    /// per minute per peer address (per /64 for IPv6); 0 turns the limit off.
    pub unauthenticated_requests_per_minute: u32,
    /// Unauthenticated calls a peer may make in a burst above that rate.
    pub unauthenticated_burst: u32,
    /// Unauthenticated calls (reflection) served at once, apart from the authenticated
    /// calls' `max_concurrent_requests`.
    pub max_unauthenticated_requests: usize,
    /// Calls one authenticated caller may have in flight at once, from reading its request
    /// message to the end of its response; more are refused with RESOURCE_EXHAUSTED. Keeps
    /// one caller from holding every slot or many buffered messages. 0 turns the cap off.
    pub max_in_flight_per_caller: usize,
    /// Records one `BatchGetRecords` or `BatchCreateRecords` call may name. Cannot be off:
    /// a batch's audit events and its work are held together until it answers.
    pub max_batch_size: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight calls may run after SIGTERM or SIGINT, in milliseconds.
    pub grace_period_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            interval_ms: 5_000,
            probe_timeout_ms: 2_000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            request_timeout_ms: 10_000,
            max_concurrent_requests: 256,
            caller_requests_per_minute: 0,
            caller_burst: 50,
            max_message_bytes: 64 * 1024,
            max_streams_per_connection: 100,
            max_connections_per_peer: 128,
            request_read_timeout_ms: 2_000,
            idle_timeout_ms: 120_000,
            unauthenticated_requests_per_minute: 120,
            unauthenticated_burst: 60,
            max_unauthenticated_requests: 16,
            max_in_flight_per_caller: 64,
            max_batch_size: 100,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> ShutdownConfig {
        ShutdownConfig {
            grace_period_ms: 20_000,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("pdvault-data"),
            database: DatabaseConfig {
                url: None,
                max_connections: 8,
            },
            keys: KeysConfig {
                keyring_path: None,
                create_if_missing: true,
                suite: default_suite(),
                provider: default_provider(),
                pkcs11: None,
                state_cache_ms: default_state_cache_ms(),
            },
            admin: AdminConfig {
                enabled: true,
                token_path: None,
            },
            audit: AuditConfig {
                checkpoint_interval_secs: 60,
                retention_days: 3 * 365,
                checkpoint_sink: "stdout".into(),
                signer_state_path: None,
            },
            accounts: AccountsConfig {
                suspended_allowed_purposes: vec![
                    "fraud-prevention".into(),
                    "legal-compliance".into(),
                ],
            },
            minors: MinorsConfig {
                age_of_majority: 18,
                sensitive_age: 14,
                time_zone: "Asia/Shanghai".into(),
                consent_exempt_purposes: vec!["legal-compliance".into()],
            },
            privacy_policy: PrivacyPolicyConfig {
                current_version: String::new(),
            },
            log: LogConfig {
                format: LogFormat::Human,
                filter: "info".into(),
            },
            tls: TlsConfig::default(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::default(),
            limits: LimitsConfig::default(),
            shutdown: ShutdownConfig::default(),
            purposes: default_purposes(),
            callers: Vec::new(),
            retention: RetentionConfig::default(),
        }
    }
}

/// The settings command-line flags can override; `None` leaves lower layers alone.
#[derive(Clone, Debug, Default)]
pub struct FlagOverrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
}

impl Config {
    /// Merges defaults, the optional file, `PDVAULT_*` variables and flags, in that order.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(
            Env::prefixed("PDVAULT_")
                // The test suite's own switches (PDVAULT_TEST_*), not configuration keys.
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
                .split("__")
                // Variables of the command line itself (`--config`, and the client
                // connection of `cli/client.rs`) and of the test suite (PDVAULT_TEST_*),
                // not configuration keys.
                .ignore(&[
                    "config",
                    "addr",
                    "token",
                    "token_file",
                    "ca_cert",
                    "client_cert",
                    "client_key",
                    "tls_server_name",
                ])
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_")),
        );
        let mut flag_layer = Figment::new();
        if let Some(listen) = flags.listen {
            flag_layer = flag_layer.merge(Serialized::default("listen", listen));
        }
        if let Some(dir) = &flags.data_dir {
            flag_layer = flag_layer.merge(Serialized::default("data_dir", dir));
        }
        if let Some(url) = &flags.database_url {
            flag_layer = flag_layer.merge(Serialized::default("database.url", url));
        }
        figment = figment.merge(flag_layer);
        let config = figment
            .extract::<Config>()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("pdvault.db").display()),
        }
    }

    pub fn keyring_path(&self) -> PathBuf {
        self.keys
            .keyring_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keyring.json"))
    }

    pub fn audit_signer_state_path(&self) -> PathBuf {
        self.audit
            .signer_state_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-signer.json"))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.admin
            .token_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.token"))
    }
}

/// The shortest audit retention accepted (other than 0, "forever"): six months, the least
/// the PRC Cybersecurity Law (art. 21) asks network logs to be kept. Anything shorter would
/// remove the trail of what was released before anyone could ask about it.
pub const MIN_AUDIT_RETENTION_DAYS: u64 = 180;

impl Config {
    /// Refuses settings whose value cannot be right: zero where the setting cannot be off,
    /// and an audit retention that would destroy the trail. Every command checks it after
    /// loading, and `Application::build` (`app/mod.rs`) before anything is opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse =
            |key: &str, reason: &str| Err(ConfigError::Invalid(format!("{key}: {reason}")));
        let retention = self.audit.retention_days;
        if retention != 0 && retention < MIN_AUDIT_RETENTION_DAYS {
            return refuse(
                "audit.retention_days",
                &format!(
                    "{retention} days would remove the audit trail too soon; use at least \
                     {MIN_AUDIT_RETENTION_DAYS}, or 0 to keep it forever"
                ),
            );
        }
        let cannot_be_off = [
            (
                "audit.checkpoint_interval_secs",
                self.audit.checkpoint_interval_secs == 0,
                "checkpoints cannot be turned off",
            ),
            (
                "database.max_connections",
                self.database.max_connections == 0,
                "the vault needs at least one connection",
            ),
            (
                "health.interval_ms",
                self.health.interval_ms == 0,
                "health probes cannot be turned off",
            ),
            (
                "health.probe_timeout_ms",
                self.health.probe_timeout_ms == 0,
                "a probe needs time to answer",
            ),
            (
                "limits.request_timeout_ms",
                self.limits.request_timeout_ms == 0,
                "calls cannot run without a timeout",
            ),
            (
                "limits.max_concurrent_requests",
                self.limits.max_concurrent_requests == 0,
                "the concurrency cap cannot be turned off",
            ),
            (
                "limits.max_message_bytes",
                self.limits.max_message_bytes == 0,
                "the message size limit cannot be turned off",
            ),
            (
                "limits.max_streams_per_connection",
                self.limits.max_streams_per_connection == 0,
                "the per-connection stream limit cannot be turned off",
            ),
            (
                "limits.request_read_timeout_ms",
                self.limits.request_read_timeout_ms == 0,
                "a request cannot be read without a deadline",
            ),
            (
                "limits.idle_timeout_ms",
                self.limits.idle_timeout_ms == 0,
                "idle connections cannot be kept forever",
            ),
            (
                "limits.max_batch_size",
                self.limits.max_batch_size == 0,
                "a batch call needs room for one record",
            ),
            (
                "limits.max_unauthenticated_requests",
                self.limits.max_unauthenticated_requests == 0,
                "the unauthenticated budget cannot be turned off",
            ),
            (
                "limits.caller_burst",
                self.limits.caller_burst == 0 && self.limits.caller_requests_per_minute != 0,
                "a rate-limited caller needs a burst of at least one call",
            ),
            (
                "limits.unauthenticated_burst",
                self.limits.unauthenticated_burst == 0
                    && self.limits.unauthenticated_requests_per_minute != 0,
                "a rate-limited address needs a burst of at least one call",
            ),
        ];
        for (key, zero, why) in cannot_be_off {
            if zero {
                return refuse(key, &format!("must not be 0 ({why}; 0 means \"off\")"));
            }
        }
        Ok(())
    }
}

/// One line per problem, each naming its key and source.
fn describe_figment_error(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            if from_env && !e.path.is_empty() {
                // Figment names the key; operators set a variable, so name that too.
                let variable = format!("PDVAULT_{}", e.path.join("__").to_uppercase());
                format!("{e} (variable {variable})")
            } else {
                e.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, whose size is figment's choice.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "pdvault.toml",
                "listen = \"127.0.0.1:7000\"\n[database]\nmax_connections = 3\n",
            )?;
            jail.set_env("PDVAULT_DATABASE__MAX_CONNECTIONS", "5");
            jail.set_env("PDVAULT_LISTEN", "127.0.0.1:7001");
            jail.set_env("PDVAULT_TEST_POSTGRES_URL", "postgres://ignored");
            let flags = FlagOverrides {
                listen: Some("127.0.0.1:7002".parse().unwrap()),
                ..FlagOverrides::default()
            };
            let config = Config::load(Some(Path::new("pdvault.toml")), &flags).unwrap();
            assert_eq!(config.database.max_connections, 5);
            assert_eq!(config.listen.port(), 7002);
            assert_eq!(config.log.filter, "info");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_bad_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PDVAULT_DATABASE__MAX_CONNECTIONS", "many");
            let err = Config::load(None, &FlagOverrides::default()).unwrap_err();
            let message = err.to_string().to_lowercase();
            assert!(message.contains("database.max_connections"), "{message}");
            assert!(
                message.contains("pdvault_database__max_connections"),
                "{message}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("pdvault.toml", "[database]\nurll = \"sqlite::memory:\"\n")?;
            let err = Config::load(Some(Path::new("pdvault.toml")), &FlagOverrides::default())
                .unwrap_err();
            assert!(err.to_string().contains("urll"), "{err}");
            Ok(())
        });
    }

    /// Issue 11 E23: `audit.retention_days = 0` used to set the cut-off to "now" and expire
    /// every checkpointed event; zero now means "forever", as elsewhere, and short
    /// retentions and zeros where a setting cannot be off are refused, naming the key.
    #[test]
    fn settings_that_would_destroy_the_trail_are_refused() {
        figment::Jail::expect_with(|jail| {
            let load = |body: &str| {
                std::fs::write("pdvault.toml", body).unwrap();
                Config::load(Some(Path::new("pdvault.toml")), &FlagOverrides::default())
            };
            jail.create_file("pdvault.toml", "")?;
            assert_eq!(
                load("[audit]\nretention_days = 0\n")
                    .unwrap()
                    .audit
                    .retention_days,
                0
            );
            assert_eq!(
                load("[audit]\nretention_days = 180\n")
                    .unwrap()
                    .audit
                    .retention_days,
                180
            );
            for (body, key) in [
                ("[audit]\nretention_days = 1\n", "audit.retention_days"),
                ("[audit]\nretention_days = 179\n", "audit.retention_days"),
                (
                    "[audit]\ncheckpoint_interval_secs = 0\n",
                    "audit.checkpoint_interval_secs",
                ),
                (
                    "[limits]\nrequest_timeout_ms = 0\n",
                    "limits.request_timeout_ms",
                ),
                (
                    "[limits]\nmax_concurrent_requests = 0\n",
                    "limits.max_concurrent_requests",
                ),
                (
                    "[database]\nmax_connections = 0\n",
                    "database.max_connections",
                ),
                ("[health]\ninterval_ms = 0\n", "health.interval_ms"),
                (
                    "[limits]\nmax_streams_per_connection = 0\n",
                    "limits.max_streams_per_connection",
                ),
                (
                    "[limits]\nrequest_read_timeout_ms = 0\n",
                    "limits.request_read_timeout_ms",
                ),
                ("[limits]\nidle_timeout_ms = 0\n", "limits.idle_timeout_ms"),
                (
                    "[limits]\nmax_unauthenticated_requests = 0\n",
                    "limits.max_unauthenticated_requests",
                ),
                (
                    "[limits]\nunauthenticated_burst = 0\n",
                    "limits.unauthenticated_burst",
                ),
            ] {
                let err = load(body).unwrap_err().to_string();
                assert!(err.contains(key), "{body}: {err}");
            }
            // Zero still means "off" where off is a choice.
            let config = load(
                "[retention]\ndefault_days = 0\nrequest_id_ttl_hours = 0\n\
                 [limits]\ncaller_requests_per_minute = 0\nmax_connections_per_peer = 0\n\
                 unauthenticated_requests_per_minute = 0\nunauthenticated_burst = 0\n",
            )
            .unwrap();
            assert!(config.retention.request_id_ttl().is_none());
            jail.set_env("PDVAULT_AUDIT__RETENTION_DAYS", "30");
            let err = load("").unwrap_err().to_string();
            assert!(err.contains("audit.retention_days"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn file_purposes_merge_over_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "pdvault.toml",
                "[purposes.customer-support.fields]\nname = \"none\"\n",
            )?;
            let config =
                Config::load(Some(Path::new("pdvault.toml")), &FlagOverrides::default()).unwrap();
            let support = &config.purposes["customer-support"];
            assert_eq!(support.fields["name"], crate::policy::ReleaseLevel::None);
            assert!(config.purposes.contains_key("service-delivery"));
            Ok(())
        });
    }
}
