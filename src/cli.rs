//! The command line: `serve`, `migrate`, `token`, `keys` and `purge`. Parsing is clap's; every
//! server-side command loads configuration the same way (defaults < file < environment <
//! flags). The `keys` commands are gRPC clients of a running vault (see [`crate::key_cli`]),
//! so scheduled jobs need only an address and a token holding the `keys.rotate` grant.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FlagOverrides};
use crate::policy::token_sha256_hex;
use crate::startup::{Application, generate_token, open_store};

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
    /// Key lifecycle against a running vault: rotate, rewrap, status, retire, destroy.
    Keys(crate::key_cli::KeysArgs),
    /// Crypto-shred records past their retention deadline, on a running vault.
    Purge(crate::key_cli::PurgeArgs),
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
    fn load(&self) -> Result<Config, String> {
        let flags = FlagOverrides {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
        };
        Config::load(self.config.as_deref(), &flags).map_err(|e| e.to_string())
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
        Command::Keys(args) => crate::key_cli::run(args).await,
        Command::Purge(args) => crate::key_cli::purge(args).await,
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
        .map_err(|e| e.to_string())?;
    if let Some(path) = app.admin_token_path() {
        tracing::info!(path = %path.display(), "administrator token file");
    }
    app.run_until_stopped().await.map_err(|e| e.to_string())
}

async fn migrate(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    crate::telemetry::init(&config.log);
    std::fs::create_dir_all(&config.data_dir).map_err(|e| e.to_string())?;
    let store = open_store(&config).await.map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    println!("migrations applied");
    Ok(())
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
