//! `pdvault.v1.Audit`: the trail for compliance staff. Paging is keyset-based on
//! (time, event id), carried in an opaque page token, so deep pages cost no more than the
//! first.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::to_status;
use super::{call_context, checked, encode_page_token, paging, timestamp};
use crate::audit::StoredEvent;
use crate::proto;
use crate::vault::{AuditFilters, AuditSubject, TimeBound, Vault};

#[derive(Clone)]
pub struct AuditService {
    vault: Arc<Vault>,
}

impl AuditService {
    pub fn new(vault: Arc<Vault>) -> AuditService {
        AuditService { vault }
    }
}

#[tonic::async_trait]
impl proto::audit_server::Audit for AuditService {
    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        const RPC: &str = "ListAuditEvents";
        let ctx = call_context(&self.vault, &request, RPC).await?;
        let request = request.into_inner();
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let paged = paging(request.page_size, &request.page_token);
        let (limit, after) = checked(&self.vault, &ctx, subject, paged).await?;
        let filters = AuditFilters {
            record_id: request.record_id,
            caller: request.caller,
            purpose: request.purpose,
            outcome: request.outcome,
            start: request.start_time.map(bound),
            end: request.end_time.map(bound),
            plaintext_only: request.plaintext_only,
            limit,
            after,
        };
        let events = self
            .vault
            .list_audit_events(&ctx, filters)
            .await
            .map_err(to_status)?;
        let next_page_token = next_token(&events, limit);
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: events.into_iter().map(event_message).collect(),
            next_page_token,
        }))
    }

    async fn list_disclosures(
        &self,
        request: Request<proto::ListDisclosuresRequest>,
    ) -> Result<Response<proto::ListDisclosuresResponse>, Status> {
        const RPC: &str = "ListDisclosures";
        let ctx = call_context(&self.vault, &request, RPC).await?;
        let request = request.into_inner();
        let subject = || AuditSubject::new(RPC).record(&request.record_id);
        let paged = paging(request.page_size, &request.page_token);
        let (limit, after) = checked(&self.vault, &ctx, subject, paged).await?;
        let events = self
            .vault
            .list_disclosures(&ctx, &request.record_id, limit, after)
            .await
            .map_err(to_status)?;
        let next_page_token = next_token(&events, limit);
        let disclosures = events
            .into_iter()
            .map(|stored| {
                let event = stored.event;
                proto::Disclosure {
                    time: Some(timestamp(event.occurred_at)),
                    fields: field_releases(&event.released),
                    event_id: event.event_id,
                    caller: event.caller,
                    purpose: event.purpose.unwrap_or_default(),
                    basis: event.justification.unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(proto::ListDisclosuresResponse {
            disclosures,
            next_page_token,
        }))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<proto::VerifyAuditChainRequest>,
    ) -> Result<Response<proto::VerifyAuditChainResponse>, Status> {
        let ctx = call_context(&self.vault, &request, "VerifyAuditChain").await?;
        let report = self.vault.verify_audit(&ctx).await.map_err(to_status)?;
        Ok(Response::new(proto::VerifyAuditChainResponse {
            ok: report.ok(),
            chains: report.chains as i64,
            events: report.events as i64,
            checkpoints: report.checkpoints as i64,
            problems: report.problems.iter().map(ToString::to_string).collect(),
            witnessed_checkpoints: report.witnessed as i64,
        }))
    }
}

fn next_token(events: &[StoredEvent], limit: u32) -> String {
    match events.last() {
        Some(last) if events.len() == limit as usize => {
            encode_page_token(last.event.occurred_at, &last.event.event_id)
        }
        _ => String::new(),
    }
}

fn bound(time: prost_types::Timestamp) -> TimeBound {
    TimeBound {
        seconds: time.seconds,
        nanos: time.nanos,
    }
}

fn field_releases(released: &[(String, String)]) -> Vec<proto::FieldRelease> {
    released
        .iter()
        .map(|(field, level)| proto::FieldRelease {
            field: field.clone(),
            level: proto::ReleaseLevel::from_str_name(&format!("RELEASE_LEVEL_{level}"))
                .unwrap_or(proto::ReleaseLevel::Unspecified) as i32,
        })
        .collect()
}

fn event_message(stored: StoredEvent) -> proto::AuditEvent {
    let event = stored.event;
    proto::AuditEvent {
        time: Some(timestamp(event.occurred_at)),
        released: field_releases(&event.released),
        event_id: event.event_id,
        chain_id: event.chain_id,
        seq: stored.seq,
        caller: event.caller,
        peer: event.peer.unwrap_or_default(),
        rpc: event.rpc,
        record_ids: event.record_ids,
        purpose: event.purpose.unwrap_or_default(),
        justification: event.justification.unwrap_or_default(),
        outcome: event.outcome,
        reason: event.reason.unwrap_or_default(),
        request_id: event.request_id.unwrap_or_default(),
        trace_id: event.trace_id.unwrap_or_default(),
    }
}
