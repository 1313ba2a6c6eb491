//! The checkpoint signer: each vault instance signs, at every interval, the heads of the
//! chains it vouches for, as the next link of its own chain of checkpoints, but only after
//! checking that the database still continues from what it signed last.
//!
//! Why the check: the database is the adversary here. Whoever can write to it could cut a
//! chain back, or remove an event and recompute the hashes after it; a signer that signed
//! whatever heads the database reports would then sign the forgery. So each instance keeps
//! its last signed head of every chain it vouches for, and its last checkpoint, outside the
//! database: in memory and in a small state file in the data directory (atomic replace, mode
//! 0600, locked against a second process). Before signing it walks what each chain appended
//! since (hashes recomputed, links followed), checks that its own newest checkpoint is
//! still the database's, and refuses to sign otherwise, raising the alarm: an error log, a
//! refusal counter and signer-alarm gauge, and the `pdvault.audit.checkpoint` health status.
//!
//! Which chains an instance vouches for: the chains it started (one per process start),
//! never a sibling's. Only the instance that wrote a chain can tell its chain from an
//! invented one; a chain no checkpoint names is reported by verification instead. A chain
//! is introduced by a checkpoint naming its origin (seq 0) before its first event, and
//! closed by the checkpoint at shutdown (or at the next start, after a crash), after which
//! nothing may be appended to it. At the change of format, the first signer on a database
//! with no chained checkpoint adopts the chains already there, as format 1 signed them all.
//!
//! Order of a checkpoint: sign, record it in the state file, append it to the witness sink,
//! insert it into the database, record in the state file that it is stored. A crash (or a
//! database failure) between the first record and the last leaves a state the next
//! checkpoint repairs: the checkpoint the database is missing is witnessed again (the
//! witness tolerates the same line twice) and stored. Once recorded as stored, its absence
//! means it was removed, and the signer refuses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::crypto::{AuditPublicKey, AuditSigningKey};
use crate::domain::ids::{ChainId, SignerId};
// Declared with the metrics that report it, which sit below audit (audit records its
// batches and checkpoints through them).
use crate::store::{Micros, Store, StoreError};
pub use crate::telemetry::metrics::SignerHealth;

use super::witness::{CheckpointSink, WitnessLine};
use crate::domain::audit_chain::{
    ChainHead, ChainVerifier, Checkpoint, CheckpointLink, ExpiryMarker, Hash, Problem,
    checkpoint_genesis, genesis, marker_message,
};

/// Events read per round trip while checking what a chain appended.
const WALK_PAGE: u32 = 2000;
const STATE_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("signer state file {path}: {source}")]
    StateIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "signer state file {path} is malformed ({reason}); it names this instance's signer, so move it away only to start a new one"
    )]
    StateMalformed { path: PathBuf, reason: String },
    #[error(
        "signer state file {path} is malformed ({source}); it names this instance's signer, so move it away only to start a new one"
    )]
    StateJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("signer state file {path} is in use by another running pdvault process")]
    StateLocked { path: PathBuf },
    #[error("refused to sign: {0}")]
    Refused(#[from] Refusal),
}

/// Why the signer would not sign: the database does not continue from what it signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the audit signing key changed since this signer's last checkpoint (key {signed}, now {current})"
    )]
    KeyChanged { signed: String, current: String },
    #[error(
        "this signer signed checkpoints up to {signed}, the database holds them only up to {found}: checkpoints were removed"
    )]
    CheckpointsRemoved { signed: i64, found: i64 },
    #[error(
        "this signer signed {signed} checkpoints, the database holds {stored}: checkpoints were removed"
    )]
    CheckpointsMissing { signed: i64, stored: i64 },
    #[error("the database's checkpoint {counter} of this signer is not the one it signed")]
    CheckpointReplaced { counter: i64 },
    #[error(
        "the database holds this signer's checkpoints up to {found}, past the state file's {signed}: the state file is older than the database, or another process signs as this instance"
    )]
    StateBehind { signed: i64, found: i64 },
    #[error(
        "chain {chain_id} was signed up to event {signed_seq}, the database's chain ends at {head_seq}: it was cut back"
    )]
    ChainCut {
        chain_id: String,
        signed_seq: i64,
        head_seq: i64,
    },
    #[error(
        "chain {chain_id} does not continue from the head this signer signed (at event {seq}): events were removed or rewritten"
    )]
    ChainRewritten { chain_id: String, seq: i64 },
    #[error("chain {chain_id}, which this signer vouches for, is gone from the database")]
    ChainMissing { chain_id: String },
    #[error("chain {chain_id} was closed at event {seq}, yet its head moved")]
    ChainReopened { chain_id: String, seq: i64 },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::KeyChanged { .. } => "key_changed",
            Refusal::CheckpointsRemoved { .. } | Refusal::CheckpointsMissing { .. } => {
                "checkpoints_removed"
            }
            Refusal::CheckpointReplaced { .. } => "checkpoint_replaced",
            Refusal::StateBehind { .. } => "state_behind",
            Refusal::ChainCut { .. } => "chain_cut",
            Refusal::ChainRewritten { .. } => "chain_rewritten",
            Refusal::ChainMissing { .. } => "chain_missing",
            Refusal::ChainReopened { .. } => "chain_reopened",
        }
    }
}

/// What the signer remembers outside the database, as its state file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignerState {
    format: u32,
    signer: String,
    /// The key that signed `last`.
    #[serde(default)]
    key_id: Option<String>,
    /// The newest checkpoint signed, whole, so a crash before it reached the database or
    /// the witness can be repaired.
    #[serde(default)]
    last: Option<WitnessLine>,
    /// Whether `last` is known to be in the database: if so and the database lacks it, it
    /// was removed; if not, it is stored again.
    #[serde(default)]
    last_stored: bool,
    /// Every chain this signer vouches for, at the head it last signed.
    #[serde(default)]
    chains: BTreeMap<String, VouchedChain>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VouchedChain {
    seq: i64,
    #[serde(with = "crate::domain::audit_chain::hex_bytes")]
    hash: Vec<u8>,
    /// Signed as final: its head may not move again.
    #[serde(default)]
    closed: bool,
    /// Taken over at the change of format, from a vault that may still be appending: never
    /// closed by this signer.
    #[serde(default)]
    adopted: bool,
}

struct Signing {
    state: SignerState,
    /// The chains this process appends to, if it appends at all (`pdvault audit checkpoint`
    /// does not).
    current: Vec<String>,
}

#[derive(Default)]
struct Status {
    last_checkpoint: Option<Instant>,
    alarm: Option<String>,
    witness_failure: Option<String>,
}

/// One instance's signer. See the module header.
pub struct CheckpointSigner {
    /// Parsed from the state file when it opens; the file keeps the text.
    signer: SignerId,
    state_path: PathBuf,
    sink: CheckpointSink,
    interval: Duration,
    opened: Instant,
    signing: tokio::sync::Mutex<Signing>,
    status: Mutex<Status>,
    /// Held for the signer's life: one process per state file.
    lock: Mutex<Option<std::fs::File>>,
}

impl CheckpointSigner {
    /// Opens (or creates, with a fresh signer id) the state file at `state_path` and locks
    /// it for this process.
    pub fn open(
        state_path: &Path,
        sink: CheckpointSink,
        interval: Duration,
    ) -> Result<CheckpointSigner, CheckpointError> {
        let io = |source| CheckpointError::StateIo {
            path: state_path.to_owned(),
            source,
        };
        let lock = lock_state(state_path)?;
        let state = if state_path.exists() {
            let text = std::fs::read_to_string(state_path).map_err(io)?;
            let state: SignerState =
                serde_json::from_str(&text).map_err(|source| CheckpointError::StateJson {
                    path: state_path.to_owned(),
                    source,
                })?;
            if state.format != STATE_FORMAT {
                return Err(CheckpointError::StateMalformed {
                    path: state_path.to_owned(),
                    reason: format!("format {} is not {STATE_FORMAT}", state.format),
                });
            }
            state
        } else {
            let state = SignerState {
                format: STATE_FORMAT,
                signer: SignerId::generate().into_string(),
                key_id: None,
                last: None,
                last_stored: false,
                chains: BTreeMap::new(),
            };
            write_state(state_path, &state)?;
            tracing::info!(signer = state.signer, path = %state_path.display(), "new checkpoint signer");
            state
        };
        let signer = SignerId::parse("signer", &state.signer).map_err(|refused| {
            CheckpointError::StateMalformed {
                path: state_path.to_owned(),
                reason: format!("the signer id {}", refused.reason),
            }
        })?;
        Ok(CheckpointSigner {
            signer,
            state_path: state_path.to_owned(),
            sink,
            interval,
            opened: Instant::now(),
            signing: tokio::sync::Mutex::new(Signing {
                state,
                current: Vec::new(),
            }),
            status: Mutex::new(Status::default()),
            lock: Mutex::new(Some(lock)),
        })
    }

    /// This instance's signer id (`sgn_…`).
    pub fn signer(&self) -> &SignerId {
        &self.signer
    }

    /// The witness file, when the sink is one.
    pub fn witness_file(&self) -> Option<&Path> {
        self.sink.file()
    }

    /// Makes `chains` the chains this process appends to; the next checkpoint introduces
    /// each at its origin, and the one at shutdown closes them all.
    pub async fn start_chains(&self, chains: &[ChainId]) {
        let mut signing = self.signing.lock().await;
        signing.current = chains.iter().map(ToString::to_string).collect();
    }

    /// Checks that the database continues from what this signer signed last, then signs,
    /// persists, witnesses and stores the next checkpoint. `close_current` makes the
    /// current chains' heads final (at shutdown, once the audit writer has drained).
    pub async fn checkpoint(
        &self,
        store: &dyn Store,
        key: &AuditSigningKey,
        now: Micros,
        close_current: bool,
    ) -> Result<Checkpoint, CheckpointError> {
        let mut signing = self.signing.lock().await;
        let outcome = self
            .sign_next(&mut signing, store, key, now, close_current)
            .await;
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &outcome {
            Ok(checkpoint) => {
                status.last_checkpoint = Some(Instant::now());
                status.alarm = None;
                crate::telemetry::metrics::record_checkpoint_signed(self.signer.as_str());
                tracing::debug!(
                    signer = self.signer.as_str(),
                    counter = checkpoint.link.as_ref().map_or(0, |l| l.counter),
                    heads = checkpoint.heads.len(),
                    "audit checkpoint signed"
                );
            }
            Err(CheckpointError::Refused(refusal)) => {
                status.alarm = Some(refusal.to_string());
                crate::telemetry::metrics::record_checkpoint_refused(
                    self.signer.as_str(),
                    refusal.reason(),
                );
                tracing::error!(
                    signer = self.signer.as_str(),
                    reason = refusal.reason(),
                    %refusal,
                    "AUDIT ALARM: refusing to sign a checkpoint; the audit trail in the database does not continue from what this instance signed"
                );
            }
            Err(error) => {
                tracing::error!(signer = self.signer.as_str(), %error, "audit checkpoint failed");
            }
        }
        outcome
    }

    /// Age, staleness and alarms, for health and metrics.
    pub fn health(&self) -> SignerHealth {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let age = status.last_checkpoint.unwrap_or(self.opened).elapsed();
        SignerHealth {
            signer: self.signer.to_string(),
            age,
            stale: age > self.interval.saturating_mul(2),
            alarm: status.alarm.clone(),
            witness_failure: status.witness_failure.clone(),
        }
    }

    /// Releases the state file for the next process (after the last checkpoint).
    pub fn close(&self) {
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    async fn sign_next(
        &self,
        signing: &mut Signing,
        store: &dyn Store,
        key: &AuditSigningKey,
        now: Micros,
        close_current: bool,
    ) -> Result<Checkpoint, CheckpointError> {
        let public = key.public_key();
        let key_id = public.key_id();
        if let Some(signed) = signing.state.key_id.as_ref().filter(|k| **k != key_id) {
            return Err(Refusal::KeyChanged {
                signed: signed.clone(),
                current: key_id,
            }
            .into());
        }
        let last = self.continue_checkpoints(signing, store).await?;
        // The change of format: format 1 signed every chain, so the first chained checkpoint
        // on a database takes over the chains no one else will ever introduce.
        let adopt = last.is_none() && !store.has_chained_checkpoints().await?;
        let Vouched {
            chains,
            heads: signed_heads,
            closing,
        } = check_chains(signing, store, &public, adopt, close_current).await?;

        let link = CheckpointLink {
            signer: self.signer.to_string(),
            counter: last.map_or(0, |(counter, _)| counter) + 1,
            key_id: key_id.clone(),
            prev: match last {
                Some((_, hash)) => hash.to_vec(),
                None => checkpoint_genesis(self.signer.as_str()).to_vec(),
            },
            closed: closing,
        };
        let mut checkpoint = Checkpoint {
            id: 0,
            created_at: now,
            heads: signed_heads,
            signature: Vec::new(),
            link: Some(link),
        };
        checkpoint.signature = key.sign(&checkpoint.message());

        let mut state = signing.state.clone();
        state.key_id = Some(key_id);
        state.last = WitnessLine::of(&checkpoint);
        state.last_stored = false;
        state.chains = chains;
        self.persist(&state).await?;
        signing.state = state;
        self.witness(&checkpoint).await;
        store.insert_checkpoint(&checkpoint).await?;
        self.mark_stored(signing).await?;
        Ok(checkpoint)
    }

    /// Checks this signer's newest checkpoint in the database against the state file, and
    /// repairs the one gap a crash can leave. Returns the newest checkpoint's counter and
    /// hash, which the next one links to.
    async fn continue_checkpoints(
        &self,
        signing: &mut Signing,
        store: &dyn Store,
    ) -> Result<Option<(i64, Hash)>, CheckpointError> {
        let stored = store.latest_checkpoint(&self.signer).await?;
        let stored_counter = |stored: &Checkpoint| stored.link.as_ref().map(|l| l.counter);
        let last_stored = signing.state.last_stored;
        let signed = signing
            .state
            .last
            .clone()
            .and_then(WitnessLine::into_checkpoint);
        let Some((signed, link)) = signed.and_then(|c| c.link.clone().map(|link| (c, link))) else {
            return match stored {
                None => Ok(None),
                Some(stored) => Err(Refusal::StateBehind {
                    signed: 0,
                    found: stored_counter(&stored).unwrap_or(0),
                }
                .into()),
            };
        };
        let counter = link.counter;
        let removed = |found| Refusal::CheckpointsRemoved {
            signed: counter,
            found,
        };
        let Some(stored) = stored else {
            if counter == 1 && !last_stored {
                return self.store_again(signing, store, signed).await;
            }
            return Err(removed(0).into());
        };
        // A row the database calls this signer's but that is not chained was tampered with.
        let Some(found) = stored_counter(&stored) else {
            return Err(Refusal::CheckpointReplaced { counter }.into());
        };
        if found == counter {
            if stored.message() != signed.message() || stored.signature != signed.signature {
                return Err(Refusal::CheckpointReplaced { counter }.into());
            }
            // One row per counter (a unique index), so a count short of the counter means
            // older checkpoints were deleted; verification names which.
            let count = store.count_checkpoints(&self.signer).await?;
            if count != counter {
                return Err(Refusal::CheckpointsMissing {
                    signed: counter,
                    stored: count,
                }
                .into());
            }
            return Ok(Some((counter, signed.hash())));
        }
        if found > counter {
            return Err(Refusal::StateBehind {
                signed: counter,
                found,
            }
            .into());
        }
        let predecessor = found == counter - 1 && stored.hash().as_slice() == link.prev.as_slice();
        if predecessor && !last_stored {
            return self.store_again(signing, store, signed).await;
        }
        Err(removed(found).into())
    }

    /// Signed and recorded, then the process stopped (or the database failed) before the
    /// checkpoint was stored: finish the job.
    async fn store_again(
        &self,
        signing: &mut Signing,
        store: &dyn Store,
        signed: Checkpoint,
    ) -> Result<Option<(i64, Hash)>, CheckpointError> {
        let counter = signed.link.as_ref().map_or(0, |l| l.counter);
        tracing::warn!(
            signer = self.signer.as_str(),
            counter,
            "the database lacks this signer's newest checkpoint, never recorded as stored; witnessing and storing it again"
        );
        self.witness(&signed).await;
        store.insert_checkpoint(&signed).await?;
        self.mark_stored(signing).await?;
        Ok(Some((counter, signed.hash())))
    }

    async fn mark_stored(&self, signing: &mut Signing) -> Result<(), CheckpointError> {
        let mut state = signing.state.clone();
        state.last_stored = true;
        self.persist(&state).await?;
        signing.state = state;
        Ok(())
    }

    async fn persist(&self, state: &SignerState) -> Result<(), CheckpointError> {
        let path = self.state_path.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || write_state(&path, &state))
            .await
            .map_err(|e| CheckpointError::StateIo {
                path: self.state_path.clone(),
                source: std::io::Error::other(e),
            })?
    }

    /// Appends to the sink; a failure raises the witness alarm but does not stop the
    /// checkpoint from reaching the database.
    async fn witness(&self, checkpoint: &Checkpoint) {
        let sink = self.sink.clone();
        let checkpoint = checkpoint.clone();
        let outcome = tokio::task::spawn_blocking(move || sink.append(&checkpoint))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => status.witness_failure = None,
            Err(error) => {
                crate::telemetry::metrics::record_witness_failure(self.signer.as_str());
                tracing::error!(
                    signer = self.signer.as_str(),
                    sink = %self.sink,
                    %error,
                    "AUDIT ALARM: cannot append the checkpoint to the witness sink"
                );
                status.witness_failure = Some(error.to_string());
            }
        }
    }
}

/// What the next checkpoint signs for: every chain vouched for (as the state file will
/// hold them), the heads to sign, and the chains to close.
struct Vouched {
    chains: BTreeMap<String, VouchedChain>,
    heads: Vec<ChainHead>,
    closing: Vec<String>,
}

/// Checks every open chain the signer vouches for against the database (see
/// [`continues_from`]) and that closed ones have not moved, and decides what to sign: the
/// current chains always, another chain when its head moved, and the chains to close (the
/// current ones at shutdown; one an earlier process of this instance left open, since
/// nothing will append to it again).
async fn check_chains(
    signing: &Signing,
    store: &dyn Store,
    public: &AuditPublicKey,
    adopt: bool,
    close_current: bool,
) -> Result<Vouched, CheckpointError> {
    let heads: BTreeMap<String, ChainHead> = store
        .chain_heads()
        .await?
        .into_iter()
        .map(|head| (head.chain_id.clone(), head))
        .collect();
    let markers: BTreeMap<String, ExpiryMarker> = store
        .expiry_markers()
        .await?
        .into_iter()
        .map(|marker| (marker.chain_id.clone(), marker))
        .collect();
    let mut chains = signing.state.chains.clone();
    for current in &signing.current {
        chains
            .entry(current.clone())
            .or_insert_with(|| VouchedChain {
                seq: 0,
                hash: genesis(current).to_vec(),
                closed: false,
                adopted: false,
            });
    }
    let mut signed = Vec::new();
    if adopt {
        for head in heads.values() {
            if !chains.contains_key(&head.chain_id) {
                let adopted = VouchedChain {
                    seq: head.seq,
                    hash: head.hash.clone(),
                    closed: false,
                    adopted: true,
                };
                chains.insert(head.chain_id.clone(), adopted);
                signed.push(head.clone());
            }
        }
    }
    let mut closing = Vec::new();
    for (chain_id, vouched) in chains.iter_mut() {
        let Some(head) = heads.get(chain_id) else {
            return Err(Refusal::ChainMissing {
                chain_id: chain_id.clone(),
            }
            .into());
        };
        if vouched.closed {
            if head.seq != vouched.seq || head.hash != vouched.hash {
                return Err(Refusal::ChainReopened {
                    chain_id: chain_id.clone(),
                    seq: vouched.seq,
                }
                .into());
            }
            continue;
        }
        continues_from(store, public, vouched, head, markers.get(chain_id)).await?;
        let is_current = signing.current.contains(chain_id);
        let close = if is_current {
            close_current
        } else {
            !vouched.adopted
        };
        let already = signed.iter().any(|h: &ChainHead| h.chain_id == *chain_id);
        if (is_current || close || head.seq != vouched.seq) && !already {
            signed.push(head.clone());
        }
        vouched.seq = head.seq;
        vouched.hash = head.hash.clone();
        if close {
            vouched.closed = true;
            closing.push(chain_id.clone());
        }
    }
    Ok(Vouched {
        chains,
        heads: signed,
        closing,
    })
}

/// Whether the database's `head` of a chain continues from the head last signed: the event
/// signed then is still there with its hash (or a signed expiry marker covers it), and every
/// event after it, up to `head`, links and hashes as it should.
async fn continues_from(
    store: &dyn Store,
    public: &AuditPublicKey,
    signed: &VouchedChain,
    head: &ChainHead,
    marker: Option<&ExpiryMarker>,
) -> Result<(), CheckpointError> {
    let chain_id = &head.chain_id;
    let rewritten = |seq: i64| Refusal::ChainRewritten {
        chain_id: chain_id.clone(),
        seq,
    };
    if head.seq < signed.seq {
        return Err(Refusal::ChainCut {
            chain_id: chain_id.clone(),
            signed_seq: signed.seq,
            head_seq: head.seq,
        }
        .into());
    }
    if head.seq == signed.seq && head.hash != signed.hash {
        return Err(rewritten(signed.seq).into());
    }
    let marker = marker.filter(|m| m.up_to_seq >= signed.seq).filter(|m| {
        public.verify(
            &marker_message(&m.chain_id, m.up_to_seq, &m.hash, m.expired_at),
            &m.signature,
        )
    });
    let mut verifier = match marker {
        // Retention removed the events up to a point at or past the one signed.
        Some(marker) => {
            if marker.up_to_seq == signed.seq && marker.hash != signed.hash {
                return Err(rewritten(signed.seq).into());
            }
            ChainVerifier::resume(chain_id, marker.up_to_seq, &marker.hash)
        }
        None if signed.seq == 0 => {
            if signed.hash != genesis(chain_id) {
                return Err(rewritten(0).into());
            }
            ChainVerifier::resume(chain_id, 0, &signed.hash)
        }
        None => {
            let at = store.chain_events(chain_id, signed.seq - 1, 1).await?;
            match at.first() {
                Some(event) if event.seq == signed.seq && event.hash == signed.hash => {}
                _ => return Err(rewritten(signed.seq).into()),
            }
            ChainVerifier::resume(chain_id, signed.seq, &signed.hash)
        }
    };
    let mut after = verifier.last().0;
    while after < head.seq {
        let page = store.chain_events(chain_id, after, WALK_PAGE).await?;
        for event in page.iter().take_while(|e| e.seq <= head.seq) {
            verifier.feed(event);
        }
        if let Some(problem) = verifier.problem() {
            return Err(rewritten(problem_seq(problem).unwrap_or(signed.seq)).into());
        }
        match page.last() {
            Some(last) if page.len() == WALK_PAGE as usize => after = last.seq,
            _ => break,
        }
    }
    let (last_seq, last_hash) = verifier.last();
    if last_seq != head.seq || last_hash != head.hash.as_slice() {
        return Err(rewritten(last_seq.min(head.seq)).into());
    }
    Ok(())
}

fn problem_seq(problem: &Problem) -> Option<i64> {
    match problem {
        Problem::Altered { seq, .. } | Problem::BrokenLink { seq, .. } => Some(*seq),
        Problem::Missing { expected_seq, .. } => Some(*expected_seq),
        _ => None,
    }
}

/// Takes an exclusive lock on `<state>.lock` (a file of its own: the state file is replaced
/// by rename, which would leave a lock on the old one), so two processes never sign as one.
fn lock_state(state_path: &Path) -> Result<std::fs::File, CheckpointError> {
    let mut lock_path = state_path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options
        .open(&lock_path)
        .map_err(|source| CheckpointError::StateIo {
            path: lock_path.clone(),
            source,
        })?;
    #[cfg(unix)]
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(CheckpointError::StateLocked {
                path: state_path.to_owned(),
            });
        }
        Err(errno) => {
            return Err(CheckpointError::StateIo {
                path: lock_path,
                source: errno.into(),
            });
        }
    }
    Ok(file)
}

/// Replaces the state file atomically: a private temporary file, synced, renamed over the
/// old one, and the directory synced, so a crash leaves the old state or the new.
fn write_state(path: &Path, state: &SignerState) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::StateIo {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
        _ => {}
    }
    crate::keys::write_private_file(&temporary, &json).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_with_signer(dir: &Path, signer: &str) -> Result<CheckpointSigner, CheckpointError> {
        let path = dir.join("audit-signer.json");
        let state = format!(r#"{{"format":{STATE_FORMAT},"signer":"{signer}"}}"#);
        std::fs::write(&path, state).unwrap();
        let sink = CheckpointSink::File(dir.join("witness.jsonl"));
        CheckpointSigner::open(&path, sink, Duration::from_secs(60))
    }

    /// The state file's signer id is parsed once, when it opens: an id of an earlier shape
    /// is this instance's id as it was; anything else is a malformed file, not a signer.
    #[test]
    fn the_state_files_signer_id_is_parsed_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let old = "sgn_3zawz46qpzy26trc";
        let signer = open_with_signer(dir.path(), old).unwrap();
        assert_eq!(signer.signer().as_str(), old);
        drop(signer);
        let new = SignerId::generate();
        let signer = open_with_signer(dir.path(), new.as_str()).unwrap();
        assert_eq!(signer.signer(), &new);
        drop(signer);
        let refused = open_with_signer(dir.path(), "sgn_x").err().unwrap();
        assert!(
            matches!(&refused, CheckpointError::StateMalformed { reason, .. }
                if reason.contains("signer id")),
            "{refused:?}"
        );
    }
}
