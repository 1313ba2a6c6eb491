//! `ExportRecords`: a k-anonymous data set for a purpose configured with `export = true`.
//!
//! An export purpose releases nothing an outsider could use to name a person directly
//! (pseudonyms, generalised values, and the coarse plain fields; `crate::policy` refuses
//! anything else at load). What is left to protect against is linkage on the released
//! quasi-identifiers, the values an outsider can hold too: the generalised birth date
//! (year), address (region), postal code (prefix) and ID number (division code), and the
//! plain gender and nationality. Every combination of them ("class") shared by fewer than k
//! rows is suppressed whole. Pseudonyms are not quasi-identifiers (nobody without the
//! vault's key can compute one), and `id_type` is not counted (see README, "Exports").
//!
//! Two passes over a keyset-paged scan of live records (`Store::scan_live_records`), so
//! memory does not grow with the rows streamed: the first counts rows per class (a map from a
//! 16-byte class digest to a count, the only state that grows, with the number of distinct
//! classes, at most the number of eligible records) and remembers, per eligible record, a
//! 64-bit digest of (record id, class) in scan order; the second recomputes each row, checks
//! that it is the row the first pass counted (any change in between: `EXPORT_CHANGED`, never
//! a row outside its class's count) and streams those of classes of at least k rows.
//!
//! A person's row leaves only after an audit event naming that record is committed: one event
//! per page of rows (the pages of the scan), each carrying the export's id, k and its counts,
//! so a small export is one event and every exported person's trail shows the export.
//!
//! Throughput (BENCHMARKS.md, "Issue 14 round"): the work is per record (unwrap its key, open
//! the released fields, generalise and pseudonymise, digest its class), so each page's
//! records are split over the blocking pool, one chunk per core; and the stages overlap, the
//! store reading the next page while this one is computed and the previous one's event
//! commits and its rows are sent. A page's rows still wait for their own event's commit.
//!
//! Resuming: every message carries a cursor, sealed (AES-GCM, or SM4-GCM in an SM4
//! deployment) under a key derived from the keyring and bound to the caller and the purpose:
//! the export's id, its snapshot instant (records created later are not part of it), the
//! index key version of its pseudonyms, k, a digest of the first pass (which records, in
//! which classes) and the last record id streamed. A resumed stream runs the first pass again
//! over the same snapshot and refuses (`EXPORT_CHANGED`) unless it finds the same digest, so
//! the suppression decisions of a resumed export are those of its start, and it continues
//! right after the last row the client got: no duplicates, no gaps. The cursor holds a record
//! id, which is why it is sealed: an export never hands out a record id.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::crypto::DataKey;
use crate::domain::FieldName;
use crate::domain::edge::{MAX_JUSTIFICATION_BYTES, check_text};
use crate::domain::ids::RecordId;
use crate::keys::{IndexKeyPair, KeyManager};
use crate::policy::{Policy, Purpose, ReleaseLevel, Rpc};
use crate::store::{Micros, StoredRecord};

use super::decisions::AuditSubject;
use super::records::{apply_level, read_strings};
use super::{CallContext, ReleasedValue, Vault, VaultError, violation};

/// Records per page of the scan, and so at most the rows of one audit event.
const PAGE: u32 = 500;
/// At most this many blocking-pool workers compute one page's rows (one per core, up to this).
const MAX_WORKERS: usize = 8;
/// Cursors this service issues are far shorter.
const MAX_CURSOR_BYTES: usize = 512;
/// Label of the cursor key derived from the keyring's audit key.
const CURSOR_KEY_LABEL: &[u8] = b"pdvault.export-cursor.v1";
const CURSOR_FORMAT: u8 = 1;
/// Field name of the row key's pseudonym: not an identity field, so no field's pseudonym
/// can equal a row key.
const ROW_KEY_FIELD: &str = "record";

/// The quasi-identifiers, at the level at which each counts: the values an outsider can
/// hold too.
const QUASI_IDENTIFIERS: [(FieldName, ReleaseLevel); 6] = [
    (FieldName::DateOfBirth, ReleaseLevel::Generalized),
    (FieldName::Address, ReleaseLevel::Generalized),
    (FieldName::PostalCode, ReleaseLevel::Generalized),
    (FieldName::IdNumber, ReleaseLevel::Generalized),
    (FieldName::Gender, ReleaseLevel::Plain),
    (FieldName::Nationality, ReleaseLevel::Plain),
];

/// What the caller asked for.
pub struct ExportRequest {
    pub purpose: String,
    pub justification: String,
    /// Empty: a new export.
    pub resume_cursor: String,
}

/// The counts of a whole export (over all its streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportSummary {
    pub rows_exported: u64,
    pub rows_suppressed: u64,
    pub k: u32,
}

/// One message of the stream, with the cursor that resumes after it.
pub enum ExportItem {
    Row {
        row_key: String,
        fields: Vec<(FieldName, ReleasedValue)>,
        cursor: String,
    },
    Summary {
        summary: ExportSummary,
        cursor: String,
    },
}

/// An export that passed the call's checks, ready to run.
pub struct ExportStream {
    purpose: String,
    justification: Option<String>,
    k: u32,
    state: CursorState,
    resumed: bool,
}

/// Seals and opens cursors.
pub(super) struct CursorKey(DataKey);

impl CursorKey {
    pub(super) fn new(keys: &KeyManager) -> CursorKey {
        CursorKey(DataKey::from_secret(
            keys.audit_signing().derive_key(CURSOR_KEY_LABEL),
            keys.index_suite(),
        ))
    }

    fn seal(&self, caller: &str, purpose: &str, state: &CursorState) -> Result<String, VaultError> {
        let sealed = self.0.seal_field(caller, purpose, &state.encode())?;
        Ok(data_encoding::BASE64URL_NOPAD.encode(&sealed))
    }

    /// Seals the cursors of a page's rows at once: one draw of their nonces from the OS
    /// instead of a system call per row.
    fn seal_all(
        &self,
        caller: &str,
        purpose: &str,
        states: &[Vec<u8>],
    ) -> Result<Vec<String>, VaultError> {
        let fields: Vec<(&str, &[u8])> = states
            .iter()
            .map(|state| (purpose, state.as_slice()))
            .collect();
        Ok(self
            .0
            .seal_fields(caller, &fields)?
            .iter()
            .map(|sealed| data_encoding::BASE64URL_NOPAD.encode(sealed))
            .collect())
    }

    fn open(&self, caller: &str, purpose: &str, cursor: &str) -> Option<CursorState> {
        let sealed = data_encoding::BASE64URL_NOPAD
            .decode(cursor.as_bytes())
            .ok()?;
        let opened = self.0.open_field(caller, purpose, &sealed).ok()?;
        CursorState::decode(&opened)
    }
}

/// What a cursor holds (sealed): the export's identity and snapshot, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CursorState {
    export_id: [u8; 16],
    as_of: Micros,
    index_version: u32,
    k: u32,
    /// Digest of the first pass: which records, in which classes.
    digest: [u8; 32],
    /// The last record streamed (or passed over); empty before the first.
    after: String,
}

impl CursorState {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(66 + self.after.len());
        out.push(CURSOR_FORMAT);
        out.extend_from_slice(&self.export_id);
        out.extend_from_slice(&self.as_of.to_be_bytes());
        out.extend_from_slice(&self.index_version.to_be_bytes());
        out.extend_from_slice(&self.k.to_be_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(self.after.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<CursorState> {
        let (&format, rest) = bytes.split_first()?;
        if format != CURSOR_FORMAT || rest.len() < 64 {
            return None;
        }
        let (export_id, rest) = rest.split_at(16);
        let (as_of, rest) = rest.split_at(8);
        let (index_version, rest) = rest.split_at(4);
        let (k, rest) = rest.split_at(4);
        let (digest, after) = rest.split_at(32);
        Some(CursorState {
            export_id: export_id.try_into().ok()?,
            as_of: i64::from_be_bytes(as_of.try_into().ok()?),
            index_version: u32::from_be_bytes(index_version.try_into().ok()?),
            k: u32::from_be_bytes(k.try_into().ok()?),
            digest: digest.try_into().ok()?,
            after: String::from_utf8(after.to_vec()).ok()?,
        })
    }

    fn export_label(&self) -> String {
        format!(
            "exp_{}",
            data_encoding::BASE32_NOPAD
                .encode(&self.export_id)
                .to_lowercase()
        )
    }
}

/// What the first pass learned.
struct Census {
    /// Rows per class.
    classes: HashMap<[u8; 16], u64>,
    /// Per eligible record in scan order: a digest of (record id, class).
    rows: Vec<u64>,
    /// Eligible records whose id sorts at or before the cursor's position.
    done: usize,
    digest: [u8; 32],
}

impl Census {
    fn summary(&self, k: u32) -> ExportSummary {
        let (mut exported, mut suppressed) = (0, 0);
        for &count in self.classes.values() {
            if count >= u64::from(k) {
                exported += count;
            } else {
                suppressed += count;
            }
        }
        ExportSummary {
            rows_exported: exported,
            rows_suppressed: suppressed,
            k,
        }
    }
}

/// One record as the export sees it: its row (fields at their levels), its class and its
/// row key (empty in the first pass, which sends nothing).
struct ExportRow {
    fields: Vec<(FieldName, ReleasedValue)>,
    class: [u8; 16],
    row_key: String,
}

/// A row that passed the census check and its class's k, waiting for its page's event.
struct CheckedRow {
    record_id: RecordId,
    row_key: String,
    fields: Vec<(FieldName, ReleasedValue)>,
}

/// What delivering any page of one export needs.
struct PageOf<'a> {
    ctx: &'a CallContext,
    export: &'a ExportStream,
    summary: ExportSummary,
    released: &'a [(String, String)],
    sink: &'a mpsc::Sender<Result<ExportItem, VaultError>>,
}

impl Vault {
    /// The call's checks: strings, the RPC grant, the purpose (granted, justified, an export
    /// purpose) and the cursor. A refusal here refuses the call, audited.
    pub async fn prepare_export(
        &self,
        ctx: &CallContext,
        request: &ExportRequest,
    ) -> Result<ExportStream, VaultError> {
        let rpc = Rpc::ExportRecords;
        let subject = AuditSubject::new(rpc.as_str())
            .purpose(&ctx.policy, &request.purpose)
            .text(&request.justification, MAX_JUSTIFICATION_BYTES);
        let result = (|| {
            let justification = read_strings(&request.purpose, &request.justification)?;
            check_text("resume_cursor", &request.resume_cursor, MAX_CURSOR_BYTES)?;
            self.authorize(ctx, rpc)?;
            let purpose = self.granted_purpose(ctx, &request.purpose, &justification)?;
            let k = purpose.export_k.ok_or(VaultError::ExportNotAllowed)?;
            let (state, resumed) = if request.resume_cursor.is_empty() {
                let mut export_id = [0u8; 16];
                getrandom::fill(&mut export_id)
                    .map_err(|_| VaultError::Crypto(crate::crypto::CryptoError::Random))?;
                let state = CursorState {
                    export_id,
                    as_of: self.now_micros(),
                    index_version: self.keys.active_index()?.0,
                    k,
                    digest: [0; 32],
                    after: String::new(),
                };
                (state, false)
            } else {
                let state = self
                    .export_cursors
                    .open(&ctx.caller.name, &purpose.name, &request.resume_cursor)
                    .ok_or_else(|| {
                        violation(
                            "resume_cursor",
                            "is not a cursor this service issued to this caller for this purpose",
                        )
                    })?;
                if state.k != k {
                    // Another k over the same data is the differencing the rule forbids.
                    return Err(VaultError::ExportChanged);
                }
                (state, true)
            };
            Ok(ExportStream {
                purpose: purpose.name.clone(),
                justification: justification.non_empty(),
                k,
                state,
                resumed,
            })
        })();
        self.audited(ctx, subject, result).await
    }

    /// Runs a prepared export, sending its messages to `sink` (bounded: a slow reader slows
    /// the scan, memory stays flat). Ends after the summary, on the first error (sent as the
    /// stream's last item), or when the receiver is gone.
    pub async fn run_export(
        self: &Arc<Self>,
        ctx: &CallContext,
        export: ExportStream,
        sink: mpsc::Sender<Result<ExportItem, VaultError>>,
    ) {
        if let Err(error) = self.export(ctx, export, &sink).await {
            let subject = AuditSubject::new(Rpc::ExportRecords.as_str());
            let error = self.audited(ctx, subject, Err::<(), _>(error)).await;
            if let Err(error) = error {
                let _ = sink.send(Err(error)).await;
            }
        }
    }

    /// The second pass, as a pipeline of three stages that run at once: page N+2 is read
    /// from the store while page N+1's rows are computed (on every core) and page N's audit
    /// event commits and its rows are sent. Each stage waits only for its own work, so the
    /// export runs at the pace of its slowest stage rather than of their sum; and a page's
    /// rows are sent only after its event is committed (within `deliver`), never before.
    async fn export(
        self: &Arc<Self>,
        ctx: &CallContext,
        export: ExportStream,
        sink: &mpsc::Sender<Result<ExportItem, VaultError>>,
    ) -> Result<(), VaultError> {
        let purpose = ctx
            .policy
            .purpose(&export.purpose)
            .ok_or(VaultError::PurposeNotGranted)?;
        let (index_version, index_keys) = self.keys.active_index()?;
        let mut state = export.state.clone();
        if index_version != state.index_version {
            // The pseudonyms would change in the middle of the data set.
            return Err(VaultError::ExportChanged);
        }
        let census = self
            .census(&ctx.policy, purpose, &index_keys, &state)
            .await?;
        if export.resumed && census.digest != state.digest {
            return Err(VaultError::ExportChanged);
        }
        state.digest = census.digest;
        let summary = census.summary(export.k);
        let released: Vec<(String, String)> = FieldName::ALL
            .iter()
            .filter(|field| purpose.level(**field) != ReleaseLevel::None)
            .map(|field| {
                (
                    field.as_str().to_owned(),
                    purpose.level(*field).as_str().to_owned(),
                )
            })
            .collect();
        let page = PageOf {
            ctx,
            export: &export,
            summary,
            released: &released,
            sink,
        };
        let as_of = state.as_of;
        let mut audited_once = false;
        let mut position = census.done;
        let mut after = resumed_after(&state.after)?;
        let fields = scanned_fields(purpose, true);
        let mut scanned = self
            .store
            .scan_live_records(after.as_ref(), as_of, PAGE, &fields)
            .await?;
        // Rows checked against the census, waiting for their page's event.
        let mut checked: Vec<CheckedRow> = Vec::new();
        loop {
            audited_once |= !checked.is_empty();
            let deliver = self.deliver(&page, &mut state, std::mem::take(&mut checked));
            let Some(last) = scanned.last().map(|stored| stored.meta.record_id.clone()) else {
                if !deliver.await? {
                    return Ok(());
                }
                break;
            };
            let compute = self.compute_page(
                &ctx.policy,
                &purpose.name,
                &index_keys,
                std::mem::take(&mut scanned),
                true,
            );
            let next = self
                .store
                .scan_live_records(Some(&last), as_of, PAGE, &fields);
            let (delivered, computed, next) = tokio::join!(deliver, compute, next);
            if !delivered? {
                // The client went away; its cursor says where it got to.
                return Ok(());
            }
            for (record_id, row) in computed? {
                let Some(row) = row else {
                    continue;
                };
                let expected = census.rows.get(position).copied();
                position += 1;
                if expected != Some(row_digest(record_id.as_str(), &row.class)) {
                    return Err(VaultError::ExportChanged);
                }
                if census.classes.get(&row.class).copied().unwrap_or(0) >= u64::from(export.k) {
                    checked.push(CheckedRow {
                        record_id,
                        row_key: row.row_key,
                        fields: row.fields,
                    });
                }
            }
            scanned = next?;
            after = Some(last);
        }
        if position != census.rows.len() {
            return Err(VaultError::ExportChanged);
        }
        if !audited_once {
            // An export that streams no row (everything suppressed, or resumed at its end)
            // is still a decision on the record.
            let event = self.export_event(ctx, &export, &state, summary, Vec::new(), released);
            self.commit_before_answer(event).await?;
        }
        state.after = after.map(RecordId::into_string).unwrap_or_default();
        let cursor = self
            .export_cursors
            .seal(&ctx.caller.name, &export.purpose, &state)?;
        let _ = sink.send(Ok(ExportItem::Summary { summary, cursor })).await;
        Ok(())
    }

    /// Commits the event naming a page's rows, then sends them, each with the cursor that
    /// resumes right after it. `false`: the client went away.
    async fn deliver(
        &self,
        page: &PageOf<'_>,
        state: &mut CursorState,
        rows: Vec<CheckedRow>,
    ) -> Result<bool, VaultError> {
        if rows.is_empty() {
            return Ok(true);
        }
        let event = self.export_event(
            page.ctx,
            page.export,
            state,
            page.summary,
            rows.iter()
                .map(|row| row.record_id.as_str().to_owned())
                .collect(),
            page.released.to_vec(),
        );
        self.commit_before_answer(event).await?;
        let states: Vec<Vec<u8>> = rows
            .iter()
            .map(|row| {
                state.after.clear();
                state.after.push_str(row.record_id.as_str());
                state.encode()
            })
            .collect();
        let cursors =
            self.export_cursors
                .seal_all(&page.ctx.caller.name, &page.export.purpose, &states)?;
        for (row, cursor) in rows.into_iter().zip(cursors) {
            let item = ExportItem::Row {
                row_key: row.row_key,
                fields: row.fields,
                cursor,
            };
            if page.sink.send(Ok(item)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The first pass: rows per class over the whole snapshot, and a digest of which records
    /// are in which class. Reading page N+1 overlaps computing page N.
    async fn census(
        self: &Arc<Self>,
        policy: &Arc<Policy>,
        purpose: &Purpose,
        index_keys: &Arc<IndexKeyPair>,
        state: &CursorState,
    ) -> Result<Census, VaultError> {
        let mut census = Census {
            classes: HashMap::new(),
            rows: Vec::new(),
            done: 0,
            digest: [0; 32],
        };
        let mut digest = Sha256::new();
        digest.update(b"pdvault.export-census.v1");
        let fields = scanned_fields(purpose, false);
        let mut scanned = self
            .store
            .scan_live_records(None, state.as_of, PAGE, &fields)
            .await?;
        while let Some(last) = scanned.last().map(|stored| stored.meta.record_id.clone()) {
            let compute = self.compute_page(
                policy,
                &purpose.name,
                index_keys,
                std::mem::take(&mut scanned),
                false,
            );
            let next = self
                .store
                .scan_live_records(Some(&last), state.as_of, PAGE, &fields);
            let (computed, next) = tokio::join!(compute, next);
            for (record_id, row) in computed? {
                let Some(row) = row else {
                    continue;
                };
                let record_id = record_id.as_str();
                *census.classes.entry(row.class).or_insert(0) += 1;
                census.rows.push(row_digest(record_id, &row.class));
                if !state.after.is_empty() && record_id <= state.after.as_str() {
                    census.done += 1;
                }
                digest.update((record_id.len() as u64).to_be_bytes());
                digest.update(record_id.as_bytes());
                digest.update(row.class);
            }
            scanned = next?;
        }
        census.digest = digest.finalize().into();
        Ok(census)
    }

    /// The rows of one scanned page, in scan order, computed on the blocking pool in one
    /// chunk per core: unwrapping a record's key, opening its fields and generalising or
    /// pseudonymising them is nearly all of an export's work, and needs nothing shared but
    /// read-only keys. The key versions' states are checked (re-read when stale) here, once
    /// per page, so the workers check the fresh cached states.
    async fn compute_page(
        self: &Arc<Self>,
        policy: &Arc<Policy>,
        purpose: &str,
        index_keys: &Arc<IndexKeyPair>,
        mut page: Vec<StoredRecord>,
        all_fields: bool,
    ) -> Result<Vec<(RecordId, Option<ExportRow>)>, VaultError> {
        let mut versions: Vec<u32> = Vec::new();
        for stored in &page {
            let version = KeyManager::version_of(&stored.wrapped_key)?;
            if !versions.contains(&version) {
                versions.push(version);
            }
        }
        for version in versions {
            self.keys.check_unwrappable(version).await?;
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .clamp(1, MAX_WORKERS);
        let chunk = page.len().div_ceil(workers).max(1);
        let mut handles = Vec::with_capacity(workers);
        while !page.is_empty() {
            let rest = page.split_off(chunk.min(page.len()));
            let records = std::mem::replace(&mut page, rest);
            let vault = Arc::clone(self);
            let policy = Arc::clone(policy);
            let purpose = purpose.to_owned();
            let index_keys = Arc::clone(index_keys);
            handles.push(tokio::task::spawn_blocking(move || {
                let purpose = policy
                    .purpose(&purpose)
                    .ok_or(VaultError::PurposeNotGranted)?;
                records
                    .into_iter()
                    .map(|stored| {
                        let row = vault.export_row(purpose, &index_keys, &stored, all_fields)?;
                        Ok((stored.meta.record_id, row))
                    })
                    .collect::<Result<Vec<_>, VaultError>>()
            }));
        }
        let mut computed = Vec::with_capacity(PAGE as usize);
        for handle in handles {
            let rows = handle
                .await
                .map_err(|_| VaultError::Internal("an export worker stopped"))??;
            computed.extend(rows);
        }
        Ok(computed)
    }

    /// A record's row and class, or `None` when the account's gates leave it out (a
    /// suspended account, a minor without consent: the gates of a read). `all_fields`:
    /// every released field and the row key (the second pass), or only the
    /// quasi-identifiers (the first). Only the fields the purpose releases are opened.
    /// Synchronous (a blocking-pool worker): the key states were checked by the caller.
    fn export_row(
        &self,
        purpose: &Purpose,
        index_keys: &IndexKeyPair,
        stored: &StoredRecord,
        all_fields: bool,
    ) -> Result<Option<ExportRow>, VaultError> {
        let record_id = &stored.meta.record_id;
        match self.check_release_allowed(record_id, purpose, &stored.account) {
            Ok(()) => {}
            Err(VaultError::AccountSuspended | VaultError::GuardianConsentRequired) => {
                return Ok(None);
            }
            Err(other) => return Err(other),
        }
        let dek = self
            .keys
            .unwrap_cached_state(&stored.wrapped_key, record_id.as_str())?;
        // Sized once: the scan brought only the fields this pass uses.
        let mut fields = Vec::with_capacity(if all_fields { stored.fields.len() } else { 0 });
        // The census keeps the quasi-identifiers' values; the second pass keeps where they
        // are among its released fields, so no value is copied.
        let mut quasi: [Option<String>; QUASI_IDENTIFIERS.len()] = Default::default();
        let mut quasi_at: [Option<usize>; QUASI_IDENTIFIERS.len()] = Default::default();
        for sealed in &stored.fields {
            let field = FieldName::parse(&sealed.field)
                .ok_or_else(|| VaultError::Internal("stored field has an unknown name"))?;
            let level = purpose.level(field);
            let slot = QUASI_IDENTIFIERS
                .iter()
                .position(|(qi, at)| *qi == field && *at == level);
            if level == ReleaseLevel::None || (!all_fields && slot.is_none()) {
                continue;
            }
            let plaintext =
                dek.open_field(record_id.as_str(), &sealed.field, &sealed.ciphertext)?;
            let canonical = std::str::from_utf8(&plaintext).map_err(|_| VaultError::DataLoss)?;
            let Some(value) = apply_level(&index_keys.pseudonym, purpose, field, level, canonical)
            else {
                continue;
            };
            match (all_fields, slot) {
                (true, slot) => {
                    if let Some(slot) = slot {
                        quasi_at[slot] = Some(fields.len());
                    }
                    fields.push((field, ReleasedValue { value, level }));
                }
                (false, Some(slot)) => quasi[slot] = Some(value),
                (false, None) => {}
            }
        }
        let class = if all_fields {
            class_of(&quasi_at.map(|at| {
                at.and_then(|at| fields.get(at))
                    .map(|(_, released)| released.value.as_str())
            }))
        } else {
            class_of(&quasi.each_ref().map(Option::as_deref))
        };
        let row_key = if all_fields {
            index_keys
                .pseudonym
                .pseudonym(&purpose.name, ROW_KEY_FIELD, record_id.as_str())
        } else {
            String::new()
        };
        Ok(Some(ExportRow {
            fields,
            class,
            row_key,
        }))
    }

    fn export_event(
        &self,
        ctx: &CallContext,
        export: &ExportStream,
        state: &CursorState,
        summary: ExportSummary,
        record_ids: Vec<String>,
        released: Vec<(String, String)>,
    ) -> crate::audit::AuditEvent {
        let mut event = self.event(
            ctx,
            Rpc::ExportRecords.as_str(),
            record_ids,
            "OK",
            Some(format!(
                "{} k={} rows_exported={} rows_suppressed={}{}",
                state.export_label(),
                summary.k,
                summary.rows_exported,
                summary.rows_suppressed,
                if export.resumed { " resumed" } else { "" },
            )),
        );
        event.purpose = Some(export.purpose.clone());
        event.justification = export.justification.clone();
        event.released = released;
        event
    }
}

/// The fields a pass reads from the store, and so the only ones `export_row` may find: every
/// field the purpose releases (`all_fields`, the second pass), or only the quasi-identifiers
/// it releases at the level at which they count (the census). The rest of a record's fields
/// are never read, so neither decoded, copied nor freed.
fn scanned_fields(purpose: &Purpose, all_fields: bool) -> Vec<&'static str> {
    FieldName::ALL
        .iter()
        .filter(|field| {
            let level = purpose.level(**field);
            level != ReleaseLevel::None
                && (all_fields || QUASI_IDENTIFIERS.contains(&(**field, level)))
        })
        .map(|field| field.as_str())
        .collect()
}

/// The class of a row: a digest of its quasi-identifiers, each present or absent.
fn class_of(quasi: &[Option<&str>]) -> [u8; 16] {
    let mut digest = Sha256::new();
    digest.update(b"pdvault.export-class.v1");
    for value in quasi {
        match value {
            Some(value) => {
                digest.update([1]);
                digest.update((value.len() as u64).to_be_bytes());
                digest.update(value.as_bytes());
            }
            None => digest.update([0]),
        }
    }
    let full: [u8; 32] = digest.finalize().into();
    let mut class = [0u8; 16];
    class.copy_from_slice(&full[..16]);
    class
}

/// What the second pass checks a row against: record and class, in 64 bits (a collision
/// would take a change that happens to keep this digest, among the rows of one export).
/// Where a resumed export's scan goes on from: after the record its cursor names, or from
/// the start when it names none. The cursor is sealed by the vault, so a record id in it
/// that does not parse is the vault's own corruption, refused like any other bad cursor.
fn resumed_after(raw: &str) -> Result<Option<RecordId>, VaultError> {
    if raw.is_empty() {
        return Ok(None);
    }
    Ok(Some(RecordId::parse("resume_cursor", raw)?))
}

fn row_digest(record_id: &str, class: &[u8; 16]) -> u64 {
    let mut digest = Sha256::new();
    digest.update(record_id.as_bytes());
    digest.update([0]);
    digest.update(class);
    let full: [u8; 32] = digest.finalize().into();
    u64::from_be_bytes(full[..8].try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_state_round_trips() {
        let state = CursorState {
            export_id: [7; 16],
            as_of: 1_700_000_000_000_000,
            index_version: 3,
            k: 5,
            digest: [9; 32],
            after: "rec_abc".into(),
        };
        assert_eq!(CursorState::decode(&state.encode()), Some(state.clone()));
        let mut other_format = state.encode();
        other_format[0] = 2;
        assert_eq!(CursorState::decode(&other_format), None);
        assert_eq!(CursorState::decode(&state.encode()[..40]), None);
    }

    #[test]
    fn classes_tell_absent_from_empty_and_order_matters() {
        let a = class_of(&[Some("1990"), None]);
        let b = class_of(&[None, Some("1990")]);
        let c = class_of(&[Some(""), None]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, class_of(&[Some("1990"), None]));
    }
}
