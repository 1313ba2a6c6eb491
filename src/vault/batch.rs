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
//! - A batch create checks and seals every item as the single create does (`records.rs`),
//!   then hands them all to the store as ONE transaction (one commit;
//!   [`crate::store::Store::insert_records`]): the items in request order, then ONE audit
//!   event naming every record the batch created (each person's trail shows it, as for a
//!   batch read), in the same commit; refused items are audited each with its reason, as a
//!   refused single create. Items are independent: a refused item (bad input, duplicate
//!   document) writes nothing and the others commit; an item that repeats an earlier item's document
//!   or request id meets that item's row in the same transaction, so "the first wins" (the
//!   second is `DUPLICATE_IDENTITY`, or a replay of the same request) is decided by the
//!   database, as between two calls. Items refused because another instance rotated a key
//!   are written again, together, after learning the new version (a second commit, as a
//!   single create retries). If the commit fails, no item was written and each says so.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use futures_util::future::join_all;

use crate::domain::edge::{MAX_JUSTIFICATION_BYTES, RecordId, audit_record_id};
use crate::domain::{FieldName, IdentityInput, Violation};
use crate::policy::{Purpose, ReleaseLevel, Rpc};
use crate::store::{RecordMeta, StoreError};

use super::decisions::{AuditSubject, may_keep_text, refusal_reason};
use super::records::{SealedCreate, created, read_strings, requested_fields};
use super::{CallContext, KEY_REFRESH_ATTEMPTS, Release, Vault, VaultError, violation};

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
        let released = self.release_all(record_ids, purpose, wanted.as_ref()).await;
        // One event for every release of the call (naming each released record, so each
        // person's trail shows it), and one per refused record with its own reason.
        let released_ids: Vec<String> = released
            .iter()
            .filter_map(|result| result.as_ref().ok())
            .map(|release| release.record_id.to_string())
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

    /// Each id's release, in order: the well-formed ids' records read by one store call
    /// (one statement), then each through the gates of a single read.
    async fn release_all(
        &self,
        record_ids: &[String],
        purpose: &Purpose,
        wanted: Option<&BTreeSet<FieldName>>,
    ) -> Vec<Result<Release, VaultError>> {
        let parsed: Vec<Result<RecordId, VaultError>> = record_ids
            .iter()
            .enumerate()
            .map(|(i, raw)| Ok(RecordId::parse(&format!("record_ids[{i}]"), raw)?))
            .collect();
        let valid: Vec<RecordId> = parsed
            .iter()
            .filter_map(|id| id.as_ref().ok())
            .cloned()
            .collect();
        // Only the fields a release could open: the purpose releases them and the call asks
        // for them (`release_stored` skips every other field).
        let fields: Vec<&'static str> = FieldName::ALL
            .iter()
            .filter(|field| purpose.level(**field) != ReleaseLevel::None)
            .filter(|field| wanted.is_none_or(|w| w.contains(field)))
            .map(|field| field.as_str())
            .collect();
        let mut stored = match self.store.get_records(&valid, &fields).await {
            Ok(stored) => stored.into_iter(),
            Err(error) => {
                // One read failed for every record of it alike: logged once, each well-formed
                // id answers that storage is unavailable.
                tracing::error!(%error, "a batch read's records could not be read");
                return parsed
                    .into_iter()
                    .map(|id| {
                        id.and_then(|_| {
                            Err(VaultError::Storage(StoreError::Unavailable(
                                "the batch's records could not be read".into(),
                            )))
                        })
                    })
                    .collect();
            }
        };
        let mut released = Vec::with_capacity(parsed.len());
        for id in parsed {
            released.push(match id {
                Ok(record_id) => {
                    let record = stored.next().flatten();
                    self.release_stored(&record_id, record, purpose, wanted)
                        .await
                }
                Err(error) => Err(error),
            });
        }
        released
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
        let mut results: Vec<Option<Result<RecordMeta, VaultError>>> =
            items.iter().map(|_| None).collect();
        let mut pending = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let sealed = item
                .input
                .map_err(VaultError::InvalidArgument)
                .and_then(|input| {
                    self.seal_create(
                        ctx,
                        rpc,
                        input,
                        item.request_id,
                        item.policy_version,
                        item.retention_days,
                    )
                });
            match sealed {
                Ok(create) => pending.push((i, create)),
                Err(error) => results[i] = Some(Err(error)),
            }
        }
        self.write_batch(ctx, pending, &mut results).await;
        let answered = join_all(results.into_iter().enumerate().map(|(i, result)| {
            let result = result
                .unwrap_or(Err(VaultError::Internal("batch item lost")))
                .map_err(|error| item_error(i, error));
            self.audited(ctx, AuditSubject::new(rpc.as_str()), result)
        }))
        .await;
        Ok(answered)
    }

    /// Writes the sealed items in one store transaction (one commit). Items refused because
    /// another instance rotated a key meanwhile are written again, together, after learning
    /// the new version: at most `KEY_REFRESH_ATTEMPTS` writes in all, as a single create.
    async fn write_batch(
        &self,
        ctx: &CallContext,
        mut pending: Vec<(usize, SealedCreate)>,
        results: &mut [Option<Result<RecordMeta, VaultError>>],
    ) {
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            let mut writes = Vec::with_capacity(pending.len());
            let mut written = Vec::with_capacity(pending.len());
            for (i, create) in pending.drain(..) {
                match self.store_form(ctx, &create) {
                    Ok(write) => {
                        writes.push(write);
                        written.push((i, create));
                    }
                    Err(error) => results[i] = Some(Err(error)),
                }
            }
            if writes.is_empty() {
                return;
            }
            // One event for the write's creates: the store names in it the records it
            // inserted (each person's trail shows it), in the same commit.
            let audit = self.event(
                ctx,
                Rpc::BatchCreateRecords.as_str(),
                Vec::new(),
                "OK",
                None,
            );
            let outcomes = match self.store.insert_records(writes, audit).await {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    // Nothing of the batch was written: every item it carried fails alike.
                    tracing::error!(%error, "a batch create did not commit");
                    let shared = match error {
                        StoreError::CommitFailed(shared) => shared,
                        other => Arc::new(other),
                    };
                    for (i, _) in written {
                        results[i] = Some(Err(VaultError::Storage(StoreError::CommitFailed(
                            Arc::clone(&shared),
                        ))));
                    }
                    return;
                }
            };
            let mut stale = Vec::new();
            for ((i, create), outcome) in written.into_iter().zip(outcomes) {
                match outcome {
                    Err(
                        error @ (StoreError::StaleKeyVersion(_) | StoreError::StaleIndexVersion(_)),
                    ) if attempts < KEY_REFRESH_ATTEMPTS => stale.push((i, create, error)),
                    outcome => {
                        results[i] = Some(outcome.map_err(VaultError::from).and_then(created));
                    }
                }
            }
            let mut refreshed = Vec::new();
            for (_, _, error) in &stale {
                if refreshed.contains(&std::mem::discriminant(error)) {
                    continue;
                }
                refreshed.push(std::mem::discriminant(error));
                if let Err(refresh) = self.refresh_stale(error).await {
                    // Without the new version a retry would be refused again: each stale
                    // item keeps the refusal it got.
                    tracing::error!(error = %refresh, "could not learn a rotated key's version");
                    for (i, _, error) in stale {
                        results[i] = Some(Err(VaultError::from(error)));
                    }
                    return;
                }
            }
            pending = stale
                .into_iter()
                .map(|(i, create, _)| (i, create))
                .collect();
        }
    }

    fn check_batch_size(&self, field: &str, len: usize) -> Result<(), VaultError> {
        let max = self.max_batch_size();
        if len == 0 {
            Err(violation(field, "must name at least one item"))
        } else if len > max {
            Err(Violation::bounded(
                field,
                "must name at most {limit} items (limits.max_batch_size)",
                max as u64,
            )
            .into())
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
                .map(|v| {
                    let field = if FieldName::parse(&v.field).is_some() || v.field == "identity" {
                        let path = v.field.strip_prefix("identity").unwrap_or(&v.field);
                        if path.is_empty() {
                            format!("requests[{index}].identity")
                        } else {
                            format!("requests[{index}].identity.{path}")
                        }
                    } else {
                        format!("requests[{index}].{}", v.field)
                    };
                    v.moved_to(field)
                })
                .collect(),
        ),
        other => other,
    }
}
