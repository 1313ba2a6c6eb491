//! `pdvault.v1.Admin`: operator calls, authenticated and granted like every other RPC.
//!
//! The one gRPC service outside `grpc/`: its call drives the application's reload
//! (`reload.rs`), and `grpc/` sits below `app`. It authenticates, grants and audits through
//! the gRPC layer's own functions, as the services there do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::reload::PolicyReloader;
use crate::grpc::call_context;
use crate::grpc::status::{RequestError, policy_invalid, to_status};
use crate::policy::Rpc;
use crate::proto;
use crate::vault::{AuditSubject, Vault, VaultError};

pub struct AdminService {
    vault: Arc<Vault>,
    reloader: Option<Arc<PolicyReloader>>,
}

impl AdminService {
    /// `reloader` is `None` when the server was not started from configuration it can
    /// read again (tests that build the config in code).
    pub fn new(vault: Arc<Vault>, reloader: Option<Arc<PolicyReloader>>) -> AdminService {
        AdminService { vault, reloader }
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn reload_policy(
        &self,
        request: Request<proto::ReloadPolicyRequest>,
    ) -> Result<Response<proto::ReloadPolicyResponse>, Status> {
        let ctx = call_context(&self.vault, &request, Rpc::ReloadPolicy.as_str()).await?;
        let caller = ctx.caller.clone();
        if !caller.may_call(Rpc::ReloadPolicy) {
            let refused = VaultError::OperationNotGranted(Rpc::ReloadPolicy.as_str());
            let subject = AuditSubject::new(Rpc::ReloadPolicy.as_str());
            self.vault.audit_refusal(&ctx, subject, &refused).await;
            return Err(to_status(refused));
        }
        let reloader = self
            .reloader
            .as_ref()
            .ok_or(RequestError::ReloadUnavailable)?;
        tracing::info!(caller = %caller.name, "policy reload requested");
        let reloaded = reloader
            .reload(&caller.name)
            .await
            .map_err(|error| policy_invalid(&error))?;
        let mut purposes: Vec<String> =
            reloaded.policy.purpose_names().map(str::to_owned).collect();
        purposes.sort();
        Ok(Response::new(proto::ReloadPolicyResponse {
            generation: reloaded.generation,
            callers: reloaded.policy.caller_names().map(str::to_owned).collect(),
            purposes,
        }))
    }
}
