//! Test harness: spawns the real application on an ephemeral port, per test, on either
//! backend, and hands out gRPC clients authenticated as configured callers.
//!
//! `PDVAULT_TEST_SUITE` (e.g. `sm4gcm-hmacsm3`) sets the cipher suite of every test app, so
//! the same tests cover both suites; `PDVAULT_TEST_KEK_PROVIDER=pkcs11` keeps every test
//! app's KEKs in a SoftHSM2 token instead of the keyring file.
//!
//! PostgreSQL tests are mandatory by default. Each test gets a fresh database on the server
//! named by `PDVAULT_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! when that server cannot be reached the test binary fails before any test runs
//! (`environment`, which checks SoftHSM2 and Python's grpcio too). Skipping PostgreSQL needs
//! an explicit `PDVAULT_TEST_SKIP_POSTGRES=1`, which CI never sets.

#![allow(dead_code)]

pub mod cli;
pub mod environment;
pub mod fixtures;
pub mod own_process;
pub mod process;
pub mod proxy;
pub mod softhsm;
pub mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use pdvault::app::Application;
use pdvault::app::reload::ConfigSource;
use pdvault::config::Config;
use pdvault::policy::{CallerConfig, token_sha256_hex};
use pdvault::proto::account_security_client::AccountSecurityClient;
use pdvault::proto::audit_client::AuditClient;
use pdvault::proto::key_management_client::KeyManagementClient;
use pdvault::proto::vault_client::VaultClient;
use pdvault::vault::Clock;
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::oneshot;
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A caller configured in every test app, with its token.
pub struct TestCaller {
    pub name: &'static str,
    pub token: &'static str,
    pub rpcs: &'static [&'static str],
    pub purposes: &'static [&'static str],
    pub grants: &'static [&'static str],
}

const ALL_RPCS: &[&str] = &[
    "CreateRecord",
    "GetRecord",
    "UpdateRecord",
    "DeleteRecord",
    "FindRecords",
    "CheckAccount",
    "RecordGuardianConsent",
    "RevokeGuardianConsent",
    "BatchGetRecords",
    "BatchCreateRecords",
];

/// A claims service: full record lifecycle, but only service delivery and support reads.
pub const CLAIMS: TestCaller = TestCaller {
    name: "claims",
    token: "claims-token-0123456789",
    rpcs: ALL_RPCS,
    purposes: &["service-delivery", "customer-support"],
    grants: &[],
};

/// An analytics job: reads for research and analytics only.
pub const ANALYTICS: TestCaller = TestCaller {
    name: "analytics",
    token: "analytics-token-0123456789",
    rpcs: &["GetRecord", "FindRecords", "ExportRecords"],
    purposes: &["audit-research", "business-analytics"],
    grants: &[],
};

/// Compliance staff: lawful disclosure.
pub const COMPLIANCE: TestCaller = TestCaller {
    name: "compliance",
    token: "compliance-token-0123456789",
    rpcs: &["GetRecord", "FindRecords"],
    purposes: &["legal-compliance", "fraud-prevention"],
    grants: &["audit.read"],
};

/// The login path: CheckAccount only.
pub const LOGIN: TestCaller = TestCaller {
    name: "login",
    token: "login-token-0123456789",
    rpcs: &["CheckAccount"],
    purposes: &[],
    grants: &[],
};

/// The account-security team.
pub const SECURITY: TestCaller = TestCaller {
    name: "security",
    token: "security-token-0123456789",
    rpcs: &["CheckAccount", "UpdateRecord"],
    purposes: &[],
    grants: &["accounts.suspend"],
};

pub const CALLERS: [&TestCaller; 5] = [&CLAIMS, &ANALYTICS, &COMPLIANCE, &LOGIN, &SECURITY];

/// Starts at a fixed instant (2026-06-01 12:00 in Beijing) and moves one millisecond per
/// reading, so dates never drift with the wall clock yet events keep their order.
pub struct SteppingClock {
    micros: AtomicI64,
}

impl Clock for SteppingClock {
    fn now(&self) -> DateTime<Utc> {
        let micros = self.micros.fetch_add(1_000, Ordering::Relaxed);
        DateTime::from_timestamp_micros(micros).unwrap()
    }
}

impl SteppingClock {
    /// Moves the clock to `instant`; it keeps stepping from there.
    pub fn set(&self, instant: DateTime<Utc>) {
        self.micros
            .store(instant.timestamp_micros(), Ordering::Relaxed);
    }
}

pub fn test_clock() -> Arc<SteppingClock> {
    let start = Utc.with_ymd_and_hms(2026, 6, 1, 4, 0, 0).single().unwrap();
    Arc::new(SteppingClock {
        micros: AtomicI64::new(start.timestamp_micros()),
    })
}

/// The configuration every test app starts from: files under `data_dir`, the test callers.
fn test_config(data_dir: &tempfile::TempDir) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.path().join("data"),
        ..Config::default()
    };
    config.log.filter = "warn".into();
    config.privacy_policy.current_version = "2025-01".into();
    // The witness file, where the attack tests read it (stdout would mix with the
    // harness's output).
    config.audit.checkpoint_sink = data_dir.path().join("witness.jsonl").display().to_string();
    // A connection a test leaves open must not hold its app's shutdown for long.
    config.shutdown.grace_period_ms = 5_000;
    config.callers = CALLERS
        .iter()
        .map(|caller| CallerConfig {
            name: caller.name.into(),
            token_sha256: token_sha256_hex(caller.token),
            rpcs: caller.rpcs.iter().map(|s| s.to_string()).collect(),
            purposes: caller.purposes.iter().map(|s| s.to_string()).collect(),
            grants: caller.grants.iter().map(|s| s.to_string()).collect(),
            ..CallerConfig::default()
        })
        .collect();
    config
}

pub struct TestApp {
    pub backend: Backend,
    pub config: Config,
    pub clock: Arc<SteppingClock>,
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub data_dir: tempfile::TempDir,
    pub database_url: String,
    pub admin_token: String,
    /// The running vault, for what tests ask of it directly (its checkpoint signer).
    pub vault: Arc<pdvault::vault::Vault>,
    postgres: Option<PostgresDatabase>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A fresh PostgreSQL database for one test, dropped by [`PostgresDatabase::drop_database`].
pub struct PostgresDatabase {
    admin_url: String,
    name: String,
}

impl TestApp {
    /// Starts a vault on `backend`, or returns `None` when PostgreSQL was explicitly skipped.
    pub async fn spawn(backend: Backend) -> Option<TestApp> {
        TestApp::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Option<TestApp> {
        TestApp::spawn_full(backend, adjust, |_| None).await
    }

    /// As [`TestApp::spawn_with`]; `reload` may write the final config to a file and return
    /// it as the source `Admin.ReloadPolicy` re-reads.
    pub async fn spawn_full(
        backend: Backend,
        adjust: impl FnOnce(&mut Config),
        reload: impl FnOnce(&Config) -> Option<ConfigSource>,
    ) -> Option<TestApp> {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&data_dir);
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PostgresDatabase::create().await?),
        };
        if let Some(pg) = &postgres {
            config.database.url = Some(pg.url());
        }
        // CI runs the suite once per cipher suite, and once with KEKs in SoftHSM2.
        if let Ok(suite) = std::env::var("PDVAULT_TEST_SUITE") {
            config.keys.suite = suite;
        }
        let hsm = std::env::var("PDVAULT_TEST_KEK_PROVIDER").is_ok_and(|p| p == "pkcs11");
        adjust(&mut config);
        if hsm || config.keys.provider == "pkcs11" {
            config.keys.provider = "pkcs11".into();
            config.keys.pkcs11 = Some(softhsm::config(&config.database_url()));
        }
        let source = reload(&config);
        Some(TestApp::start(backend, config, data_dir, postgres, source).await)
    }

    /// Starts a SQLite vault on a copy of `fixture`, a data directory an earlier release
    /// left (its `data/` with database, keyring and signer state, and its `witness.jsonl`),
    /// configured as that release's tests configured it. The fixture's own cipher suite and
    /// local keyring are kept whatever the suite's environment asks: its records were
    /// sealed that way.
    pub async fn adopt(fixture: &std::path::Path) -> TestApp {
        let data_dir = tempfile::tempdir().unwrap();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", fixture.display()))
            .arg(data_dir.path())
            .status()
            .unwrap();
        assert!(copied.success(), "copies the fixture");
        // A checkout gives files the umask's modes; the vault refuses a data directory or
        // keyring other users could read.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let data = data_dir.path().join("data");
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
            for file in std::fs::read_dir(&data).unwrap() {
                let file = file.unwrap().path();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        let mut config = test_config(&data_dir);
        config.keys.suite = "aes256gcm-hmacsha256".into();
        TestApp::start(Backend::Sqlite, config, data_dir, None, None).await
    }

    /// A second vault process sharing this one's database and keyring, as several instances
    /// share one PostgreSQL in production. Its own data directory, port and audit chain.
    pub async fn spawn_sibling(&self) -> TestApp {
        let data_dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: data_dir.path().join("data"),
            database: pdvault::config::DatabaseConfig {
                url: Some(self.database_url.clone()),
                ..self.config.database.clone()
            },
            keys: pdvault::config::KeysConfig {
                keyring_path: Some(self.config.keyring_path()),
                create_if_missing: false,
                ..self.config.keys.clone()
            },
            ..self.config.clone()
        };
        TestApp::start(self.backend, config, data_dir, None, None).await
    }

    async fn start(
        backend: Backend,
        config: Config,
        data_dir: tempfile::TempDir,
        postgres: Option<PostgresDatabase>,
        source: Option<ConfigSource>,
    ) -> TestApp {
        let database_url = config.database_url();
        pdvault::telemetry::init(&config.log);
        let clock = test_clock();
        let mut app = Application::build_with_clock(config.clone(), clock.clone())
            .await
            .expect("application builds");
        if let Some(source) = source {
            app = app.with_reload(source);
        }
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let vault = Arc::clone(app.vault());
        let admin_token = std::fs::read_to_string(app.admin_token_path().unwrap())
            .unwrap()
            .trim()
            .to_owned();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        TestApp {
            backend,
            config,
            clock,
            addr,
            metrics_addr,
            data_dir,
            database_url,
            admin_token,
            vault,
            postgres,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// A connection to the test server, for any of its services' clients.
    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    pub async fn client(&self) -> VaultClient<Channel> {
        VaultClient::new(self.channel().await)
    }

    pub async fn keys_client(&self) -> KeyManagementClient<Channel> {
        KeyManagementClient::new(self.channel().await)
    }

    pub async fn audit_client(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel().await)
    }

    pub async fn security_client(&self) -> AccountSecurityClient<Channel> {
        AccountSecurityClient::new(self.channel().await)
    }

    /// A second handle on the vault's database, for what tests do behind the vault's back.
    pub async fn store(&self) -> Arc<dyn pdvault::store::Store> {
        pdvault::app::open_store(&self.config).await.unwrap()
    }

    /// The witness file the vault's checkpoints are appended to.
    pub fn witness_path(&self) -> PathBuf {
        PathBuf::from(&self.config.audit.checkpoint_sink)
    }

    /// Has the running vault sign a checkpoint now, as its maintenance task does.
    pub async fn checkpoint(
        &self,
    ) -> Result<pdvault::audit::Checkpoint, pdvault::audit::CheckpointError> {
        self.vault
            .checkpoint_signer()
            .expect("the application has a checkpoint signer")
            .checkpoint(
                self.vault.store().as_ref(),
                self.vault.keys().audit_signing(),
                chrono::Utc::now().timestamp_micros(),
                false,
            )
            .await
    }

    /// Verifies the trail as an outside party would: the public key and the witness file.
    pub async fn verify_with_witness(&self) -> pdvault::audit::VerifyReport {
        let witness = pdvault::audit::Witness::read(&self.witness_path()).unwrap();
        pdvault::audit::verify_with(
            self.store().await.as_ref(),
            &self.keyring().audit_signing().public_key(),
            Some(&witness),
        )
        .await
        .unwrap()
    }

    /// The vault's keyring, loaded from its file.
    pub fn keyring(&self) -> pdvault::keys::Keyring {
        pdvault::keys::Keyring::load(&self.config.keyring_path()).unwrap()
    }

    /// Path of the SQLite database file (SQLite backend only).
    pub fn sqlite_path(&self) -> PathBuf {
        PathBuf::from(self.database_url.trim_start_matches("sqlite://"))
    }

    /// Runs a statement directly against the vault's database, bypassing the vault.
    pub async fn execute_sql(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => sqlite::execute(&self.database_url, sql).await,
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::raw_sql(AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
    }

    /// The single integer a query returns, read directly from the vault's database.
    pub async fn count(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => sqlite::scalar(&self.database_url, sql).await,
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
            }
        }
    }

    /// The single blob a query returns, read directly from the vault's database.
    pub async fn bytes(&self, sql: &str) -> Vec<u8> {
        match self.backend {
            Backend::Sqlite => sqlite::scalar(&self.database_url, sql).await,
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .fetch_one(&mut conn)
                    .await
                    .unwrap()
            }
        }
    }

    /// A blob as a literal of this backend's SQL.
    pub fn hex_literal(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match self.backend {
            Backend::Sqlite => format!("X'{hex}'"),
            Backend::Postgres => format!("'\\x{hex}'::bytea"),
        }
    }

    /// A record's sealed fields as stored, (name, ciphertext) in name order, read straight
    /// from `sealed_fields` and parsed here by the documented format (ARCHITECTURE.md:
    /// version byte 1, then per field a 1-byte name length, the name, a 4-byte big-endian
    /// ciphertext length, the ciphertext), not by the vault's own code.
    pub async fn sealed_fields(&self, record_id: &str) -> Vec<(String, Vec<u8>)> {
        let stored = self
            .bytes(&format!(
                "SELECT fields FROM sealed_fields WHERE record_id = '{record_id}'"
            ))
            .await;
        assert_eq!(stored.first(), Some(&1), "format version 1");
        let mut rest = &stored[1..];
        let mut fields = Vec::new();
        while let Some((&name_len, after)) = rest.split_first() {
            let (name, after) = after.split_at(usize::from(name_len));
            let (len, after) = after.split_at(4);
            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
            let (ciphertext, after) = after.split_at(len);
            fields.push((
                String::from_utf8(name.to_vec()).unwrap(),
                ciphertext.to_vec(),
            ));
            rest = after;
        }
        fields
    }

    /// Overwrites a record's stored fields, bypassing the vault (as an attacker with
    /// database access would), in the documented format; `fields` in name order.
    pub async fn set_sealed_fields(&self, record_id: &str, fields: &[(String, Vec<u8>)]) {
        let mut stored = vec![1u8];
        for (name, ciphertext) in fields {
            stored.push(u8::try_from(name.len()).unwrap());
            stored.extend_from_slice(name.as_bytes());
            stored.extend_from_slice(&u32::try_from(ciphertext.len()).unwrap().to_be_bytes());
            stored.extend_from_slice(ciphertext);
        }
        self.execute_sql(&format!(
            "UPDATE sealed_fields SET fields = {} WHERE record_id = '{record_id}'",
            self.hex_literal(&stored)
        ))
        .await;
    }

    /// The database's plan for `sql`, as text.
    pub async fn query_plan(&self, sql: &str) -> String {
        use sqlx::Row;
        match self.backend {
            Backend::Sqlite => sqlite::plan(&self.database_url, sql).await,
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .unwrap();
                let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN {sql}")))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                rows.iter()
                    .map(|row| row.get::<String, _>(0))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
    }

    /// Every byte the vault's database holds, as the backend would hand it to a thief:
    /// the SQLite files themselves, or a `pg_dump` of the database.
    pub async fn raw_database_bytes(&self) -> Vec<u8> {
        match self.backend {
            Backend::Sqlite => {
                let path = self.sqlite_path();
                let mut bytes = Vec::new();
                for suffix in ["", "-wal", "-shm"] {
                    let file = PathBuf::from(format!("{}{suffix}", path.display()));
                    if let Ok(mut content) = std::fs::read(&file) {
                        bytes.append(&mut content);
                    }
                }
                assert!(!bytes.is_empty(), "the SQLite file exists");
                bytes
            }
            Backend::Postgres => {
                let output = tokio::process::Command::new("pg_dump")
                    .arg("--no-owner")
                    .arg(&self.database_url)
                    .output()
                    .await
                    .expect("pg_dump runs (install postgresql-client)");
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                output.stdout
            }
        }
    }

    /// Stops the vault, keeping its database and files, for what a test does while it is
    /// down; [`TestApp::restart`] starts it again.
    pub async fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// Stops the vault (unless halted) and starts it again on the same configuration, data
    /// directory and database, as a restart of the same instance.
    pub async fn restart(mut self) -> TestApp {
        self.halt().await;
        let config = self.config.clone();
        let postgres = self.postgres.take();
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap());
        TestApp::start(self.backend, config, data_dir, postgres, None).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        if self.owns_deployment()
            && self.config.keys.provider == "pkcs11"
            && let Some(pkcs11) = &self.config.keys.pkcs11
        {
            softhsm::destroy_deployment_objects(pkcs11);
        }
        if let Some(pg) = self.postgres.take() {
            pg.drop_database().await;
        }
    }

    /// Whether this app's database is its own (made for it), not another app's it was
    /// pointed at: the deployment ends when this app stops.
    fn owns_deployment(&self) -> bool {
        match &self.postgres {
            Some(pg) => pg.url() == self.database_url,
            None => self.backend == Backend::Sqlite && self.config.database.url.is_none(),
        }
    }
}

/// The configured callers, as TOML `[[callers]]` tables for a config file.
pub fn callers_toml() -> String {
    CALLERS
        .iter()
        .map(|caller| {
            format!(
                "[[callers]]\nname = {:?}\ntoken_sha256 = {:?}\nrpcs = {:?}\npurposes = {:?}\n\n",
                caller.name,
                token_sha256_hex(caller.token),
                caller.rpcs,
                caller.purposes
            )
        })
        .collect()
}

impl PostgresDatabase {
    /// `None` when PostgreSQL was explicitly skipped.
    pub async fn create() -> Option<PostgresDatabase> {
        if std::env::var("PDVAULT_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
            eprintln!("PostgreSQL test skipped: PDVAULT_TEST_SKIP_POSTGRES=1");
            return None;
        }
        let admin_url = std::env::var("PDVAULT_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                // The check before any test found it reachable; it went away since.
                panic!(
                    "PostgreSQL is required for this test and no longer reachable: {e}. \
                 scripts/test starts it; PDVAULT_TEST_SKIP_POSTGRES=1 skips explicitly."
                )
            });
        let name = format!("pdvault_test_{}", random_suffix());
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        Some(PostgresDatabase { admin_url, name })
    }

    pub fn url(&self) -> String {
        let base = self
            .admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap_or(&self.admin_url);
        format!("{base}/{}", self.name)
    }

    pub async fn drop_database(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A plaintext gRPC connection to a vault at `addr` (an in-process app or a `pdvault` process).
pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects to the test server")
}

/// Wraps a message with a caller's bearer token.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Generates one `#[tokio::test]` per backend for each scenario function.
#[macro_export]
macro_rules! for_each_backend {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(app) = $crate::support::TestApp::spawn($crate::support::Backend::Sqlite).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(app) = $crate::support::TestApp::spawn($crate::support::Backend::Postgres).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
    };
}

/// As [`for_each_backend!`], with the apps started by `$spawn(backend)` (for a binary whose
/// scenarios all need one configuration).
#[macro_export]
macro_rules! for_each_backend_with {
    ($spawn:ident, $($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(app) = super::$spawn($crate::support::Backend::Sqlite).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(app) = super::$spawn($crate::support::Backend::Postgres).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
    };
}

/// Awaits every future concurrently (on this task) and returns their outputs in order.
pub async fn join_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match std::pin::Pin::new(future).poll(cx) {
                    Poll::Ready(output) => *slot = Some(output),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}
