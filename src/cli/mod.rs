//! The command line: `serve`, `migrate`, `token`, `audit`, `accounts`, `keys`, `purge`,
//! `export` and `bench`. Parsing is clap's; every server-side command loads configuration the
//! same way (defaults < file < environment < flags). `accounts`, `keys`, `purge`, `export`
//! and `bench --addr` are gRPC clients of a running vault and share one set of connection flags
//! ([`client::ClientArgs`]), global so they are accepted anywhere on the line; scheduled jobs
//! need only an address, a token with the grant and, for a TLS vault, its CA bundle.
//!
//! - `error.rs`: `CliError`, what every command fails with, printed with its causes by [`run`].
//! - `client.rs`: the connection flags, and the channel (plaintext, TLS or mTLS) they make.
//! - `keys.rs`: `pdvault keys ...` and `pdvault purge`.
//! - `accounts.rs`: `pdvault accounts ...`.
//! - `export.rs`: `pdvault export`, a resumable CSV export of an export purpose.

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::app::reload::ConfigSource;
use crate::app::{Application, generate_token, open_store};
use crate::config::{Config, FlagOverrides};
use crate::keys::Keyring;
use crate::policy::token_sha256_hex;
use crate::store::Store;

pub mod accounts;
pub mod client;
pub mod error;
pub mod export;
pub mod keys;

pub use client::ClientArgs;
pub use error::CliError;

/// The purpose `pdvault bench` reads for by default: it releases every field in plain.
pub const DEFAULT_BENCH_PURPOSE: &str = "service-delivery";
/// The four fields `pdvault bench`'s `GetRecord` asks for by default (the issue's "4 fields
/// plain"); `--fields` defaults to them.
pub const DEFAULT_BENCH_FIELDS: [&str; 4] = ["name", "id_number", "phone", "email"];

#[derive(Debug, Parser)]
#[command(name = "pdvault", version, about = "Personal-data vault")]
pub struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(ConfigArgs),
    /// Apply database migrations and exit.
    Migrate(ConfigArgs),
    /// Make caller credentials for the `callers` section of the config.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Account-security team: suspend, reinstate, inspect accounts on a running vault
    /// (grant `accounts.suspend`).
    Accounts(accounts::AccountsArgs),
    /// Key lifecycle against a running vault: rotate, rewrap, status, retire, destroy
    /// (grant `keys.rotate`).
    Keys(keys::KeysArgs),
    /// Crypto-shred records past their retention deadline, on a running vault (grant
    /// `records.purge`).
    Purge(keys::PurgeArgs),
    /// Load-test a vault over gRPC (a running one with --addr, else one started here).
    Bench(BenchArgs),
    /// Export a k-anonymous data set of an export purpose to a CSV file, resumable (RPC
    /// `ExportRecords`).
    Export(export::ExportArgs),
}

impl Command {
    /// Whether the command talks to a running vault (and so reads the connection flags).
    fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Accounts(_)
                | Command::Keys(_)
                | Command::Purge(_)
                | Command::Bench(_)
                | Command::Export(_)
        )
    }
}

/// The connection flags written on the command line (not taken from the environment), by
/// their long names.
fn client_flags_given(matches: &ArgMatches) -> Vec<&'static str> {
    const FLAGS: [(&str, &str); 7] = [
        ("addr", "--addr"),
        ("token", "--token"),
        ("token_file", "--token-file"),
        ("ca", "--ca"),
        ("cert", "--cert"),
        ("key", "--key"),
        ("tls_server_name", "--tls-server-name"),
    ];
    FLAGS
        .iter()
        .filter(|(id, _)| {
            matches!(
                matches.value_source(id),
                Some(clap::parser::ValueSource::CommandLine)
            )
        })
        .map(|(_, flag)| *flag)
        .collect()
}

/// Parses `args` (the program name first), refusing connection flags on a command that
/// does not connect anywhere: a `--addr` on `serve` silently ignored would mislead.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    if !cli.command.is_client()
        && let Some(flag) = client_flags_given(&matches).first()
    {
        return Err(command.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "{flag} is a connection flag of the client commands (accounts, keys, \
                     purge, export, bench); this command does not connect to a vault"
            ),
        ));
    }
    Ok(cli)
}

/// `pdvault bench`'s own flags. The load generator is not in this library: the binary
/// runs it (`src/bench/`), handed these by [`run`].
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Database of the vault started here (default: SQLite in the temporary data directory);
    /// not with --addr.
    #[arg(long)]
    pub database_url: Option<String>,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight at once, over all connections.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds run before measuring, per phase.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// RPC mix for a single phase, e.g. `get=70,find=10,check=15,create=5`. Without it every
    /// RPC gets a phase of its own, then GetRecord runs at half its peak rate.
    #[arg(long)]
    pub mix: Option<String>,
    /// Pace the --mix phase at this many requests per second in total (open loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Synthetic identities to create before measuring.
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    /// Also drive a do-nothing echo service on the same gRPC stack and print ratios to it.
    #[arg(long)]
    pub baseline: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Purpose of GetRecord and FindRecords.
    #[arg(long, default_value = DEFAULT_BENCH_PURPOSE)]
    pub purpose: String,
    /// Fields GetRecord asks for, comma-separated; empty asks for all the purpose releases.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "name,id_number,phone,email"
    )]
    pub fields: Vec<String>,
    /// After the phases, time one ExportRecords of every record under this export purpose
    /// (e.g. business-analytics), and the memory it takes.
    #[arg(long)]
    pub export: Option<String>,
    /// With --addr: the process id of that vault on this machine. --export then samples that
    /// process's own resident memory (/proc/PID/status); without it, a vault elsewhere's
    /// memory is not measured.
    #[arg(long, requires = "export")]
    pub server_pid: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk every chain, checkpoint and expiry marker; exit 1 on the first sign of tampering.
    Verify(VerifyArgs),
    /// Sign a checkpoint now, as this installation's signer (refused while its vault runs).
    Checkpoint(ConfigArgs),
    /// Print the audit public key (hex) to publish for `audit verify --public-key`.
    PublicKey(ConfigArgs),
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The audit public key (`pdvault audit public-key`). With it the keyring is not read:
    /// an outside verifier needs only the database and the witness file.
    #[arg(long, value_name = "HEX")]
    public_key: Option<String>,
    /// A witness file (`audit.checkpoint_sink`, JSON lines); checkpoints it holds must be
    /// in the database unchanged. Default: the configured sink, when it is a file.
    #[arg(long, value_name = "FILE")]
    checkpoints: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a fresh random token and its SHA-256 (the hash goes in config, the token to the caller).
    Generate,
    /// Read a token from standard input and print its SHA-256.
    Hash,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "PDVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Database URL (overrides `database.url`).
    #[arg(long)]
    database_url: Option<String>,
}

impl ConfigArgs {
    fn source(&self) -> ConfigSource {
        ConfigSource {
            file: self.config.clone(),
            flags: FlagOverrides {
                listen: self.listen,
                data_dir: self.data_dir.clone(),
                database_url: self.database_url.clone(),
            },
        }
    }

    fn load(&self) -> Result<Config, CliError> {
        let source = self.source();
        Ok(Config::load(source.file.as_deref(), &source.flags)?)
    }
}

/// Runs the command line and returns the process exit code. `pdvault bench` goes to
/// `bench`, the load generator the binary owns (the server library does not carry it).
pub async fn run<F, Fut>(bench: F) -> ExitCode
where
    F: FnOnce(ClientArgs, BenchArgs) -> Fut,
    Fut: Future<Output = Result<(), CliError>>,
{
    let cli = match parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let Cli { client, command } = cli;
    let hint = client.closed_connection_hint();
    let result = match command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Token(TokenCommand::Generate) => token_generate(),
        Command::Token(TokenCommand::Hash) => token_hash(),
        Command::Audit(AuditCommand::Verify(args)) => audit_verify(args).await,
        Command::Audit(AuditCommand::Checkpoint(args)) => audit_checkpoint(args).await,
        Command::Audit(AuditCommand::PublicKey(args)) => audit_public_key(args),
        Command::Accounts(args) => accounts::run(&client, args).await,
        Command::Keys(args) => keys::run(&client, args).await,
        Command::Purge(args) => keys::purge(&client, args).await,
        Command::Bench(args) => bench(client, args).await,
        Command::Export(args) => export::run(&client, args).await,
    };
    exit_code(result.map_err(|error| error.explained(hint)))
}

/// The process exit code of a command's result, its error printed first.
fn exit_code(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pdvault: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ConfigArgs) -> Result<(), CliError> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    let app = Application::build(config).await?.with_reload(args.source());
    if let Some(path) = app.admin_token_path() {
        tracing::info!(path = %path.display(), "administrator token file");
    }
    Ok(app.run_until_stopped().await?)
}

async fn migrate(args: ConfigArgs) -> Result<(), CliError> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    crate::app::create_private_dir(&config.data_dir)?;
    let store = open_store(&config).await?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}

/// The store and keyring of an installation, opened without creating anything.
async fn open_existing(args: &ConfigArgs) -> Result<(Arc<dyn Store>, Keyring), CliError> {
    let (store, config) = open_database(args).await?;
    let keys = Keyring::load(&config.keyring_path())?;
    Ok((store, keys))
}

/// The store of an installation, without its keyring.
async fn open_database(args: &ConfigArgs) -> Result<(Arc<dyn Store>, Config), CliError> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    let store = open_store(&config).await?;
    store.migrate().await?;
    Ok((store, config))
}

/// Verification reads and never writes: the database is opened read-only (SQLite
/// `mode=ro`, PostgreSQL read-only transactions) and not migrated, and a database that does
/// not exist is an error rather than a new empty one that "verifies".
async fn audit_verify(args: VerifyArgs) -> Result<(), CliError> {
    let config = args.config.load()?;
    crate::telemetry::init(&config.log);
    // An outside verifier brings the public key and needs no keyring (nor its KEKs).
    let public = match &args.public_key {
        Some(hex) => crate::crypto::AuditPublicKey::from_hex(hex)
            .ok_or("--public-key: not the 64 hex digits of an Ed25519 public key")?,
        None => Keyring::load(&config.keyring_path())?
            .audit_signing()
            .public_key(),
    };
    let store = crate::app::open_store_read_only(&config)
        .await
        .map_err(CliError::CannotVerify)?;
    let witness_file = args.checkpoints.clone().or_else(|| {
        crate::audit::CheckpointSink::parse(&config.audit.checkpoint_sink)
            .and_then(|sink| sink.file().map(ToOwned::to_owned))
    });
    let witness = match &witness_file {
        Some(path) => {
            Some(
                crate::audit::Witness::read(path).map_err(|source| CliError::Witness {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let report = crate::audit::verify_with(store.as_ref(), &public, witness.as_ref()).await?;
    println!(
        "chains: {}  events: {}  checkpoints: {}",
        report.chains, report.events, report.checkpoints
    );
    // Verifying nothing is not a pass: an empty trail is a database no vault served (a
    // mistyped URL?) or one whose trail was removed whole.
    if report.chains == 0 {
        println!("PROBLEM: no audit chains: this database holds no audit trail at all");
        return Err("nothing to verify: the database has no audit chains".into());
    }
    if report.checkpoints == 0 {
        println!(
            "PROBLEM: no checkpoints: nothing in this trail is signed, so an edit cannot be \
             told from the original"
        );
    }
    match &witness_file {
        Some(path) => println!(
            "witness {}: {} checkpoint(s) found unchanged in the database",
            path.display(),
            report.witnessed
        ),
        None => println!(
            "no witness file (--checkpoints): the newest checkpoints could have been deleted unseen"
        ),
    }
    for problem in &report.problems {
        println!("PROBLEM: {problem}");
    }
    if report.ok() && report.checkpoints > 0 {
        println!("audit trail verified");
        Ok(())
    } else if report.checkpoints == 0 {
        Err("the audit trail has no checkpoints: it cannot be verified".into())
    } else {
        Err(CliError::Refused(format!(
            "{} problem(s) found in the audit trail",
            report.problems.len()
        )))
    }
}

async fn audit_checkpoint(args: ConfigArgs) -> Result<(), CliError> {
    let config = args.load()?;
    // Locks the signer state first: while the vault runs, it is the one that signs.
    let signer = crate::app::open_signer(&config)?;
    let (store, keys) = open_existing(&args).await?;
    let now = chrono::Utc::now().timestamp_micros();
    let checkpoint = signer
        .checkpoint(store.as_ref(), keys.audit_signing(), now, false)
        .await?;
    println!(
        "checkpoint {} of signer {} written ({} head(s))",
        checkpoint.link.as_ref().map_or(0, |link| link.counter),
        signer.signer(),
        checkpoint.heads.len()
    );
    Ok(())
}

fn audit_public_key(args: ConfigArgs) -> Result<(), CliError> {
    let config = args.load()?;
    let keys = Keyring::load(&config.keyring_path())?;
    println!("{}", keys.audit_signing().public_key_hex());
    Ok(())
}

fn token_generate() -> Result<(), CliError> {
    let token = zeroize::Zeroizing::new(generate_token().map_err(|source| CliError::Io {
        what: "cannot draw a random token",
        source,
    })?);
    println!("token:        {}", token.as_str());
    println!("token_sha256: {}", token_sha256_hex(&token));
    Ok(())
}

fn token_hash() -> Result<(), CliError> {
    let mut token = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut token)
        .map_err(|source| CliError::Io {
            what: "cannot read the token from standard input",
            source,
        })?;
    println!("{}", token_sha256_hex(token.trim()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a command line; the connection flags' environment variables must not be set
    /// where the unit tests run, or they would stand in for missing flags.
    fn parse(line: &str) -> Result<Cli, clap::Error> {
        parse_from(std::iter::once("pdvault").chain(line.split_whitespace()))
    }

    #[test]
    fn connection_flags_are_accepted_anywhere_on_the_line() {
        for line in [
            "--addr https://v:1 --ca ca.pem keys rotate",
            "keys --addr https://v:1 --ca ca.pem rotate",
            "keys rotate --addr https://v:1 --ca ca.pem",
            "keys --ca ca.pem rotate --addr https://v:1",
        ] {
            let cli = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(matches!(cli.command, Command::Keys(_)), "{line}");
            assert_eq!(cli.client.addr.as_deref(), Some("https://v:1"), "{line}");
            assert_eq!(cli.client.ca, Some(PathBuf::from("ca.pem")), "{line}");
        }
        let cli = parse("accounts --token-file F history R").unwrap();
        assert_eq!(cli.client.token_file, Some(PathBuf::from("F")));
        let cli =
            parse("accounts history R --token-file F --cert c.pem --key k.pem --tls-server-name v")
                .unwrap();
        assert_eq!(cli.client.token_file, Some(PathBuf::from("F")));
        assert_eq!(cli.client.cert, Some(PathBuf::from("c.pem")));
        assert_eq!(cli.client.key, Some(PathBuf::from("k.pem")));
        assert_eq!(cli.client.tls_server_name.as_deref(), Some("v"));
        let Command::Accounts(_) = cli.command else {
            panic!("accounts parsed as {:?}", cli.command);
        };
        let cli = parse("purge --limit 3 --addr v:1 --token-file F").unwrap();
        assert!(matches!(cli.command, Command::Purge(_)));
        assert_eq!(cli.client.addr.as_deref(), Some("v:1"));
        let cli = parse("bench --seed 10 --addr v:1 --token-file F").unwrap();
        assert!(matches!(cli.command, Command::Bench(_)));
        assert_eq!(cli.client.token_file, Some(PathBuf::from("F")));
        let cli = parse("bench --addr v:1 --export business-analytics --server-pid 42").unwrap();
        let Command::Bench(bench) = cli.command else {
            panic!("bench parsed as {:?}", cli.command);
        };
        assert_eq!(bench.server_pid, Some(42));
        // The pid is only read while an export runs.
        assert!(parse("bench --addr v:1 --server-pid 42").is_err());
        let cli = parse("keys retire 3 --index --token T").unwrap();
        assert_eq!(cli.client.token.as_deref(), Some("T"));
    }

    #[test]
    fn contradictory_or_misplaced_connection_flags_are_refused() {
        let both = parse("keys status --token T --token-file F").unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        for line in [
            "serve --addr v:1",
            "--token T migrate",
            "token generate --ca ca.pem",
            "audit verify --token-file F",
        ] {
            let error = parse(line).expect_err(line);
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{line}"
            );
            assert!(
                error.to_string().contains("connection flag"),
                "{line}: {error}"
            );
        }
        assert!(parse("serve --config pdvault.toml").is_ok());
    }

    #[test]
    // figment's Jail returns its own (large) error type.
    #[allow(clippy::result_large_err)]
    fn the_configuration_ignores_the_client_environment() {
        figment::Jail::expect_with(|jail| {
            for name in client::ENVIRONMENT {
                jail.set_env(name, "/some/value");
            }
            Config::load(None, &FlagOverrides::default())
                .map_err(|e| figment::Error::from(e.to_string()))?;
            Ok(())
        });
    }
}
