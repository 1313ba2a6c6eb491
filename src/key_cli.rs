//! `pdvault keys ...` and `pdvault purge`: gRPC clients of `pdvault.v1.KeyManagement` for
//! operators and scheduled jobs. It holds no keys and opens no database: the server does the work, so the
//! command behaves the same whichever instance it reaches.
//!
//! Every failure ends in a message on standard error and a non-zero exit, which is what a
//! scheduler watches; `rewrap` draws a progress bar on standard error when it is a terminal.

use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::transport::Channel;

use crate::proto::key_management_client::KeyManagementClient;
use crate::proto::{self, KeyVersionState};

/// Where the vault is and who is calling.
#[derive(Debug, Args)]
pub struct Connection {
    /// Address of a running vault.
    #[arg(long, env = "PDVAULT_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token of a caller granted `keys.rotate`. Prefer the environment or
    /// --token-file: a flag shows in the process list.
    #[arg(long, env = "PDVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (e.g. the data directory's admin.token).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Address of a running vault.
    #[arg(long, env = "PDVAULT_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token of a caller granted `records.purge`. Prefer the environment or
    /// --token-file: a flag shows in the process list.
    #[arg(long, env = "PDVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// Most records to purge in this run (default: every one that is due).
    #[arg(long)]
    limit: Option<u32>,
}

impl Connection {
    /// The token, and a client connected to the vault.
    async fn connect(
        &self,
    ) -> Result<(zeroize::Zeroizing<String>, KeyManagementClient<Channel>), String> {
        let token = zeroize::Zeroizing::new(match (&self.token, &self.token_file) {
            (Some(token), _) => token.trim().to_owned(),
            // The same rule as the server's: a token file others can read is refused.
            (None, Some(path)) => crate::keys::read_secret_file(path, 4096)
                .map_err(|e| e.to_string())?
                .as_str()
                .to_owned(),
            (None, None) => {
                return Err("a token is required: --token-file or PDVAULT_TOKEN".into());
            }
        });
        let channel = Channel::from_shared(self.addr.clone())
            .map_err(|e| format!("--addr: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.addr))?;
        Ok((token, KeyManagementClient::new(channel)))
    }
}

/// Runs `pdvault purge`: crypto-shreds records past their retention deadline.
pub async fn purge(args: PurgeArgs) -> Result<(), String> {
    // Its own flags only so that its help names its own grant.
    let connection = Connection {
        addr: args.addr,
        token: args.token,
        token_file: args.token_file,
    };
    let (token, mut client) = connection.connect().await?;
    let purged = client
        .purge_expired_records(authed(
            &token,
            proto::PurgeExpiredRecordsRequest {
                limit: args.limit.unwrap_or(0),
            },
        )?)
        .await
        .map_err(describe)?
        .into_inner()
        .purged_record_ids;
    println!(
        "purged {} records past their retention deadline",
        purged.len()
    );
    for record_id in &purged {
        println!("{record_id}");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a new KEK version (or, with --index, blind-index and pseudonym key version)
    /// and make it active.
    Rotate {
        /// Rotate only if this version is still the active one (for jobs that may run on
        /// several hosts at once: exactly one of them rotates).
        #[arg(long)]
        expect_active: Option<u32>,
        /// Rotate the blind-index and pseudonym keys instead of the KEK. Released
        /// pseudonyms change; run `keys rewrap` afterwards to re-index old records.
        #[arg(long)]
        index: bool,
    },
    /// Rewrap every data key under an older KEK version to the active one, then re-index
    /// every record under an older index version.
    Rewrap {
        /// Records per transaction (server default 500).
        #[arg(long, default_value_t = 0)]
        batch_size: u32,
    },
    /// Show every KEK and index version, its state and how many records use it.
    Status,
    /// Retire a decrypt-only version that nothing uses any more.
    Retire {
        version: u32,
        /// An index version rather than a KEK version.
        #[arg(long)]
        index: bool,
    },
    /// Destroy a retired version's material, irreversibly.
    Destroy {
        version: u32,
        /// An index version rather than a KEK version.
        #[arg(long)]
        index: bool,
    },
}

fn kind_of(index: bool) -> (proto::KeyKind, &'static str) {
    if index {
        (proto::KeyKind::Index, "index")
    } else {
        (proto::KeyKind::Kek, "KEK")
    }
}

/// Runs a `keys` subcommand; `Err` becomes the message and the non-zero exit.
pub async fn run(args: KeysArgs) -> Result<(), String> {
    let (token, mut client) = args.connection.connect().await?;
    match args.command {
        KeysCommand::Rotate {
            expect_active,
            index: true,
        } => {
            let response = client
                .rotate_index_key(authed(
                    &token,
                    proto::RotateIndexKeyRequest {
                        expected_active_version: expect_active.unwrap_or(0),
                    },
                )?)
                .await
                .map_err(describe)?
                .into_inner();
            let active = response.active.unwrap_or_default();
            if response.created {
                println!(
                    "rotated: index version {} is active; run `pdvault keys rewrap` to re-index",
                    active.version
                );
            } else {
                println!(
                    "not rotated: another rotation made index version {} active",
                    active.version
                );
            }
            Ok(())
        }
        KeysCommand::Rotate {
            expect_active,
            index: false,
        } => {
            let response = client
                .rotate_key_encryption_key(authed(
                    &token,
                    proto::RotateKeyEncryptionKeyRequest {
                        expected_active_version: expect_active.unwrap_or(0),
                    },
                )?)
                .await
                .map_err(describe)?
                .into_inner();
            let active = response.active.unwrap_or_default();
            if response.created {
                println!("rotated: KEK version {} is active", active.version);
            } else {
                println!(
                    "not rotated: another rotation made KEK version {} active",
                    active.version
                );
            }
            Ok(())
        }
        KeysCommand::Rewrap { batch_size } => {
            let mut stream = client
                .rewrap_records(authed(&token, proto::RewrapRecordsRequest { batch_size })?)
                .await
                .map_err(describe)?
                .into_inner();
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} rewrap to v{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            let mut last = None;
            loop {
                match stream.message().await {
                    Ok(Some(progress)) => {
                        bar.set_length(progress.total.max(0) as u64);
                        bar.set_position(progress.rewrapped.max(0) as u64);
                        bar.set_message(progress.target_version.to_string());
                        last = Some(progress);
                    }
                    Ok(None) => break,
                    Err(status) => {
                        bar.abandon();
                        return Err(describe(status));
                    }
                }
            }
            bar.finish_and_clear();
            match last {
                Some(progress) if progress.done => {
                    println!(
                        "rewrap done: {} records rewrapped to KEK version {}, {} re-indexed \
                         to index version {} (job {})",
                        progress.rewrapped,
                        progress.target_version,
                        progress.reindexed,
                        progress.target_index_version,
                        progress.job_id
                    );
                    Ok(())
                }
                Some(progress) => Err(format!(
                    "rewrap ended early: {} rewrapped, {} remaining; {} re-indexed, {} \
                     remaining (job {})",
                    progress.rewrapped,
                    progress.remaining,
                    progress.reindexed,
                    progress.index_remaining,
                    progress.job_id
                )),
                None => Err("rewrap ended without reporting progress".into()),
            }
        }
        KeysCommand::Status => {
            let status = client
                .get_key_status(authed(&token, proto::GetKeyStatusRequest {})?)
                .await
                .map_err(describe)?
                .into_inner();
            print_versions(&status.versions);
            println!("\nindex (blind-index and pseudonym) versions:");
            print_versions(&status.index_versions);
            print_jobs(&status.rewrap_jobs);
            Ok(())
        }
        KeysCommand::Retire { version, index } => {
            let (kind, name) = kind_of(index);
            let retired = client
                .retire_key_version(authed(
                    &token,
                    proto::RetireKeyVersionRequest {
                        version,
                        kind: kind as i32,
                    },
                )?)
                .await
                .map_err(describe)?
                .into_inner();
            println!(
                "{name} version {} is {}",
                retired.version,
                state_name(retired.state())
            );
            Ok(())
        }
        KeysCommand::Destroy { version, index } => {
            let (kind, name) = kind_of(index);
            let destroyed = client
                .destroy_key_version(authed(
                    &token,
                    proto::DestroyKeyVersionRequest {
                        version,
                        kind: kind as i32,
                    },
                )?)
                .await
                .map_err(describe)?
                .into_inner();
            println!(
                "{name} version {} is {}",
                destroyed.version,
                state_name(destroyed.state())
            );
            Ok(())
        }
    }
}

/// One line per version: number, state, records using it, provider, creation time.
fn print_versions(versions: &[proto::KeyVersion]) {
    println!(
        "{:>8}  {:<13} {:>10}  {:<8} created",
        "version", "state", "records", "provider"
    );
    for version in versions {
        let created = version
            .create_time
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        println!(
            "{:>8}  {:<13} {:>10}  {:<8} {created}",
            version.version,
            state_name(version.state()),
            version.record_count,
            version.provider
        );
    }
}

/// The newest rewrap jobs, with a hint for any that died with its server.
fn print_jobs(jobs: &[proto::RewrapJob]) {
    if jobs.is_empty() {
        println!("\nrewrap jobs: none");
        return;
    }
    println!("\nrewrap jobs (newest first):");
    println!(
        "{:<30} {:<11} {:>7} {:>10} {:>10} {:>7}  owner, last progress",
        "job", "state", "target", "rewrapped", "reindexed", "failed"
    );
    for job in jobs {
        let updated = job
            .update_time
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        println!(
            "{:<30} {:<11} {:>7} {:>10} {:>10} {:>7}  {}, {updated}",
            job.job_id,
            job.state,
            format!("v{}", job.target_version),
            job.rewrapped,
            job.reindexed,
            job.failed,
            if job.owner.is_empty() {
                "-"
            } else {
                &job.owner
            },
        );
    }
    if jobs.iter().any(|job| job.state == "INTERRUPTED") {
        println!(
            "an INTERRUPTED job's server stopped before it finished; `pdvault keys rewrap` \
             resumes the work"
        );
    }
}

fn authed<T>(token: &str, message: T) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token is not a valid header value".to_owned())?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn state_name(state: KeyVersionState) -> &'static str {
    match state {
        KeyVersionState::Active => "ACTIVE",
        KeyVersionState::DecryptOnly => "DECRYPT_ONLY",
        KeyVersionState::Retired => "RETIRED",
        KeyVersionState::Destroyed => "DESTROYED",
        KeyVersionState::Unspecified => "UNSPECIFIED",
    }
}

fn describe(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
