//! Verification of the whole trail, the format-1 checkpoint writer, and retention.
//!
//! Verification needs the audit key's public half only, never the keyring: it checks every
//! checkpoint's signature and, for chained checkpoints, that each signer's chain of them has
//! no gap and every link holds; it compares the database's checkpoints with the witness
//! file's copies when given one (a checkpoint the witness holds and the database lacks was
//! deleted); then it walks every chain page by page (memory for one page, however long the
//! trail) against every head any checkpoint saw, and reports chains no checkpoint names.
//!
//! Retention removes whole checkpointed segments: a chain's events up to a sequence number a
//! checkpoint saw, once they are all older than the cut-off. A signed marker records where
//! the chain now starts, so verification passes over the gap it leaves.

use std::collections::{BTreeMap, BTreeSet};

use crate::crypto::{AuditPublicKey, AuditSigningKey};
use crate::store::{Micros, Store, StoreError};

use super::witness::Witness;
use crate::domain::audit_chain::{
    ChainHead, ChainVerifier, Checkpoint, ExpiryMarker, Problem, checkpoint_genesis,
    checkpoint_message, marker_message,
};

/// Events read per round trip while verifying.
const VERIFY_PAGE: u32 = 2000;

/// Signs and stores a format-1 checkpoint of every chain's head: what vaults wrote before
/// checkpoints were chained. The vault signs through [`super::CheckpointSigner`]; this stays
/// so that tests can produce the old format, which must keep verifying.
pub async fn write_checkpoint(
    store: &dyn Store,
    key: &AuditSigningKey,
    now: Micros,
) -> Result<Checkpoint, StoreError> {
    let heads = store.chain_heads().await?;
    let signature = key.sign(&checkpoint_message(now, &heads));
    let checkpoint = Checkpoint {
        id: 0,
        created_at: now,
        heads,
        signature,
        link: None,
    };
    store.insert_checkpoint(&checkpoint).await?;
    Ok(checkpoint)
}

/// What a verification saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub chains: u64,
    pub events: u64,
    pub checkpoints: u64,
    /// Whether a witness file was compared.
    pub witness_checked: bool,
    /// Checkpoints of the witness file found, identical, in the database.
    pub witnessed: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks every chain, checkpoint and expiry marker in the store with the keyring's key.
pub async fn verify(store: &dyn Store, key: &AuditSigningKey) -> Result<VerifyReport, StoreError> {
    verify_with(store, &key.public_key(), None).await
}

/// Heads checkpoints saw, per chain, and which of them were declared final.
#[derive(Default)]
struct Expected {
    heads: BTreeMap<String, Vec<(ChainHead, bool)>>,
}

impl Expected {
    fn add(&mut self, checkpoint: &Checkpoint) {
        let closed = checkpoint
            .link
            .as_ref()
            .map(|link| link.closed.as_slice())
            .unwrap_or_default();
        for head in &checkpoint.heads {
            let last = closed.contains(&head.chain_id);
            self.heads
                .entry(head.chain_id.clone())
                .or_default()
                .push((head.clone(), last));
        }
    }
}

/// Walks every chain, checkpoint and expiry marker in the store, with only the public key,
/// comparing the checkpoints with `witness` when there is one.
pub async fn verify_with(
    store: &dyn Store,
    public: &AuditPublicKey,
    witness: Option<&Witness>,
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let key_id = public.key_id();
    let markers: BTreeMap<String, ExpiryMarker> = store
        .expiry_markers()
        .await?
        .into_iter()
        .map(|marker| (marker.chain_id.clone(), marker))
        .collect();
    let mut vouched: BTreeSet<String> = BTreeSet::new();
    for marker in markers.values() {
        let message = marker_message(
            &marker.chain_id,
            marker.up_to_seq,
            &marker.hash,
            marker.expired_at,
        );
        if public.verify(&message, &marker.signature) {
            vouched.insert(marker.chain_id.clone());
        } else {
            report.problems.push(Problem::BadSignature {
                what: format!("expiry marker of chain {}", marker.chain_id),
            });
        }
    }

    let mut expected = Expected::default();
    // Chained checkpoints with good signatures, per signer and counter.
    let mut signers: BTreeMap<String, BTreeMap<i64, Checkpoint>> = BTreeMap::new();
    for checkpoint in store.checkpoints().await? {
        report.checkpoints += 1;
        let what = match &checkpoint.link {
            None => format!("checkpoint {}", checkpoint.id),
            Some(link) => format!("checkpoint {} of signer {}", link.counter, link.signer),
        };
        if let Some(problem) = check_signature(&checkpoint, public, &key_id, what) {
            report.problems.push(problem);
            continue;
        }
        expected.add(&checkpoint);
        if let Some(link) = &checkpoint.link {
            let counters = signers.entry(link.signer.clone()).or_default();
            if counters.insert(link.counter, checkpoint.clone()).is_some() {
                report.problems.push(Problem::CheckpointAltered {
                    signer: link.signer.clone(),
                    counter: link.counter,
                });
            }
        }
    }
    for (signer, counters) in &signers {
        if let Some(problem) = check_links(signer, counters) {
            report.problems.push(problem);
        }
    }

    if let Some(witness) = witness {
        report.witness_checked = true;
        report.problems.extend(witness.problems.iter().cloned());
        compare_witness(
            witness,
            &signers,
            public,
            &key_id,
            &mut expected,
            &mut report,
        );
    }

    let mut chains: Vec<String> = store.chain_ids().await?;
    chains.extend(expected.heads.keys().cloned());
    chains.sort();
    chains.dedup();
    for chain_id in chains {
        report.chains += 1;
        let marker = markers.get(&chain_id);
        let mut verifier = ChainVerifier::new(&chain_id, marker);
        let expired_up_to = marker.map_or(0, |m| m.up_to_seq);
        let heads = expected.heads.get(&chain_id);
        for (head, last) in heads.into_iter().flatten() {
            match (head.seq > expired_up_to, *last) {
                (true, true) => verifier.expect_final(head),
                (true, false) => verifier.expect_head(head),
                // Expired since: only the promise that nothing follows still applies.
                (false, true) => verifier.close_at(head.seq),
                (false, false) => {}
            }
        }
        let mut after = expired_up_to;
        loop {
            let page = store.chain_events(&chain_id, after, VERIFY_PAGE).await?;
            for event in &page {
                verifier.feed(event);
            }
            match page.last() {
                Some(last) if page.len() == VERIFY_PAGE as usize => after = last.seq,
                _ => break,
            }
        }
        let (events, problem) = verifier.finish();
        report.events += events;
        match problem {
            Some(problem) => report.problems.push(problem),
            None if events > 0 && heads.is_none() && !vouched.contains(&chain_id) => {
                report.problems.push(Problem::Unvouched { chain_id });
            }
            None => {}
        }
    }
    Ok(report)
}

fn check_signature(
    checkpoint: &Checkpoint,
    public: &AuditPublicKey,
    key_id: &str,
    what: String,
) -> Option<Problem> {
    if let Some(link) = checkpoint.link.as_ref().filter(|l| l.key_id != key_id) {
        return Some(Problem::UnknownKey {
            what,
            key_id: link.key_id.clone(),
        });
    }
    let good = checkpoint.encoding_is_unambiguous()
        && public.verify(&checkpoint.message(), &checkpoint.signature);
    (!good).then_some(Problem::BadSignature { what })
}

/// The first break in one signer's chain of checkpoints: a counter missing (from the first
/// on) or a checkpoint not naming its predecessor's hash.
fn check_links(signer: &str, counters: &BTreeMap<i64, Checkpoint>) -> Option<Problem> {
    let mut expected = 1;
    let mut prev = checkpoint_genesis(signer).to_vec();
    for (&counter, checkpoint) in counters {
        if counter != expected {
            return Some(Problem::CheckpointGap {
                signer: signer.to_owned(),
                expected,
                found: counter,
            });
        }
        let link = checkpoint.link.as_ref()?;
        if link.prev != prev {
            return Some(Problem::CheckpointBrokenLink {
                signer: signer.to_owned(),
                counter,
            });
        }
        prev = checkpoint.hash().to_vec();
        expected = counter + 1;
    }
    None
}

/// Every checkpoint the witness holds must be in the database, unchanged. The witness's
/// heads count as seen, so a chain cut back after its checkpoints were deleted still fails.
/// One problem per signer: the first checkpoint found missing or changed.
fn compare_witness(
    witness: &Witness,
    signers: &BTreeMap<String, BTreeMap<i64, Checkpoint>>,
    public: &AuditPublicKey,
    key_id: &str,
    expected: &mut Expected,
    report: &mut VerifyReport,
) {
    let mut seen: BTreeMap<(String, i64), Vec<u8>> = BTreeMap::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for checkpoint in &witness.checkpoints {
        let Some(link) = &checkpoint.link else {
            continue;
        };
        let what = format!(
            "witness checkpoint {} of signer {}",
            link.counter, link.signer
        );
        if let Some(problem) = check_signature(checkpoint, public, key_id, what) {
            report.problems.push(problem);
            continue;
        }
        let message = checkpoint.message();
        match seen.get(&(link.signer.clone(), link.counter)) {
            // The same line twice: a signer repeating a checkpoint after a crash.
            Some(earlier) if *earlier == message => continue,
            Some(_) => {
                report.problems.push(Problem::Witness {
                    detail: format!(
                        "signer {} signed two different checkpoints numbered {}",
                        link.signer, link.counter
                    ),
                });
                continue;
            }
            None => {
                seen.insert((link.signer.clone(), link.counter), message.clone());
            }
        }
        expected.add(checkpoint);
        let stored = signers
            .get(&link.signer)
            .and_then(|counters| counters.get(&link.counter));
        let problem = match stored {
            None => Some(Problem::CheckpointMissing {
                signer: link.signer.clone(),
                counter: link.counter,
            }),
            Some(stored)
                if stored.message() != message || stored.signature != checkpoint.signature =>
            {
                Some(Problem::CheckpointAltered {
                    signer: link.signer.clone(),
                    counter: link.counter,
                })
            }
            Some(_) => {
                report.witnessed += 1;
                None
            }
        };
        if let Some(problem) = problem
            && reported.insert(link.signer.clone())
        {
            report.problems.push(problem);
        }
    }
}

/// Removes, chain by chain, the longest checkpointed prefix whose events all happened before
/// `cutoff`, leaving a signed marker. Returns how many events were removed.
pub async fn expire(
    store: &dyn Store,
    key: &AuditSigningKey,
    cutoff: Micros,
    now: Micros,
) -> Result<u64, StoreError> {
    let mut checkpointed: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for checkpoint in store.checkpoints().await? {
        for head in checkpoint.heads {
            checkpointed
                .entry(head.chain_id)
                .or_default()
                .push(head.seq);
        }
    }
    let markers: BTreeMap<String, i64> = store
        .expiry_markers()
        .await?
        .into_iter()
        .map(|m| (m.chain_id, m.up_to_seq))
        .collect();
    let mut removed = 0;
    for (chain_id, mut seqs) in checkpointed {
        let already = markers.get(&chain_id).copied().unwrap_or(0);
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        for seq in seqs.into_iter().filter(|&seq| seq > already) {
            // A chain is appended in time order (up to one batch of skew), so the event at
            // `seq` being old enough means everything before it is too.
            let Some(event) = store
                .chain_events(&chain_id, seq - 1, 1)
                .await?
                .into_iter()
                .find(|e| e.seq == seq)
            else {
                continue;
            };
            if event.event.occurred_at >= cutoff {
                continue;
            }
            let signature = key.sign(&marker_message(&chain_id, seq, &event.hash, now));
            let marker = ExpiryMarker {
                chain_id: chain_id.clone(),
                up_to_seq: seq,
                hash: event.hash,
                expired_at: now,
                signature,
            };
            removed += store.expire_chain_prefix(&marker).await?;
            break;
        }
    }
    Ok(removed)
}
