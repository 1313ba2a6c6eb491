//! What both backends do that is not SQL, written once: how rows decode into the store's
//! types ([`Columns`] is the one thing each driver implements), how audit events are linked
//! into their chain before they are written, the order of a create's checks and what an
//! idempotency key's replay means, and how a write that changed no row is explained.
//!
//! The backends (`sqlite/`, `postgres/`) hold the SQL and the transactions; they call in
//! here for every decision, so the two cannot drift apart.

use crate::domain::Violation;
use crate::domain::audit_chain::{
    AuditEvent, ChainHead, Checkpoint, CheckpointLink, ExpiryMarker, StoredEvent,
};
use crate::domain::ids::{AccountEventId, ConsentId, JobId, RecordId};

use super::field_set;
use super::{
    AccountEventRow, AccountState, CreateRequestKey, InsertOutcome, KeyVersionRow, LookupMatch,
    NewRecord, RecordIndexes, RecordMeta, RewrapJobRow, SealedField, StoreError, StoredRecord,
};

/// Column access by name or position, the only thing a driver's row type must provide for
/// decoding.
pub(crate) trait Columns {
    fn i64(&self, column: impl Column) -> Result<i64, StoreError>;
    fn opt_i64(&self, column: impl Column) -> Result<Option<i64>, StoreError>;
    fn text(&self, column: impl Column) -> Result<String, StoreError>;
    fn opt_text(&self, column: impl Column) -> Result<Option<String>, StoreError>;
    fn bytes(&self, column: impl Column) -> Result<Vec<u8>, StoreError>;
    fn opt_bytes(&self, column: impl Column) -> Result<Option<Vec<u8>>, StoreError>;

    /// A record id column: a value of another shape is a corrupt row, never a panic.
    fn record_id(&self, column: impl Column) -> Result<RecordId, StoreError> {
        stored_id(column.name(), &self.text(column)?, RecordId::parse)
    }

    fn job_id(&self, column: impl Column) -> Result<JobId, StoreError> {
        stored_id(column.name(), &self.text(column)?, JobId::parse)
    }
}

/// Which column of a row: a name (`&str`, looked up in the statement's columns on each
/// access), or an [`At`] (a position the statement fixes, for the rows read in bulk).
pub(crate) trait Column: Copy {
    fn name(&self) -> &str;
    fn position(&self) -> Option<usize>;
}

impl Column for &str {
    fn name(&self) -> &str {
        self
    }
    fn position(&self) -> Option<usize> {
        None
    }
}

/// A column by position, with its name (for errors, and for the drivers' debug check that
/// the statement has that column there).
#[derive(Debug, Clone, Copy)]
pub(crate) struct At(pub usize, pub &'static str);

impl Column for At {
    fn name(&self) -> &str {
        self.1
    }
    fn position(&self) -> Option<usize> {
        Some(self.0)
    }
}

/// The columns of a live record's statements (`queries::live_record_columns!`), in their
/// order: an export decodes a million such rows, and a lookup by name compares the
/// statement's column names each time.
mod record_at {
    use super::At;
    pub(super) const RECORD_ID: At = At(0, "record_id");
    pub(super) const VERSION: At = At(1, "version");
    pub(super) const CREATED_AT: At = At(2, "created_at");
    pub(super) const UPDATED_AT: At = At(3, "updated_at");
    pub(super) const WRAPPED_KEY: At = At(4, "wrapped_key");
    /// `queries::account_columns!`, after the record's own.
    pub(super) const ACCOUNT: [At; 6] = [
        At(5, "deleted_at"),
        At(6, "suspended_at"),
        At(7, "age_gate"),
        At(8, "index_version"),
        At(9, "policy_version"),
        At(10, "active_consents"),
    ];
    /// The sealed fields, one value (`store::field_set`).
    pub(super) const FIELDS: At = At(11, "fields");
}

/// Decodes an id column. The error names the column and the reason, not the value: a
/// corrupt row may hold anything, identity included.
pub(crate) fn stored_id<T>(
    column: &str,
    raw: &str,
    parse: fn(&str, &str) -> Result<T, Violation>,
) -> Result<T, StoreError> {
    parse(column, raw).map_err(|violation| {
        StoreError::Corrupt(format!("column {}: {}", violation.field, violation.reason))
    })
}

pub(crate) fn to_version(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("key version {value} out of range")))
}

/// The account-state columns (`queries::account_columns!`), by name.
pub(crate) fn account(row: &impl Columns) -> Result<AccountState, StoreError> {
    account_in(
        row,
        [
            "deleted_at",
            "suspended_at",
            "age_gate",
            "index_version",
            "policy_version",
            "active_consents",
        ],
    )
}

/// The account-state columns, found at `columns` (in `queries::account_columns!` order).
fn account_in(row: &impl Columns, columns: [impl Column; 6]) -> Result<AccountState, StoreError> {
    let [
        deleted,
        suspended,
        age_gate,
        index_version,
        policy_version,
        active_consents,
    ] = columns;
    Ok(AccountState {
        deleted: row.opt_i64(deleted)?.is_some(),
        suspended: row.opt_i64(suspended)?.is_some(),
        age_gate: row.opt_bytes(age_gate)?,
        index_version: to_version(row.i64(index_version)?)?,
        policy_version: row.opt_text(policy_version)?,
        active_consents: row.i64(active_consents)?,
    })
}

pub(crate) fn lookup_match(row: &impl Columns) -> Result<LookupMatch, StoreError> {
    Ok(LookupMatch {
        record_id: row.record_id("record_id")?,
        account: account(row)?,
    })
}

/// A live record from its one row (`queries::SELECT_LIVE_RECORD`, `select_live_records`,
/// `SCAN_LIVE_RECORDS`), with those of its sealed fields that `keep` accepts (and only
/// those named as present), decoded by position (`record_at`).
pub(crate) fn live_record(
    row: &impl Columns,
    keep: impl FnMut(&str) -> bool,
) -> Result<StoredRecord, StoreError> {
    let record_id = row.record_id(record_at::RECORD_ID)?;
    let wrapped_key = row
        .opt_bytes(record_at::WRAPPED_KEY)?
        .ok_or_else(|| StoreError::Corrupt("live record without a wrapped key".into()))?;
    let fields = match row.opt_bytes(record_at::FIELDS)? {
        Some(encoded) => field_set::decode(&encoded, keep)?,
        None => Vec::new(),
    };
    Ok(StoredRecord {
        meta: RecordMeta {
            record_id,
            version: row.i64(record_at::VERSION)?,
            created_at: row.i64(record_at::CREATED_AT)?,
            updated_at: row.i64(record_at::UPDATED_AT)?,
            present_fields: fields.iter().map(|field| field.field.clone()).collect(),
        },
        wrapped_key,
        fields,
        account: account_in(row, record_at::ACCOUNT)?,
    })
}

/// Places the rows of `queries::select_live_records` (a row per live record, in no order)
/// in one slot per requested id, in request order (`None`: no live record).
pub(crate) struct RequestedRecords<'a> {
    ids: &'a [RecordId],
    slots: Vec<Option<StoredRecord>>,
    positions: std::collections::HashMap<&'a str, usize>,
}

impl<'a> RequestedRecords<'a> {
    pub(crate) fn new(ids: &'a [RecordId]) -> Self {
        RequestedRecords {
            ids,
            slots: ids.iter().map(|_| None).collect(),
            positions: ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), i))
                .collect(),
        }
    }

    pub(crate) fn push(&mut self, record: StoredRecord) -> Result<(), StoreError> {
        let Some(&i) = self.positions.get(record.meta.record_id.as_str()) else {
            return Err(StoreError::Corrupt(
                "a batch read returned a record it did not ask for".into(),
            ));
        };
        debug_assert_eq!(self.ids[i], record.meta.record_id);
        self.slots[i] = Some(record);
        Ok(())
    }

    pub(crate) fn finish(self) -> Vec<Option<StoredRecord>> {
        self.slots
    }
}

/// The records of an export page (`queries::SCAN_LIVE_RECORDS`), checked to come in
/// strictly increasing id order: the cursor a page hands out is its last id.
#[derive(Default)]
pub(crate) struct ScannedPage {
    records: Vec<StoredRecord>,
    /// The record the next sealed-field set may belong to.
    next: usize,
}

impl ScannedPage {
    pub(crate) fn push(&mut self, record: StoredRecord) -> Result<(), StoreError> {
        if self
            .records
            .last()
            .is_some_and(|last| last.meta.record_id.as_str() >= record.meta.record_id.as_str())
        {
            return Err(StoreError::Corrupt("scan out of record-id order".into()));
        }
        self.records.push(record);
        Ok(())
    }

    /// The last record's id: the end of the range whose sealed fields follow (SQLite).
    pub(crate) fn last(&self) -> Option<&RecordId> {
        self.records.last().map(|stored| &stored.meta.record_id)
    }

    /// The sealed-field set of `record_id`, from a range scan in id order after the page's
    /// records were pushed without theirs; sets of records not in the page (deleted, or
    /// created after the export's snapshot) are passed over. The id is compared, never
    /// kept, and the set is decoded from the row's bytes where they lie.
    pub(crate) fn fields(
        &mut self,
        record_id: &str,
        encoded: &[u8],
        keep: impl FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        while let Some(stored) = self.records.get_mut(self.next) {
            match stored.meta.record_id.as_str().cmp(record_id) {
                std::cmp::Ordering::Less => self.next += 1,
                std::cmp::Ordering::Greater => return Ok(()),
                std::cmp::Ordering::Equal => {
                    stored.fields = field_set::decode(encoded, keep)?;
                    stored.meta.present_fields =
                        stored.fields.iter().map(|f| f.field.clone()).collect();
                    self.next += 1;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Vec<StoredRecord> {
        self.records
    }
}

/// The sealed fields of a record among `wanted`, from `queries::SELECT_FIELDS`'s one
/// value (`None`: no row, no fields).
pub(crate) fn stored_fields(
    encoded: Option<Vec<u8>>,
    wanted: &[&str],
) -> Result<Vec<SealedField>, StoreError> {
    match encoded {
        Some(encoded) => field_set::decode(&encoded, |name| wanted.contains(&name)),
        None => Ok(Vec::new()),
    }
}

/// The fields a re-index computes blind indexes and the age gate from.
pub(crate) const INDEXED_FIELDS: [&str; 3] = ["id_number", "id_type", "phone"];

/// The names of a record's fields, from `queries::SELECT_FIELDS`'s one value.
pub(crate) fn stored_field_names(encoded: Option<Vec<u8>>) -> Result<Vec<String>, StoreError> {
    match encoded {
        Some(encoded) => field_set::names(&encoded),
        None => Ok(Vec::new()),
    }
}

pub(crate) fn account_event(row: &impl Columns) -> Result<AccountEventRow, StoreError> {
    Ok(AccountEventRow {
        event_id: stored_id("event_id", &row.text("event_id")?, AccountEventId::parse)?,
        record_id: row.record_id("record_id")?,
        occurred_at: row.i64("occurred_at")?,
        kind: row.text("kind")?,
        actor: row.text("actor")?,
        reason: row.opt_text("reason")?,
        note: row.opt_bytes("note")?,
        ticket: row.opt_text("ticket")?,
        consent_id: row
            .opt_text("consent_id")?
            .map(|raw| stored_id("consent_id", &raw, ConsentId::parse))
            .transpose()?,
    })
}

pub(crate) fn stored_event(row: &impl Columns) -> Result<StoredEvent, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("audit event {what}"));
    let record_ids = row.text("record_ids")?;
    let released = row.text("released")?;
    Ok(StoredEvent {
        event: AuditEvent {
            event_id: row.text("event_id")?,
            occurred_at: row.i64("occurred_at")?,
            chain_id: row.text("chain_id")?,
            caller: row.text("caller")?,
            peer: row.opt_text("peer")?,
            rpc: row.text("rpc")?,
            record_ids: serde_json::from_str(&record_ids).map_err(|_| corrupt("record_ids"))?,
            purpose: row.opt_text("purpose")?,
            justification: row.opt_text("justification")?,
            released: serde_json::from_str(&released).map_err(|_| corrupt("released"))?,
            outcome: row.text("outcome")?,
            reason: row.opt_text("reason")?,
            request_id: row.opt_text("request_id")?,
            trace_id: row.opt_text("trace_id")?,
        },
        seq: row.i64("seq")?,
        prev_hash: row.bytes("prev_hash")?,
        hash: row.bytes("hash")?,
    })
}

pub(crate) fn chain_head(row: &impl Columns) -> Result<ChainHead, StoreError> {
    Ok(ChainHead {
        chain_id: row.text("chain_id")?,
        seq: row.i64("head_seq")?,
        hash: row.bytes("head_hash")?,
    })
}

pub(crate) fn expiry_marker(row: &impl Columns) -> Result<ExpiryMarker, StoreError> {
    Ok(ExpiryMarker {
        chain_id: row.text("chain_id")?,
        up_to_seq: row.i64("up_to_seq")?,
        hash: row.bytes("hash")?,
        expired_at: row.i64("expired_at")?,
        signature: row.bytes("signature")?,
    })
}

/// A checkpoint row of either format. A format this build does not know is refused rather
/// than read as an older one.
pub(crate) fn checkpoint(row: &impl Columns) -> Result<Checkpoint, StoreError> {
    let id = row.i64("id")?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("checkpoint {id}: {what}"));
    let heads = row.text("heads")?;
    let link = match row.i64("format")? {
        1 => None,
        2 => Some(CheckpointLink {
            signer: row
                .opt_text("signer_id")?
                .ok_or_else(|| corrupt("format 2 without a signer"))?,
            counter: row
                .opt_i64("counter")?
                .ok_or_else(|| corrupt("format 2 without a counter"))?,
            key_id: row.opt_text("key_id")?.unwrap_or_default(),
            prev: row.opt_bytes("prev_hash")?.unwrap_or_default(),
            closed: match row.opt_text("closed")? {
                Some(text) => serde_json::from_str(&text).map_err(|_| corrupt("closed"))?,
                None => Vec::new(),
            },
        }),
        _ => return Err(corrupt("unknown format")),
    };
    Ok(Checkpoint {
        id,
        created_at: row.i64("created_at")?,
        heads: serde_json::from_str(&heads).map_err(|_| corrupt("heads"))?,
        signature: row.bytes("signature")?,
        link,
    })
}

/// A checkpoint as `queries::INSERT_CHECKPOINT` binds it.
pub(crate) struct CheckpointParams {
    pub created_at: i64,
    pub heads: String,
    pub signature: Vec<u8>,
    pub format: i32,
    pub signer: Option<String>,
    pub counter: Option<i64>,
    pub key_id: Option<String>,
    pub prev: Option<Vec<u8>>,
    pub closed: Option<String>,
}

impl CheckpointParams {
    pub(crate) fn of(checkpoint: &Checkpoint) -> Result<CheckpointParams, StoreError> {
        let link = checkpoint.link.as_ref();
        Ok(CheckpointParams {
            created_at: checkpoint.created_at,
            heads: serde_json::to_string(&checkpoint.heads).map_err(StoreError::Encode)?,
            signature: checkpoint.signature.clone(),
            format: i32::from(checkpoint.format()),
            signer: link.map(|link| link.signer.clone()),
            counter: link.map(|link| link.counter),
            key_id: link.map(|link| link.key_id.clone()),
            prev: link.map(|link| link.prev.clone()),
            closed: link
                .map(|link| serde_json::to_string(&link.closed))
                .transpose()
                .map_err(StoreError::Encode)?,
        })
    }
}

pub(crate) fn key_version(row: &impl Columns) -> Result<KeyVersionRow, StoreError> {
    Ok(KeyVersionRow {
        version: to_version(row.i64("version")?)?,
        state: row.text("state")?,
        provider: row.text("provider")?,
        created_at: row.i64("created_at")?,
        records: row.i64("records")?,
    })
}

pub(crate) fn rewrap_job(row: &impl Columns) -> Result<RewrapJobRow, StoreError> {
    Ok(RewrapJobRow {
        job_id: row.job_id("job_id")?,
        state: row.text("state")?,
        target_version: row.i64("target_version")?,
        target_index_version: row.opt_i64("target_index_version")?,
        started_at: row.i64("started_at")?,
        updated_at: row.i64("updated_at")?,
        rewrapped: row.i64("rewrapped")?,
        reindexed: row.i64("reindexed")?,
        failed: row.i64("failed")?,
        owner_instance: row.opt_text("owner_instance")?,
    })
}

/// One audit event as it is written: its place in the chain and every column's value.
pub(crate) struct EventRow {
    pub chain_id: String,
    pub seq: i64,
    pub event_id: String,
    pub occurred_at: i64,
    pub caller: String,
    pub peer: Option<String>,
    pub rpc: String,
    /// The one record the event is about, if it names exactly one.
    pub record_id: Option<String>,
    pub record_ids: String,
    pub purpose: Option<String>,
    pub justification: Option<String>,
    pub released: String,
    pub plaintext: i64,
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// Links `events` (all of one chain) after the chain's head: the head, once advanced by
/// `events.len()`, is at `head_seq` and was at `head_hash`. Returns the rows to write and
/// the new head hash. The one place both backends compute the chain.
pub(crate) fn link_events(
    events: &[AuditEvent],
    head_seq: i64,
    head_hash: &[u8],
) -> Result<(Vec<EventRow>, Vec<u8>), StoreError> {
    let Some(first) = events.first() else {
        return Ok((Vec::new(), head_hash.to_vec()));
    };
    if events.iter().any(|e| e.chain_id != first.chain_id) {
        return Err(StoreError::Corrupt(
            "one audit batch spans several chains".into(),
        ));
    }
    let first_seq = head_seq - events.len() as i64 + 1;
    let mut prev_hash = head_hash.to_vec();
    let mut rows = Vec::with_capacity(events.len());
    for (seq, event) in (first_seq..).zip(events) {
        let hash = crate::domain::audit_chain::link(event, seq, &prev_hash).to_vec();
        rows.push(EventRow {
            chain_id: event.chain_id.clone(),
            seq,
            event_id: event.event_id.clone(),
            occurred_at: event.occurred_at,
            caller: event.caller.clone(),
            peer: event.peer.clone(),
            rpc: event.rpc.clone(),
            record_id: event.subject().map(str::to_owned),
            record_ids: super::encode_json_list(&event.record_ids),
            purpose: event.purpose.clone(),
            justification: event.justification.clone(),
            released: super::encode_json_list(&event.released),
            plaintext: i64::from(event.released_plaintext()),
            outcome: event.outcome.clone(),
            reason: event.reason.clone(),
            request_id: event.request_id.clone(),
            trace_id: event.trace_id.clone(),
            prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
            hash,
        });
    }
    Ok((rows, prev_hash))
}

/// The (record id, chain, seq) rows of `audit_event_records`: one per record of every event
/// that names several (an event naming one keeps it in its own `record_id` column).
pub(crate) fn event_record_rows<'a>(
    events: &'a [AuditEvent],
    rows: &'a [EventRow],
) -> impl Iterator<Item = (&'a str, i64, &'a str, i64)> + 'a {
    events
        .iter()
        .zip(rows)
        .filter(|(event, _)| event.record_ids.len() > 1)
        .flat_map(|(event, row)| {
            event.record_ids.iter().map(move |record_id| {
                (
                    record_id.as_str(),
                    event.occurred_at,
                    event.chain_id.as_str(),
                    row.seq,
                )
            })
        })
}

/// Whether a write's index versions are still right, given the live index versions the
/// database holds now (the active one already checked): every live version must be one the
/// write computed for.
pub(crate) fn index_versions_refusal(indexes: &RecordIndexes, live: &[i64]) -> Option<StoreError> {
    let stale = live.iter().any(|version| {
        u32::try_from(*version).map_or(true, |v| !indexes.computed_for.contains(&v))
    });
    stale.then_some(StoreError::StaleIndexVersion(indexes.version))
}

/// What the create request row an earlier create left means for a new one with the same
/// key: `deleted_at` and `fingerprint` of its row, and its record's metadata when live.
pub(crate) fn replay(
    request: &CreateRequestKey,
    deleted_at: Option<i64>,
    fingerprint: Option<Vec<u8>>,
    meta: impl FnOnce() -> Option<RecordMeta>,
) -> Result<InsertOutcome, StoreError> {
    let (None, Some(fingerprint)) = (deleted_at, fingerprint) else {
        return Ok(InsertOutcome::ReplayedDeleted);
    };
    let same_request = std::iter::once(&request.fingerprint)
        .chain(&request.fingerprint_elsewhere)
        .any(|candidate| {
            subtle::ConstantTimeEq::ct_eq(fingerprint.as_slice(), candidate.as_slice()).into()
        });
    let meta = meta().ok_or(StoreError::NotFound)?;
    Ok(InsertOutcome::Replayed { meta, same_request })
}

/// The two steps of a create a backend provides; [`create`] orders them.
pub(crate) trait CreateSteps {
    /// The outcome an earlier create with this request key decides, if there was one.
    async fn replayed(
        &self,
        request: &CreateRequestKey,
    ) -> Result<Option<InsertOutcome>, StoreError>;

    /// Writes the record in one transaction with its checks (KEK version active, index
    /// versions current, document not held elsewhere), its request key and its audit
    /// event; a refusal (`StaleKeyVersion`, `StaleIndexVersion`, `DuplicateDocument`) wrote
    /// nothing.
    async fn insert(
        &self,
        record: NewRecord,
        request: Option<CreateRequestKey>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;
}

/// A create: a replay answers from the first attempt; otherwise the record is written, and
/// a duplicate document that turns out to be this request's own earlier attempt (a
/// concurrent retry that won, or a first attempt indexed under another index version) is a
/// replay, not a duplicate.
pub(crate) async fn create(
    steps: &impl CreateSteps,
    record: NewRecord,
    request: Option<CreateRequestKey>,
    audit: &AuditEvent,
) -> Result<InsertOutcome, StoreError> {
    if let Some(request) = &request
        && let Some(outcome) = steps.replayed(request).await?
    {
        return Ok(outcome);
    }
    let meta = inserted_meta(&record);
    match steps.insert(record, request.clone(), audit.clone()).await {
        Ok(()) => Ok(InsertOutcome::Inserted(meta)),
        Err(StoreError::DuplicateDocument) => {
            if let Some(request) = &request
                && let Some(outcome) = steps.replayed(request).await?
            {
                return Ok(outcome);
            }
            Err(StoreError::DuplicateDocument)
        }
        Err(refused) => Err(refused),
    }
}

/// A batch create's one audit event: `audit` naming the records its items inserted, in item
/// order (replays and refusals wrote nothing new: a refusal has its own event, written by
/// the vault); `None` when no item inserted one.
pub(crate) fn batch_event(
    mut audit: AuditEvent,
    outcomes: &[Result<InsertOutcome, StoreError>],
) -> Option<AuditEvent> {
    audit.record_ids = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            Ok(InsertOutcome::Inserted(meta)) => Some(meta.record_id.to_string()),
            _ => None,
        })
        .collect();
    (!audit.record_ids.is_empty()).then_some(audit)
}

/// The metadata a create answers with once `record` is written.
pub(crate) fn inserted_meta(record: &NewRecord) -> RecordMeta {
    RecordMeta {
        record_id: record.record_id.clone(),
        version: 1,
        created_at: record.created_at,
        updated_at: record.created_at,
        present_fields: super::present_fields(&record.fields),
    }
}

/// Why a conditional update (of fields, or a re-key) changed no row, from the record's
/// account state read in the same transaction.
pub(crate) fn update_refusal(state: Option<AccountState>, override_suspension: bool) -> StoreError {
    match state {
        None => StoreError::NotFound,
        Some(state) if state.deleted => StoreError::NotFound,
        Some(state) if state.suspended && !override_suspension => StoreError::Suspended,
        Some(_) => StoreError::VersionConflict,
    }
}

/// Why a delete changed no row.
pub(crate) fn delete_refusal(state: Option<AccountState>) -> StoreError {
    match state {
        Some(state) if !state.deleted && state.suspended => StoreError::Suspended,
        _ => StoreError::NotFound,
    }
}

/// What a suspension or reinstatement that changed no row means: it already was so (`false`),
/// or there is no live record.
pub(crate) fn unchanged_suspension(state: Option<AccountState>) -> Result<bool, StoreError> {
    match state {
        Some(state) if !state.deleted => Ok(false),
        _ => Err(StoreError::NotFound),
    }
}

/// What a re-key that changed no row means.
pub(crate) fn rekey_refusal(state: Option<AccountState>) -> StoreError {
    match state {
        Some(state) if !state.deleted => StoreError::VersionConflict,
        _ => StoreError::NotFound,
    }
}

/// The history entries of a revocation: one per revoked consent, each with an id of its own
/// (`history`'s is the first's). Before, they were `<event_id>_<n>`; those still decode.
pub(crate) fn revocation_entries(
    history: &AccountEventRow,
    revoked: &[ConsentId],
) -> Vec<AccountEventRow> {
    revoked
        .iter()
        .enumerate()
        .map(|(n, consent)| AccountEventRow {
            event_id: if n == 0 {
                history.event_id.clone()
            } else {
                AccountEventId::generate()
            },
            consent_id: Some(consent.clone()),
            ..history.clone()
        })
        .collect()
}

/// A revocation's audit event names the record whose consents were revoked.
pub(crate) fn revocation_event(audit: &AuditEvent, record_id: &RecordId) -> AuditEvent {
    let mut audit = audit.clone();
    audit.record_ids = vec![record_id.to_string()];
    audit
}

/// Whether a re-key moved every ciphertext bound to the record: each re-sealed one replaced
/// (`moved`), and none there that it did not re-seal (`bound`, counted after).
pub(crate) fn rekey_complete(rekey: &super::RecordRekey, moved: u64, bound: i64) -> bool {
    let expected = (rekey.resealed.notes.len() + rekey.resealed.guardians.len()) as i64;
    moved as i64 == expected && bound == expected
}

/// The metadata a successful field update or re-key leaves.
pub(crate) fn meta_after(
    record_id: RecordId,
    expected_version: i64,
    created_at: i64,
    updated_at: i64,
    fields: &[SealedField],
) -> RecordMeta {
    RecordMeta {
        record_id,
        version: expected_version + 1,
        created_at,
        updated_at,
        present_fields: super::present_fields(fields),
    }
}

/// Which count says how many live records a key version still serves.
pub(crate) fn count_under(kind: &str) -> &'static str {
    if kind == "index" {
        super::queries::COUNT_UNDER_INDEX_VERSION
    } else {
        super::queries::COUNT_UNDER_KEK_VERSION
    }
}
