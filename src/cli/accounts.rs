//! `pdvault accounts ...`: the account-security team's client of
//! `pdvault.v1.AccountSecurity` (and `Vault.CheckAccount` for `status`): one gRPC call per
//! command, printed for a terminal. The connection is the shared one of [`super::client`].

use clap::{Args, Subcommand};

use super::CliError;
use super::client::ClientArgs;

/// `pdvault accounts`: a caller granted `accounts.suspend` (and the CheckAccount RPC for
/// `status`).
#[derive(Debug, Args)]
pub struct AccountsArgs {
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

/// The account-security client: one gRPC call per command, printed for a terminal.
pub async fn run(connection: &ClientArgs, args: AccountsArgs) -> Result<(), CliError> {
    use crate::proto;
    use crate::proto::account_security_client::AccountSecurityClient;
    use crate::proto::vault_client::VaultClient;

    let vault = connection.connect().await?;
    let mut security = AccountSecurityClient::new(vault.channel.clone());
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
                .suspend_account(vault.request(proto::SuspendAccountRequest {
                    record_id,
                    reason: reason as i32,
                    note,
                    ticket,
                }))
                .await?
                .into_inner();
            print_action(&response);
        }
        AccountsCommand::Reinstate {
            record_id,
            note,
            ticket,
        } => {
            let response = security
                .reinstate_account(vault.request(proto::ReinstateAccountRequest {
                    record_id,
                    note,
                    ticket,
                }))
                .await?
                .into_inner();
            print_action(&response);
        }
        AccountsCommand::Status { record_id } => {
            let state = VaultClient::new(vault.channel.clone())
                .check_account(vault.request(proto::CheckAccountRequest { record_id }))
                .await?
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
                    .list_account_events(vault.request(proto::ListAccountEventsRequest {
                        record_id: record_id.clone(),
                        page_size: 0,
                        page_token: page_token.clone(),
                    }))
                    .await?
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
