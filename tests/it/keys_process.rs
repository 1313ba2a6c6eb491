//! The key lifecycle through the real `pdvault` binary: the server killed with SIGKILL in
//! the middle of a rewrap and restarted (the killed job shows INTERRUPTED), and the `pdvault keys` commands a scheduler runs,
//! and `pdvault purge`, with their exit codes. Runs on both backends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use pdvault::proto::key_management_client::KeyManagementClient;
use pdvault::proto::vault_client::VaultClient;
use pdvault::proto::{CreateRecordRequest, GetRecordRequest, Identity, RewrapRecordsRequest};
use sqlx::{AssertSqlSafe, Connection};

use crate::support::cli::{Ran, cli};
use crate::support::{authed, connect};

const BINARY: &str = env!("CARGO_BIN_EXE_pdvault");
const RECORDS: usize = 1_500;

struct Server {
    child: Child,
    addr: SocketAddr,
}

/// A failing assertion must not leave a server running.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where one vault's files and database live, across restarts.
struct Deployment {
    dir: tempfile::TempDir,
    database_url: String,
    postgres: Option<(String, String)>,
}

impl Deployment {
    async fn new(postgres: bool) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let mut pg = None;
        let database_url = if postgres {
            let admin = std::env::var("PDVAULT_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("PostgreSQL is required for this test");
            let mut suffix = [0u8; 8];
            getrandom::fill(&mut suffix).unwrap();
            let name = format!(
                "pdvault_test_{}",
                suffix
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .unwrap();
            let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
            pg = Some((admin, name));
            url
        } else {
            format!("sqlite://{}", dir.path().join("data/pdvault.db").display())
        };
        Deployment {
            dir,
            database_url,
            postgres: pg,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn token_file(&self) -> PathBuf {
        self.data_dir().join("admin.token")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Starts `pdvault serve` and waits until it answers.
    async fn start(&self) -> Server {
        let addr = free_port();
        let mut child = Command::new(BINARY)
            .arg("serve")
            .env("PDVAULT_LISTEN", addr.to_string())
            .env("PDVAULT_DATA_DIR", self.data_dir())
            .env("PDVAULT_DATABASE__URL", &self.database_url)
            .env("PDVAULT_LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("pdvault starts");
        // Startup takes a moment (migrations, keyring); poll until it accepts, a bounded
        // number of times.
        for _ in 0..600 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Server { child, addr };
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("pdvault did not start listening on {addr}");
    }

    async fn keys(&self, server: &Server, args: &[&str]) -> Ran {
        cli("keys --addr")
            .arg(format!("http://{}", server.addr))
            .arg("--token-file")
            .arg(self.token_file())
            .args(args)
            .run()
            .await
    }

    async fn drop_database(&self) {
        if let Some((admin, name)) = &self.postgres {
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }

    async fn execute(&self, sql: &str) {
        if self.postgres.is_some() {
            let mut conn = sqlx::PgConnection::connect(&self.database_url)
                .await
                .unwrap();
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .unwrap();
        } else {
            crate::support::sqlite::execute(&self.database_url, sql).await;
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        if self.postgres.is_some() {
            let mut conn = sqlx::PgConnection::connect(&self.database_url)
                .await
                .unwrap();
            sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&mut conn)
                .await
                .unwrap()
        } else {
            crate::support::sqlite::scalar(&self.database_url, sql).await
        }
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn text(output: &Ran) -> String {
    output.text()
}

async fn killed_rewrap_resumes_and_cli_drives_the_lifecycle(postgres: bool) {
    let deployment = Deployment::new(postgres).await;
    let mut server = deployment.start().await;
    let token = deployment.token();

    // Records, created a few at a time in parallel.
    let vault = VaultClient::new(connect(server.addr).await);
    let mut ids = Vec::with_capacity(RECORDS);
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(50) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let mut client = vault.clone();
            let token = token.clone();
            tasks.spawn(async move {
                let record = client
                    .create_record(authed(
                        &token,
                        CreateRecordRequest {
                            identity: Some(Identity {
                                email: format!("p{i}@example.com"),
                                ..Identity::default()
                            }),
                            request_id: String::new(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                (i, record.record_id)
            });
        }
        while let Some(done) = tasks.join_next().await {
            ids.push(done.unwrap());
        }
    }

    let rotated = deployment
        .keys(&server, &["rotate", "--expect-active", "1"])
        .await;
    assert!(rotated.ok, "{}", text(&rotated));
    assert!(text(&rotated).contains("KEK version 2 is active"));
    let again = deployment
        .keys(&server, &["rotate", "--expect-active", "1"])
        .await;
    assert!(again.ok);
    assert!(text(&again).contains("not rotated"), "{}", text(&again));

    // Start a rewrap in small batches, and kill the server as soon as it has reported
    // progress.
    let mut keys = KeyManagementClient::new(connect(server.addr).await);
    let mut stream = keys
        .rewrap_records(authed(&token, RewrapRecordsRequest { batch_size: 10 }))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.total, RECORDS as i64);
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(stream);
    drop(server);

    let server = deployment.start().await;
    // Issue 11 E24: the killed job no longer shows RUNNING forever; the restarted instance
    // saw its process gone and marked it INTERRUPTED.
    let status = deployment.keys(&server, &["status"]).await;
    assert!(status.ok, "{}", text(&status));
    assert!(
        text(&status)
            .lines()
            .any(|line| line.contains(&first.job_id) && line.contains("INTERRUPTED")),
        "{}",
        text(&status)
    );
    // Retiring now would strand what the killed job did not reach.
    let refused = deployment.keys(&server, &["retire", "1"]).await;
    assert!(!refused.ok, "{}", text(&refused));
    assert!(text(&refused).contains("still wraps"), "{}", text(&refused));

    let rewrap = deployment
        .keys(&server, &["rewrap", "--batch-size", "100"])
        .await;
    assert!(rewrap.ok, "{}", text(&rewrap));
    assert!(text(&rewrap).contains("rewrap done"), "{}", text(&rewrap));

    // The killed job's batches and the second job's add up to every record exactly once:
    // each batch committed its counter with its rows, and nothing committed was redone.
    assert_eq!(
        deployment
            .count("SELECT CAST(COALESCE(SUM(rewrapped), 0) AS BIGINT) FROM rewrap_jobs")
            .await,
        RECORDS as i64
    );

    let status = deployment.keys(&server, &["status"]).await;
    assert!(status.ok);
    let listing = text(&status);
    let v1 = listing
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap();
    assert!(
        v1.contains("DECRYPT_ONLY") && v1.split_whitespace().nth(2) == Some("0"),
        "{listing}"
    );

    for step in [["retire", "1"], ["destroy", "1"]] {
        let output = deployment.keys(&server, &step).await;
        assert!(output.ok, "{}", text(&output));
    }

    let mut vault = VaultClient::new(connect(server.addr).await);
    for (i, id) in &ids {
        let record = vault
            .get_record(authed(
                &token,
                GetRecordRequest {
                    record_id: id.clone(),
                    purpose: "service-delivery".into(),
                    justification: String::new(),
                    fields: vec!["email".into()],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.fields["email"].value, format!("p{i}@example.com"));
    }

    // `pdvault purge` shreds what is past its deadline and says what it did.
    let overdue = &ids[0].1;
    deployment
        .execute(&format!(
            "UPDATE records SET retain_until = 1 WHERE record_id = '{overdue}'"
        ))
        .await;
    let purge = cli("purge --addr")
        .arg(format!("http://{}", server.addr))
        .arg("--token-file")
        .arg(deployment.token_file())
        .run()
        .await;
    assert!(purge.ok, "{}", text(&purge));
    assert!(
        text(&purge).contains("purged 1 records"),
        "{}",
        text(&purge)
    );
    assert!(text(&purge).contains(overdue.as_str()));
    assert_eq!(
        deployment
            .count(&format!(
                "SELECT COUNT(*) FROM records WHERE record_id = '{overdue}' AND deleted_at IS NOT NULL"
            ))
            .await,
        1
    );

    // Failures exit non-zero: a wrong token, and an unreachable server.
    let bad = cli("keys --addr")
        .args([&format!("http://{}", server.addr), "status"])
        .env("PDVAULT_TOKEN", "not-a-token")
        .run()
        .await;
    assert!(!bad.ok);
    assert!(text(&bad).contains("Unauthenticated"), "{}", text(&bad));
    let unreachable = cli("keys --addr")
        .args([&format!("http://{}", free_port()), "status"])
        .env("PDVAULT_TOKEN", "x")
        .run()
        .await;
    assert!(!unreachable.ok);

    drop(server);
    deployment.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_rewrap_resumes_and_cli_drives_the_lifecycle() {
    killed_rewrap_resumes_and_cli_drives_the_lifecycle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_rewrap_resumes_and_cli_drives_the_lifecycle() {
    if std::env::var("PDVAULT_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        eprintln!("PostgreSQL test skipped: PDVAULT_TEST_SKIP_POSTGRES=1");
        return;
    }
    killed_rewrap_resumes_and_cli_drives_the_lifecycle(true).await;
}
