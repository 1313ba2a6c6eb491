//! Batch calls: `BatchGetRecords` and `BatchCreateRecords`, many records per call.
//!
//! What a batch saves is per-call work, never a check: the caller, the RPC grant and the
//! purpose are judged once (a refusal there refuses the whole call, audited once), then
//! every record goes through exactly the gates and the audit a single call would give it.
//!
//! - A batch read audits its releases as ONE event naming every released record (each
//!   person's trail shows it through the event's record ids; its released levels are those
//!   any of them got) and every per-record refusal as an event of its own with its reason,
//!   and hands them all to the audit writer as one job
//!   ([`crate::audit::AuditLog::record_all`]): they share one group commit, and nothing is
//!   answered before it. One event rather than one per record is what makes a batch cheaper
//!   than single reads: a read's cost is mostly its audit event (BENCHMARKS.md). If the
//!   releases' event fails, every release of the call becomes `AUDIT_UNAVAILABLE`.
//! - A batch create runs every item through the single create (`records.rs`), concurrently:
//!   each item is its own transaction with its own event, exactly as `CreateRecord`, and the
//!   SQLite writer group-commits what is queued together. Items are independent; an item
//!   that repeats an earlier item's document or request id waits until that item settled,
//!   so "the first wins" (the second is `DUPLICATE_IDENTITY`, or a replay of the same
//!   request) is decided by the database, as between two calls.

use std::collections::{BTreeSet, HashSet};

use futures_util::future::join_all;
use zeroize::Zeroizing;

use crate::domain::{FieldName, IdDocument, IdentityInput, Violation};
use crate::edge::{MAX_JUSTIFICATION_BYTES, RecordId, audit_record_id};
use crate::policy::{Purpose, Rpc};
use crate::store::RecordMeta;

use super::decisions::{AuditSubject, may_keep_text, refusal_reason};
use super::records::{read_strings, requested_fields};
use super::{CallContext, Release, Vault, VaultError, violation};

/// One item of a batch create, as the gRPC layer decoded it (enum decoding can fail there).
pub struct CreateItem {
    pub input: Result<IdentityInput, Vec<Violation>>,
    pub request_id: Option<String>,
    pub policy_version: Option<String>,
    pub retention_days: Option<u32>,
}

impl Vault {
    /// Releases each of `record_ids` under `purpose`: one result per id, in order. `Err` of
    /// the whole call: the call-level checks (input shape, RPC grant, purpose).
    pub async fn batch_get_records(
        &self,
        ctx: &CallContext,
        record_ids: &[String],
        purpose: &str,
        justification: &str,
        requested: &[String],
    ) -> Result<Vec<Result<Release, VaultError>>, VaultError> {
        let rpc = Rpc::BatchGetRecords;
        let subject = record_ids
            .iter()
            .take(self.max_batch_size())
            .fold(AuditSubject::new(rpc.as_str()), |subject, id| {
                subject.record(id)
            })
            .purpose(&ctx.policy, purpose)
            .text(justification, MAX_JUSTIFICATION_BYTES);
        let checked = (|| {
            let justification = read_strings(purpose, justification)?;
            let wanted = requested_fields(requested)?;
            self.check_batch_size("record_ids", record_ids.len())?;
            let mut seen = HashSet::with_capacity(record_ids.len());
            if let Some(i) = record_ids.iter().position(|id| !seen.insert(id.as_str())) {
                return Err(violation(
                    &format!("record_ids[{i}]"),
                    "repeats an earlier id of the request",
                ));
            }
            self.authorize(ctx, rpc)?;
            let purpose = self.granted_purpose(ctx, purpose, &justification)?;
            Ok((purpose, justification, wanted))
        })();
        let (purpose, justification, wanted) = self.audited(ctx, subject, checked).await?;
        let released = join_all(
            record_ids
                .iter()
                .enumerate()
                .map(|(i, raw)| self.release_item(i, raw, purpose, wanted.as_ref())),
        )
        .await;
        // One event for every release of the call (naming each released record, so each
        // person's trail shows it), and one per refused record with its own reason.
        let released_ids: Vec<String> = released
            .iter()
            .filter_map(|result| result.as_ref().ok())
            .map(|release| release.record_id.clone())
            .collect();
        let mut events = Vec::with_capacity(1 + record_ids.len() - released_ids.len());
        if !released_ids.is_empty() {
            let mut event = self.event(ctx, rpc.as_str(), released_ids, "OK", None);
            event.purpose = Some(purpose.name.clone());
            event.justification = justification.non_empty();
            event.released = release_levels(released.iter().filter_map(|r| r.as_ref().ok()));
            events.push(event);
        }
        for (raw, result) in record_ids.iter().zip(&released) {
            if let Err(error) = result {
                let (outcome, reason) = refusal_reason(error);
                let mut event = self.event(
                    ctx,
                    rpc.as_str(),
                    vec![audit_record_id(raw)],
                    outcome,
                    Some(reason),
                );
                event.purpose = Some(purpose.name.clone());
                event.justification = justification.non_empty().filter(|_| may_keep_text(error));
                events.push(event);
            }
        }
        let mut committed = self.audit.record_all(events).await.into_iter();
        let releases_committed = if released.iter().any(Result::is_ok) {
            committed
                .next()
                .unwrap_or(Err(crate::audit::AuditError::Stopped))
        } else {
            Ok(())
        };
        if let Err(error) = &releases_committed {
            tracing::error!(%error, "audit write failed; refusing to answer");
        }
        Ok(released
            .into_iter()
            .map(|result| match result {
                Ok(release) if releases_committed.is_ok() => Ok(release),
                Ok(_) => Err(VaultError::AuditUnavailable),
                Err(refused) => {
                    if let Some(Err(error)) = committed.next() {
                        tracing::error!(%error, rpc = rpc.as_str(), "could not audit a refused record");
                    }
                    Err(refused)
                }
            })
            .collect())
    }

    async fn release_item(
        &self,
        index: usize,
        raw: &str,
        purpose: &Purpose,
        wanted: Option<&BTreeSet<FieldName>>,
    ) -> Result<Release, VaultError> {
        let record_id = RecordId::parse(&format!("record_ids[{index}]"), raw)?;
        self.open_release(record_id.as_str(), purpose, wanted).await
    }

    /// Creates each item, independently: one result per item, in order. `Err` of the whole
    /// call: no items, too many, or the RPC not granted.
    pub async fn batch_create_records(
        &self,
        ctx: &CallContext,
        items: Vec<CreateItem>,
    ) -> Result<Vec<Result<RecordMeta, VaultError>>, VaultError> {
        let rpc = Rpc::BatchCreateRecords;
        let checked = self
            .check_batch_size("requests", items.len())
            .and_then(|()| self.authorize(ctx, rpc));
        self.audited(ctx, AuditSubject::new(rpc.as_str()), checked)
            .await?;
        let later = self.collisions(&items);
        let mut results: Vec<Option<Result<RecordMeta, VaultError>>> =
            items.iter().map(|_| None).collect();
        let mut deferred = Vec::new();
        let mut first = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            if later.contains(&i) {
                deferred.push((i, item));
            } else {
                first.push((i, item));
            }
        }
        let settled = join_all(
            first
                .into_iter()
                .map(|(i, item)| async move { (i, self.create_item(ctx, i, item).await) }),
        )
        .await;
        for (i, result) in settled {
            results[i] = Some(result);
        }
        // Each repeats an earlier item: it runs once that one has settled, in request order.
        for (i, item) in deferred {
            results[i] = Some(self.create_item(ctx, i, item).await);
        }
        Ok(results
            .into_iter()
            .map(|result| result.unwrap_or(Err(VaultError::Internal("batch item lost".into()))))
            .collect())
    }

    async fn create_item(
        &self,
        ctx: &CallContext,
        index: usize,
        item: CreateItem,
    ) -> Result<RecordMeta, VaultError> {
        let result = match item.input {
            Ok(input) => {
                self.insert(
                    ctx,
                    Rpc::BatchCreateRecords,
                    input,
                    item.request_id,
                    item.policy_version,
                    item.retention_days,
                )
                .await
            }
            Err(violations) => Err(VaultError::InvalidArgument(violations)),
        }
        .map_err(|error| item_error(index, error));
        self.audited(
            ctx,
            AuditSubject::new(Rpc::BatchCreateRecords.as_str()),
            result,
        )
        .await
    }

    /// The items that repeat the document or the request id of an earlier item.
    fn collisions(&self, items: &[CreateItem]) -> HashSet<usize> {
        let today = self.today();
        // At most `limits.max_batch_size` documents: a list is enough, and it wipes itself.
        let mut documents: Vec<Zeroizing<String>> = Vec::new();
        let mut request_ids: HashSet<&str> = HashSet::new();
        let mut later = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let document = item.input.as_ref().ok().and_then(|input| {
                let id_type = input.id_type?;
                let number = input.id_number.as_deref()?;
                let document = IdDocument::parse(id_type, number, today).ok()?;
                Some(Zeroizing::new(format!(
                    "{}\u{0}{}",
                    document.id_type().as_str(),
                    document.number()
                )))
            });
            let repeats_document = document.is_some_and(|key| {
                let seen = documents.contains(&key);
                documents.push(key);
                seen
            });
            let repeats_request = item
                .request_id
                .as_deref()
                .is_some_and(|id| !request_ids.insert(id));
            if repeats_document || repeats_request {
                later.insert(i);
            }
        }
        later
    }

    fn check_batch_size(&self, field: &str, len: usize) -> Result<(), VaultError> {
        let max = self.max_batch_size();
        if len == 0 {
            Err(violation(field, "must name at least one item"))
        } else if len > max {
            Err(violation(
                field,
                &format!("must name at most {max} items (limits.max_batch_size)"),
            ))
        } else {
            Ok(())
        }
    }
}

/// The (field, level) pairs released to at least one of `releases`, in field order: the
/// batch's event names every released record, and lists what any of them released (never
/// less than any one person got).
fn release_levels<'r>(releases: impl Iterator<Item = &'r Release>) -> Vec<(String, String)> {
    let levels: BTreeSet<(FieldName, &'static str)> = releases
        .flat_map(|release| {
            release
                .fields
                .iter()
                .map(|(field, value)| (*field, value.level.as_str()))
        })
        .collect();
    levels
        .into_iter()
        .map(|(field, level)| (field.as_str().to_owned(), level.to_owned()))
        .collect()
}

/// An item's input error, with its fields named as the batch request names them
/// (`requests[3].identity.id_number`, `requests[3].request_id`).
fn item_error(index: usize, error: VaultError) -> VaultError {
    match error {
        VaultError::InvalidArgument(violations) => VaultError::InvalidArgument(
            violations
                .into_iter()
                .map(|v| Violation {
                    field: if FieldName::parse(&v.field).is_some() || v.field == "identity" {
                        let path = v.field.strip_prefix("identity").unwrap_or(&v.field);
                        if path.is_empty() {
                            format!("requests[{index}].identity")
                        } else {
                            format!("requests[{index}].identity.{path}")
                        }
                    } else {
                        format!("requests[{index}].{}", v.field)
                    },
                    reason: v.reason,
                })
                .collect(),
        ),
        other => other,
    }
}
