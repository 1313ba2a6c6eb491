//! `pdvault keys ...` and `pdvault purge`: gRPC clients of `pdvault.v1.KeyManagement` for
//! operators and scheduled jobs. They hold no keys and open no database: the server does the
//! work, so a command behaves the same whichever instance it reaches. The connection (address,
//! token, TLS) is the shared one of [`super::client`].
//!
//! Every failure ends in a message on standard error and a non-zero exit, which is what a
//! scheduler watches; `rewrap` draws a progress bar on standard error when it is a terminal.

use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::CliError;
use super::client::ClientArgs;
use crate::proto::key_management_client::KeyManagementClient;
use crate::proto::{self, KeyVersionState};

/// `pdvault keys`: a caller granted `keys.rotate`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

/// `pdvault purge`: a caller granted `records.purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Most records to purge in this run (default: every one that is due).
    #[arg(long)]
    limit: Option<u32>,
}

/// Runs `pdvault purge`: crypto-shreds records past their retention deadline.
pub async fn purge(connection: &ClientArgs, args: PurgeArgs) -> Result<(), CliError> {
    let vault = connection.connect().await?;
    let purged = KeyManagementClient::new(vault.channel.clone())
        .purge_expired_records(vault.request(proto::PurgeExpiredRecordsRequest {
            limit: args.limit.unwrap_or(0),
        }))
        .await?
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
pub async fn run(connection: &ClientArgs, args: KeysArgs) -> Result<(), CliError> {
    let vault = connection.connect().await?;
    let mut client = KeyManagementClient::new(vault.channel.clone());
    match args.command {
        KeysCommand::Rotate {
            expect_active,
            index: true,
        } => {
            let response = client
                .rotate_index_key(vault.request(proto::RotateIndexKeyRequest {
                    expected_active_version: expect_active.unwrap_or(0),
                }))
                .await?
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
                .rotate_key_encryption_key(vault.request(proto::RotateKeyEncryptionKeyRequest {
                    expected_active_version: expect_active.unwrap_or(0),
                }))
                .await?
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
                .rewrap_records(vault.request(proto::RewrapRecordsRequest { batch_size }))
                .await?
                .into_inner();
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} rewrap to v{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .map_err(CliError::Progress)?
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
                        return Err(status.into());
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
                Some(progress) => Err(CliError::Refused(format!(
                    "rewrap ended early: {} rewrapped, {} remaining; {} re-indexed, {} \
                     remaining (job {})",
                    progress.rewrapped,
                    progress.remaining,
                    progress.reindexed,
                    progress.index_remaining,
                    progress.job_id
                ))),
                None => Err("rewrap ended without reporting progress".into()),
            }
        }
        KeysCommand::Status => {
            let status = client
                .get_key_status(vault.request(proto::GetKeyStatusRequest {}))
                .await?
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
                .retire_key_version(vault.request(proto::RetireKeyVersionRequest {
                    version,
                    kind: kind as i32,
                }))
                .await?
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
                .destroy_key_version(vault.request(proto::DestroyKeyVersionRequest {
                    version,
                    kind: kind as i32,
                }))
                .await?
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

fn state_name(state: KeyVersionState) -> &'static str {
    match state {
        KeyVersionState::Active => "ACTIVE",
        KeyVersionState::DecryptOnly => "DECRYPT_ONLY",
        KeyVersionState::Retired => "RETIRED",
        KeyVersionState::Destroyed => "DESTROYED",
        KeyVersionState::Unspecified => "UNSPECIFIED",
    }
}
