//! `pdvault.v1.AccountSecurity`: suspension, reinstatement and account history for the
//! account-security team.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::to_status;
use super::{call_context, checked, encode_page_token, paging, timestamp, violation};
use crate::domain::Violation;
use crate::domain::ids::ConsentId;
use crate::proto;
use crate::vault::accounts::{AccountAction, AccountHistoryEntry, SuspensionReason};
use crate::vault::{AuditSubject, Vault};

#[derive(Clone)]
pub struct AccountSecurityService {
    vault: Arc<Vault>,
}

impl AccountSecurityService {
    pub fn new(vault: Arc<Vault>) -> AccountSecurityService {
        AccountSecurityService { vault }
    }
}

#[tonic::async_trait]
impl proto::account_security_server::AccountSecurity for AccountSecurityService {
    async fn suspend_account(
        &self,
        request: Request<proto::SuspendAccountRequest>,
    ) -> Result<Response<proto::AccountActionResponse>, Status> {
        const RPC: &str = "SuspendAccount";
        let ctx = call_context(&self.vault, &request, RPC).await?;
        let request = request.into_inner();
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let reason = suspension_reason(request.reason).map_err(|v| vec![v]);
        let reason = checked(&self.vault, &ctx, subject, reason).await?;
        let record_id = request.record_id;
        let action = AccountAction {
            record_id: record_id.clone(),
            reason: Some(reason),
            note: request.note,
            ticket: request.ticket,
        };
        let changed = self
            .vault
            .set_suspension(&ctx, action, true)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::AccountActionResponse {
            record_id,
            changed,
            status: "SUSPENDED".into(),
        }))
    }

    async fn reinstate_account(
        &self,
        request: Request<proto::ReinstateAccountRequest>,
    ) -> Result<Response<proto::AccountActionResponse>, Status> {
        let ctx = call_context(&self.vault, &request, "ReinstateAccount").await?;
        let request = request.into_inner();
        let record_id = request.record_id;
        let action = AccountAction {
            record_id: record_id.clone(),
            reason: None,
            note: request.note,
            ticket: request.ticket,
        };
        let changed = self
            .vault
            .set_suspension(&ctx, action, false)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::AccountActionResponse {
            record_id,
            changed,
            status: "ACTIVE".into(),
        }))
    }

    async fn list_account_events(
        &self,
        request: Request<proto::ListAccountEventsRequest>,
    ) -> Result<Response<proto::ListAccountEventsResponse>, Status> {
        const RPC: &str = "ListAccountEvents";
        let ctx = call_context(&self.vault, &request, RPC).await?;
        let request = request.into_inner();
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let paged = paging(request.page_size, &request.page_token);
        let (limit, after) = checked(&self.vault, &ctx, subject, paged).await?;
        let entries = self
            .vault
            .account_history(&ctx, &request.record_id, limit, after)
            .await
            .map_err(to_status)?;
        let next_page_token = match entries.last() {
            Some(last) if entries.len() == limit as usize => {
                encode_page_token(last.row.occurred_at, last.row.event_id.as_str())
            }
            _ => String::new(),
        };
        Ok(Response::new(proto::ListAccountEventsResponse {
            events: entries.into_iter().map(event_message).collect(),
            next_page_token,
        }))
    }
}

fn suspension_reason(value: i32) -> Result<SuspensionReason, Violation> {
    use proto::SuspensionReason as P;
    match P::try_from(value) {
        Ok(P::UserRequest) => Ok(SuspensionReason::UserRequest),
        Ok(P::CredentialCompromise) => Ok(SuspensionReason::CredentialCompromise),
        Ok(P::PolicyViolation) => Ok(SuspensionReason::PolicyViolation),
        Ok(P::LegalOrder) => Ok(SuspensionReason::LegalOrder),
        Ok(P::Other) => Ok(SuspensionReason::Other),
        _ => Err(violation(
            "reason",
            "must be one of USER_REQUEST, CREDENTIAL_COMPROMISE, POLICY_VIOLATION, LEGAL_ORDER, OTHER",
        )),
    }
}

fn event_message(entry: AccountHistoryEntry) -> proto::AccountEvent {
    let row = entry.row;
    let kind = match row.kind.as_str() {
        "SUSPENDED" => proto::AccountEventKind::Suspended,
        "REINSTATED" => proto::AccountEventKind::Reinstated,
        "CONSENT_RECORDED" => proto::AccountEventKind::ConsentRecorded,
        "CONSENT_REVOKED" => proto::AccountEventKind::ConsentRevoked,
        _ => proto::AccountEventKind::Unspecified,
    };
    let reason = row
        .reason
        .as_deref()
        .and_then(|r| proto::SuspensionReason::from_str_name(&format!("SUSPENSION_REASON_{r}")))
        .unwrap_or(proto::SuspensionReason::Unspecified);
    proto::AccountEvent {
        event_id: row.event_id.into_string(),
        kind: kind as i32,
        time: Some(timestamp(row.occurred_at)),
        actor: row.actor,
        reason: reason as i32,
        note: entry.note.unwrap_or_default(),
        ticket: row.ticket.unwrap_or_default(),
        consent_id: row
            .consent_id
            .map(ConsentId::into_string)
            .unwrap_or_default(),
    }
}
