//! The command line: `serve`, `migrate`, `token`, `audit`, `accounts`, `keys`, `purge` and
//! `bench`. Parsing is clap's; every server-side command loads configuration the same way
//! (defaults < file < environment < flags). `accounts`, `keys` and `purge` are gRPC clients
//! of a running vault, so scheduled jobs need only an address and a token with the grant.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use std::sync::Arc;

use crate::config::{Config, FlagOverrides};
use crate::keys::Keyring;
use crate::policy::token_sha256_hex;
use crate::reload::ConfigSource;
use crate::startup::{Application, generate_token, open_store};
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(name = "pdvault", version, about = "Personal-data vault")]
pub struct Cli {
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
    /// Account-security team: suspend, reinstate, inspect accounts on a running vault.
    Accounts(AccountsArgs),
    /// Key lifecycle against a running vault: rotate, rewrap, status, retire, destroy.
    Keys(crate::key_cli::KeysArgs),
    /// Crypto-shred records past their retention deadline, on a running vault (grant
    /// `records.purge`).
    Purge(crate::key_cli::PurgeArgs),
    /// Load-test a vault over gRPC (a running one with --addr, else one started here).
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A running vault's gRPC address; without it a vault is started in this process on a
    /// temporary data directory.
    #[arg(long)]
    addr: Option<String>,
    /// Bearer token for --addr (a caller allowed the RPCs of the mix and the purpose).
    #[arg(long, env = "PDVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token for --addr, when --token is not given.
    #[arg(long, default_value = "pdvault-data/admin.token")]
    token_file: PathBuf,
    /// Database of the vault started here (default: SQLite in the temporary data directory).
    #[arg(long, conflicts_with = "addr")]
    database_url: Option<String>,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once, over all connections.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring, per phase.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// RPC mix for a single phase, e.g. `get=70,find=10,check=15,create=5`. Without it every
    /// RPC gets a phase of its own, then GetRecord runs at half its peak rate.
    #[arg(long)]
    mix: Option<String>,
    /// Pace the --mix phase at this many requests per second in total (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Synthetic identities to create before measuring.
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Also drive a do-nothing echo service on the same gRPC stack and print ratios to it.
    #[arg(long)]
    baseline: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Purpose of GetRecord and FindRecords.
    #[arg(long, default_value = crate::bench::DEFAULT_PURPOSE)]
    purpose: String,
    /// Fields GetRecord asks for, comma-separated; empty asks for all the purpose releases.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "name,id_number,phone,email"
    )]
    fields: Vec<String>,
}

#[derive(Debug, Args)]
struct AccountsArgs {
    /// The vault's gRPC address.
    #[arg(long, env = "PDVAULT_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token of a caller with the `accounts.suspend` grant.
    #[arg(long, env = "PDVAULT_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: AccountsCommand,
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Suspend an account.
    Suspend {
        record_id: String,
        #[arg(long, value_enum)]
        reason: ReasonArg,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long, default_value = "")]
        ticket: String,
    },
    /// Lift a suspension.
    Reinstate {
        record_id: String,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long, default_value = "")]
        ticket: String,
    },
    /// Show an account's status and flags (needs the CheckAccount RPC).
    Status { record_id: String },
    /// List an account's suspension and consent history, oldest first.
    History { record_id: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReasonArg {
    UserRequest,
    CredentialCompromise,
    PolicyViolation,
    LegalOrder,
    Other,
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

    fn load(&self) -> Result<Config, String> {
        let source = self.source();
        Config::load(source.file.as_deref(), &source.flags).map_err(|e| e.to_string())
    }
}

/// Runs the command line and returns the process exit code.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Token(TokenCommand::Generate) => token_generate(),
        Command::Token(TokenCommand::Hash) => token_hash(),
        Command::Audit(AuditCommand::Verify(args)) => audit_verify(args).await,
        Command::Audit(AuditCommand::Checkpoint(args)) => audit_checkpoint(args).await,
        Command::Audit(AuditCommand::PublicKey(args)) => audit_public_key(args),
        Command::Accounts(args) => accounts(args).await,
        Command::Keys(args) => crate::key_cli::run(args).await,
        Command::Purge(args) => crate::key_cli::purge(args).await,
        Command::Bench(args) => bench(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pdvault: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    let app = Application::build(config)
        .await
        .map_err(|e| e.to_string())?
        .with_reload(args.source());
    if let Some(path) = app.admin_token_path() {
        tracing::info!(path = %path.display(), "administrator token file");
    }
    app.run_until_stopped().await.map_err(|e| e.to_string())
}

async fn migrate(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    crate::startup::create_private_dir(&config.data_dir).map_err(|e| e.to_string())?;
    let store = open_store(&config).await.map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    println!("migrations applied");
    Ok(())
}

/// The store and keyring of an installation, opened without creating anything.
async fn open_existing(args: &ConfigArgs) -> Result<(Arc<dyn Store>, Keyring), String> {
    let (store, config) = open_database(args).await?;
    let keys = Keyring::load(&config.keyring_path()).map_err(|e| e.to_string())?;
    Ok((store, keys))
}

/// The store of an installation, without its keyring.
async fn open_database(args: &ConfigArgs) -> Result<(Arc<dyn Store>, Config), String> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    let store = open_store(&config).await.map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    Ok((store, config))
}

/// Verification reads and never writes: the database is opened read-only (SQLite
/// `mode=ro`, PostgreSQL read-only transactions) and not migrated, and a database that does
/// not exist is an error rather than a new empty one that "verifies".
async fn audit_verify(args: VerifyArgs) -> Result<(), String> {
    let config = args.config.load()?;
    crate::telemetry::init(&config.log);
    // An outside verifier brings the public key and needs no keyring (nor its KEKs).
    let public = match &args.public_key {
        Some(hex) => crate::crypto::AuditPublicKey::from_hex(hex)
            .ok_or("--public-key: not the 64 hex digits of an Ed25519 public key")?,
        None => Keyring::load(&config.keyring_path())
            .map_err(|e| e.to_string())?
            .audit_signing()
            .public_key(),
    };
    let store = crate::startup::open_store_read_only(&config)
        .await
        .map_err(|e| format!("cannot verify: {e}"))?;
    let witness_file = args.checkpoints.clone().or_else(|| {
        crate::audit::CheckpointSink::parse(&config.audit.checkpoint_sink)
            .and_then(|sink| sink.file().map(ToOwned::to_owned))
    });
    let witness = match &witness_file {
        Some(path) => Some(
            crate::audit::Witness::read(path)
                .map_err(|e| format!("witness file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let report = crate::audit::verify_with(store.as_ref(), &public, witness.as_ref())
        .await
        .map_err(|e| e.to_string())?;
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
        Err(format!(
            "{} problem(s) found in the audit trail",
            report.problems.len()
        ))
    }
}

async fn audit_checkpoint(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    // Locks the signer state first: while the vault runs, it is the one that signs.
    let signer = crate::startup::open_signer(&config).map_err(|e| e.to_string())?;
    let (store, keys) = open_existing(&args).await?;
    let now = chrono::Utc::now().timestamp_micros();
    let checkpoint = signer
        .checkpoint(store.as_ref(), keys.audit_signing(), now, false)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "checkpoint {} of signer {} written ({} head(s))",
        checkpoint.link.as_ref().map_or(0, |link| link.counter),
        signer.signer(),
        checkpoint.heads.len()
    );
    Ok(())
}

fn audit_public_key(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    let keys = Keyring::load(&config.keyring_path()).map_err(|e| e.to_string())?;
    println!("{}", keys.audit_signing().public_key_hex());
    Ok(())
}

/// The account-security client: one gRPC call per command, printed for a terminal.
async fn accounts(args: AccountsArgs) -> Result<(), String> {
    use crate::proto;
    use crate::proto::account_security_client::AccountSecurityClient;
    use crate::proto::vault_client::VaultClient;

    let channel = tonic::transport::Endpoint::from_shared(args.addr.clone())
        .map_err(|e| format!("--addr: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.addr))?;
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {}", args.token)
            .parse()
            .map_err(|_| "PDVAULT_TOKEN is not a valid header value".to_owned())?;
    let describe = |status: tonic::Status| format!("{:?}: {}", status.code(), status.message());
    let mut security = AccountSecurityClient::new(channel.clone());
    match args.command {
        AccountsCommand::Suspend {
            record_id,
            reason,
            note,
            ticket,
        } => {
            let reason = match reason {
                ReasonArg::UserRequest => proto::SuspensionReason::UserRequest,
                ReasonArg::CredentialCompromise => proto::SuspensionReason::CredentialCompromise,
                ReasonArg::PolicyViolation => proto::SuspensionReason::PolicyViolation,
                ReasonArg::LegalOrder => proto::SuspensionReason::LegalOrder,
                ReasonArg::Other => proto::SuspensionReason::Other,
            };
            let response = security
                .suspend_account(with_token(
                    &bearer,
                    proto::SuspendAccountRequest {
                        record_id,
                        reason: reason as i32,
                        note,
                        ticket,
                    },
                ))
                .await
                .map_err(describe)?
                .into_inner();
            print_action(&response);
        }
        AccountsCommand::Reinstate {
            record_id,
            note,
            ticket,
        } => {
            let response = security
                .reinstate_account(with_token(
                    &bearer,
                    proto::ReinstateAccountRequest {
                        record_id,
                        note,
                        ticket,
                    },
                ))
                .await
                .map_err(describe)?
                .into_inner();
            print_action(&response);
        }
        AccountsCommand::Status { record_id } => {
            let state = VaultClient::new(channel)
                .check_account(with_token(
                    &bearer,
                    proto::CheckAccountRequest { record_id },
                ))
                .await
                .map_err(describe)?
                .into_inner();
            println!(
                "{} {} minor={} under_14={} guardian_consent_required={} policy_reconsent_required={}",
                state.record_id,
                state
                    .status()
                    .as_str_name()
                    .trim_start_matches("ACCOUNT_STATUS_"),
                state.minor,
                state.under_14,
                state.guardian_consent_required,
                state.policy_reconsent_required
            );
        }
        AccountsCommand::History { record_id } => {
            let mut page_token = String::new();
            loop {
                let page = security
                    .list_account_events(with_token(
                        &bearer,
                        proto::ListAccountEventsRequest {
                            record_id: record_id.clone(),
                            page_size: 0,
                            page_token: page_token.clone(),
                        },
                    ))
                    .await
                    .map_err(describe)?
                    .into_inner();
                for event in &page.events {
                    let time = event
                        .time
                        .as_ref()
                        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default();
                    println!(
                        "{time} {} by {} reason={} ticket={} consent={} note={}",
                        event
                            .kind()
                            .as_str_name()
                            .trim_start_matches("ACCOUNT_EVENT_KIND_"),
                        event.actor,
                        event
                            .reason()
                            .as_str_name()
                            .trim_start_matches("SUSPENSION_REASON_"),
                        event.ticket,
                        event.consent_id,
                        event.note
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
    }
    Ok(())
}

async fn bench(args: BenchArgs) -> Result<(), String> {
    use crate::bench::{BenchOptions, Mix, TargetSpec};
    let seconds = |flag: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value)
            .map_err(|_| format!("--{flag} must be a non-negative number of seconds"))
    };
    let target = match args.addr {
        Some(addr) => {
            let token = match args.token {
                Some(token) => zeroize::Zeroizing::new(token),
                None => zeroize::Zeroizing::new(
                    std::fs::read_to_string(&args.token_file).map_err(|e| {
                        format!(
                            "--addr needs --token, PDVAULT_TOKEN or a readable --token-file ({}: {e})",
                            args.token_file.display()
                        )
                    })?,
                ),
            };
            TargetSpec::External {
                addr,
                token: token.trim().to_owned(),
            }
        }
        None => TargetSpec::InProcess {
            database_url: args.database_url,
        },
    };
    let options = BenchOptions {
        target,
        connections: args.connections,
        in_flight: args.in_flight,
        duration: seconds("duration", args.duration)?,
        warmup: seconds("warmup", args.warmup)?,
        mix: args
            .mix
            .as_deref()
            .map(Mix::parse)
            .transpose()
            .map_err(|e| e.to_string())?,
        rate: args.rate,
        seed: args.seed,
        baseline: args.baseline,
        purpose: args.purpose,
        fields: args.fields.into_iter().filter(|f| !f.is_empty()).collect(),
    };
    let report = crate::bench::run(options)
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn with_token<T>(
    bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    message: T,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    request
}

fn print_action(response: &crate::proto::AccountActionResponse) {
    if response.changed {
        println!("{} is now {}", response.record_id, response.status);
    } else {
        println!(
            "{} was already {}; nothing changed",
            response.record_id, response.status
        );
    }
}

fn token_generate() -> Result<(), String> {
    let token = zeroize::Zeroizing::new(generate_token().map_err(|e| e.to_string())?);
    println!("token:        {}", token.as_str());
    println!("token_sha256: {}", token_sha256_hex(&token));
    Ok(())
}

fn token_hash() -> Result<(), String> {
    let mut token = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut token)
        .map_err(|e| e.to_string())?;
    println!("{}", token_sha256_hex(token.trim()));
    Ok(())
}
