//! The many-records calls of `pdvault.v1.Vault`: `BatchGetRecords`, `BatchCreateRecords`
//! and the `ExportRecords` stream. Proto ⇄ domain only; the decisions are the vault's
//! (`vault/batch.rs`, `vault/export.rs`). A per-item error is the `google.rpc.Status` the
//! single call would have failed with ([`super::status::to_status`]), details included.

use std::pin::Pin;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::status::to_status;
use super::{
    VaultService, identity_input, non_empty, record_message, release_level, release_message,
};
use crate::proto;
use crate::vault::{CreateItem, ExportItem, ExportRequest, VaultError};

pub(super) type ExportStream =
    Pin<Box<dyn Stream<Item = Result<proto::ExportRecordsResponse, Status>> + Send>>;

/// Rows buffered between the export and the connection: enough to keep both busy, small
/// enough that a slow reader holds the scan back instead of memory growing.
const EXPORT_BUFFER: usize = 1024;

/// An error as the `google.rpc.Status` message a batch result carries.
fn item_status(error: VaultError) -> tonic_types::pb::Status {
    let status = to_status(error);
    // `Status::with_error_details` encodes a google.rpc.Status with the same code and
    // message into the details; decode it so the item has the details too.
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

impl VaultService {
    pub(super) async fn batch_get(
        &self,
        request: Request<proto::BatchGetRecordsRequest>,
    ) -> Result<Response<proto::BatchGetRecordsResponse>, Status> {
        let ctx = self.context(&request, "BatchGetRecords").await?;
        let request = request.into_inner();
        let results = self
            .vault
            .batch_get_records(
                &ctx,
                &request.record_ids,
                &request.purpose,
                &request.justification,
                &request.fields,
            )
            .await
            .map_err(to_status)?;
        let results = results
            .into_iter()
            .map(|result| {
                use proto::batch_get_record_result::Result as Item;
                let item = match result {
                    Ok(release) => {
                        crate::telemetry::metrics::record_release(
                            &request.purpose,
                            release
                                .fields
                                .iter()
                                .map(|(_, released)| released.level.as_str()),
                        );
                        Item::Record(release_message(release))
                    }
                    Err(error) => Item::Error(item_status(error)),
                };
                proto::BatchGetRecordResult { result: Some(item) }
            })
            .collect();
        Ok(Response::new(proto::BatchGetRecordsResponse { results }))
    }

    pub(super) async fn batch_create(
        &self,
        request: Request<proto::BatchCreateRecordsRequest>,
    ) -> Result<Response<proto::BatchCreateRecordsResponse>, Status> {
        let ctx = self.context(&request, "BatchCreateRecords").await?;
        let items = request
            .into_inner()
            .requests
            .into_iter()
            .map(|item| CreateItem {
                input: identity_input(item.identity.unwrap_or_default()),
                request_id: non_empty(item.request_id),
                policy_version: non_empty(item.policy_version),
                retention_days: (item.retention_days != 0).then_some(item.retention_days),
            })
            .collect();
        let results = self
            .vault
            .batch_create_records(&ctx, items)
            .await
            .map_err(to_status)?;
        let results = results
            .into_iter()
            .map(|result| {
                use proto::batch_create_record_result::Result as Item;
                let item = match result {
                    Ok(meta) => Item::Record(record_message(&self.vault, meta)),
                    Err(error) => Item::Error(item_status(error)),
                };
                proto::BatchCreateRecordResult { result: Some(item) }
            })
            .collect();
        Ok(Response::new(proto::BatchCreateRecordsResponse { results }))
    }

    pub(super) async fn export(
        &self,
        request: Request<proto::ExportRecordsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let ctx = self.context(&request, "ExportRecords").await?;
        let request = request.into_inner();
        let request = ExportRequest {
            purpose: request.purpose,
            justification: request.justification,
            resume_cursor: request.resume_cursor,
        };
        let export = self
            .vault
            .prepare_export(&ctx, &request)
            .await
            .map_err(to_status)?;
        let (sink, items) = mpsc::channel(EXPORT_BUFFER);
        let vault = self.vault.clone();
        // The export outlives this handler (it streams after the response headers); the
        // receiver dropping (the client went away, or shutdown closed the connection) ends
        // it at its next row. A task of the vault's, so shutdown waits for it.
        self.vault
            .tasks()
            .spawn(async move { vault.run_export(&ctx, export, sink).await });
        let stream = ReceiverStream::new(items).map(|item| {
            use proto::export_records_response::Item as Message;
            match item {
                Ok(ExportItem::Row {
                    row_key,
                    fields,
                    cursor,
                }) => Ok(proto::ExportRecordsResponse {
                    item: Some(Message::Row(proto::ExportedRow {
                        row_key,
                        fields: fields
                            .into_iter()
                            .map(|(field, released)| {
                                (
                                    field.as_str().to_owned(),
                                    proto::ReleasedField {
                                        value: released.value,
                                        level: release_level(released.level) as i32,
                                    },
                                )
                            })
                            .collect(),
                    })),
                    cursor,
                }),
                Ok(ExportItem::Summary { summary, cursor }) => Ok(proto::ExportRecordsResponse {
                    item: Some(Message::Summary(proto::ExportSummary {
                        rows_exported: summary.rows_exported,
                        rows_suppressed: summary.rows_suppressed,
                        k_anonymity: summary.k,
                    })),
                    cursor,
                }),
                Err(error) => Err(to_status(error)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
