//! What the test suite needs from the machine, checked when a test binary starts, before
//! the test harness runs anything: a PostgreSQL server where the test role may create
//! databases (and its client tools `pg_dump` and `psql`), SoftHSM2 (module and
//! `softhsm2-util`), and a Python that can import `grpc` and `grpc_tools`.
//!
//! A missing component fails the binary at once with one sentence naming it and the command
//! that provisions it (`scripts/test`), instead of a panic from deep inside a helper in the
//! middle of the run. `cargo test` runs the library's unit-test binary first, and it includes
//! this file too (`src/test_environment.rs`), so that sentence is the first thing a bare
//! `cargo test` prints on a machine that lacks something. The explicit skips
//! (`PDVAULT_TEST_SKIP_POSTGRES=1`, `PDVAULT_TEST_SKIP_PYTHON=1`) skip their check as they
//! skip their tests.
//!
//! This file must not name `pdvault::` or `crate::` items: it is compiled into the library's
//! unit tests and into the integration-test binary (`tests/it`) alike.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

/// The one command that provisions everything below and runs the whole suite.
pub const PROVISION_COMMAND: &str = "scripts/test";

/// Where Debian's `softhsm2` package installs the PKCS#11 module the tests load.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The server the PostgreSQL tests use when `PDVAULT_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long a PostgreSQL server may take to accept the check's connection.
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest piece of a tool's own error output quoted in the sentence.
const MAX_QUOTED_OUTPUT: usize = 200;

/// One component the suite needs and this machine lacks.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("PDVAULT_TEST_POSTGRES_URL is not a PostgreSQL URL")]
    PostgresUrl(#[source] sqlx::Error),
    #[error("cannot connect to {target}")]
    PostgresUnreachable {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{target} did not answer within {} s", POSTGRES_CONNECT_TIMEOUT.as_secs())]
    PostgresTimeout { target: String },
    #[error("the role at {target} may not create databases")]
    PostgresCannotCreateDatabases { target: String },
    #[error("{tool} does not run")]
    PostgresClient {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no PKCS#11 module at {module}")]
    SoftHsmModule { module: String },
    #[error("softhsm2-util does not run")]
    SoftHsmUtil(#[source] std::io::Error),
    #[error("{python} does not run")]
    PythonAbsent {
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{python} cannot import grpc and grpc_tools ({output})")]
    PythonModules { python: String, output: String },
}

impl Missing {
    /// The component, as the sentence names it.
    pub fn component(&self) -> &'static str {
        match self {
            Missing::PostgresUrl(_)
            | Missing::PostgresUnreachable { .. }
            | Missing::PostgresTimeout { .. }
            | Missing::PostgresCannotCreateDatabases { .. }
            | Missing::PostgresClient { .. } => "PostgreSQL",
            Missing::SoftHsmModule { .. } | Missing::SoftHsmUtil(_) => "SoftHSM2",
            Missing::PythonAbsent { .. } | Missing::PythonModules { .. } => "Python's grpcio",
        }
    }

    /// This problem and its causes on one line, after the component's name when
    /// `named` (several components are missing).
    fn detail(&self, named: bool) -> String {
        let mut detail = if named {
            format!("{}: {self}", self.component())
        } else {
            self.to_string()
        };
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            // sqlx repeats its cause in its own message.
            let text = error.to_string();
            if !detail.contains(&text) {
                detail.push_str(&format!(": {text}"));
            }
            cause = error.source();
        }
        one_line(&detail)
    }
}

/// Everything missing, at most one problem per component. Displays as one sentence.
#[derive(Debug)]
pub struct Report {
    pub missing: Vec<Missing>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.missing.iter().map(Missing::component).collect();
        let (list, verb, pronoun) = match names.as_slice() {
            [one] => (one.to_string(), "is", "it"),
            [rest @ .., last] => (format!("{} and {last}", rest.join(", ")), "are", "them"),
            [] => return write!(f, "nothing is missing for pdvault's tests."),
        };
        let named = self.missing.len() > 1;
        let details: Vec<String> = self.missing.iter().map(|m| m.detail(named)).collect();
        write!(
            f,
            "{list} {verb} missing for pdvault's tests ({}): run {PROVISION_COMMAND}, which \
             provisions {pronoun} and runs the whole suite, or provision {pronoun} by hand as \
             the \"Test it\" section of README.md says.",
            details.join("; ")
        )
    }
}

/// Checks every component the environment asks for (the skips leave theirs out).
pub fn check() -> Result<(), Report> {
    let mut missing = Vec::new();
    if !skipped("PDVAULT_TEST_SKIP_POSTGRES") {
        let url = std::env::var("PDVAULT_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
        missing.extend(check_postgres(&url).err());
    }
    missing.extend(check_softhsm("softhsm2-util", Path::new(SOFTHSM2_MODULE)).err());
    if !skipped("PDVAULT_TEST_SKIP_PYTHON") {
        let python = std::env::var("PDVAULT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        missing.extend(check_python(&python).err());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Report { missing })
    }
}

fn skipped(variable: &str) -> bool {
    std::env::var(variable).is_ok_and(|v| v == "1")
}

/// The server at `url` accepts a connection whose role may create databases, and the
/// client tools the tests call (`pg_dump`, `psql`) run. Blocks; not for async contexts.
pub fn check_postgres(url: &str) -> Result<(), Missing> {
    let options = PgConnectOptions::from_str(url).map_err(Missing::PostgresUrl)?;
    // Never the URL itself: it may carry a password.
    let target = format!(
        "{}@{}:{}",
        options.get_username(),
        options.get_host(),
        options.get_port()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime builds");
    runtime.block_on(async {
        let connect = PgConnection::connect_with(&options);
        let mut conn = match tokio::time::timeout(POSTGRES_CONNECT_TIMEOUT, connect).await {
            Err(_) => return Err(Missing::PostgresTimeout { target }),
            Ok(Err(source)) => return Err(Missing::PostgresUnreachable { target, source }),
            Ok(Ok(conn)) => conn,
        };
        let may_create: bool = sqlx::query_scalar(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|source| Missing::PostgresUnreachable {
            target: target.clone(),
            source,
        })?;
        let _ = conn.close().await;
        if may_create {
            Ok(())
        } else {
            Err(Missing::PostgresCannotCreateDatabases { target })
        }
    })?;
    for tool in ["pg_dump", "psql"] {
        runs(tool).map_err(|source| Missing::PostgresClient { tool, source })?;
    }
    Ok(())
}

/// The PKCS#11 module is installed and `util` (the token initialiser) runs.
pub fn check_softhsm(util: &str, module: &Path) -> Result<(), Missing> {
    if !module.is_file() {
        return Err(Missing::SoftHsmModule {
            module: module.display().to_string(),
        });
    }
    runs(util).map_err(Missing::SoftHsmUtil)
}

/// `python` runs and imports the modules `examples/python/interop.py` needs.
pub fn check_python(python: &str) -> Result<(), Missing> {
    let output = Command::new(python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .map_err(|source| Missing::PythonAbsent {
            python: python.into(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last_line = stderr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no error output");
    Err(Missing::PythonModules {
        python: python.into(),
        output: last_line.trim().chars().take(MAX_QUOTED_OUTPUT).collect(),
    })
}

/// `program --version` starts and exits successfully.
fn runs(program: &str) -> Result<(), std::io::Error> {
    let output = Command::new(program).arg("--version").output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "`{program} --version` exited with {}",
            output.status
        )))
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs before `main`, so before the harness prints or runs a test. Only `std`, `tokio` and
/// `sqlx` are used here, all of which work before `main` on the platforms the suite runs on
/// (Linux); a failure prints the sentence and exits without a panic or backtrace.
#[ctor::ctor(unsafe)]
fn check_before_any_test() {
    if let Err(report) = check() {
        eprintln!("{report}");
        std::process::exit(101);
    }
}
