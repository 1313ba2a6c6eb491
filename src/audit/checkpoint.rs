//! Signed checkpoints, verification of the whole trail, and retention.
//!
//! A checkpoint signs the head of every chain in the database at one moment (Ed25519, key
//! held in the keyring), so a tail cut off after the checkpoint is detected even though the
//! chain itself would still link. Verification walks every chain page by page (memory for
//! one page, however long the trail) and checks every checkpoint and expiry marker.
//!
//! Retention removes whole checkpointed segments: a chain's events up to a sequence number a
//! checkpoint saw, once they are all older than the cut-off. A signed marker records where
//! the chain now starts, so verification passes over the gap it leaves.

use std::collections::BTreeMap;

use crate::crypto::AuditSigningKey;
use crate::store::{Micros, Store, StoreError};

use super::chain::{
    ChainHead, ChainVerifier, Checkpoint, ExpiryMarker, Problem, checkpoint_message, marker_message,
};

/// Events read per round trip while verifying.
const VERIFY_PAGE: u32 = 2000;

/// Signs and stores the current head of every chain.
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
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks every chain, checkpoint and expiry marker in the store.
pub async fn verify(store: &dyn Store, key: &AuditSigningKey) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let markers: BTreeMap<String, ExpiryMarker> = store
        .expiry_markers()
        .await?
        .into_iter()
        .map(|marker| (marker.chain_id.clone(), marker))
        .collect();
    for marker in markers.values() {
        let message = marker_message(
            &marker.chain_id,
            marker.up_to_seq,
            &marker.hash,
            marker.expired_at,
        );
        if !key.verify(&message, &marker.signature) {
            report.problems.push(Problem::BadSignature {
                what: format!("expiry marker of chain {}", marker.chain_id),
            });
        }
    }
    let mut expected: BTreeMap<String, Vec<ChainHead>> = BTreeMap::new();
    for checkpoint in store.checkpoints().await? {
        report.checkpoints += 1;
        if !key.verify(
            &checkpoint_message(checkpoint.created_at, &checkpoint.heads),
            &checkpoint.signature,
        ) {
            report.problems.push(Problem::BadSignature {
                what: format!("checkpoint {}", checkpoint.id),
            });
            continue;
        }
        for head in checkpoint.heads {
            expected
                .entry(head.chain_id.clone())
                .or_default()
                .push(head);
        }
    }
    let mut chains: Vec<String> = store.chain_ids().await?;
    chains.extend(expected.keys().cloned());
    chains.sort();
    chains.dedup();
    for chain_id in chains {
        report.chains += 1;
        let marker = markers.get(&chain_id);
        let mut verifier = ChainVerifier::new(&chain_id, marker);
        let expired_up_to = marker.map_or(0, |m| m.up_to_seq);
        for head in expected.get(&chain_id).into_iter().flatten() {
            if head.seq > expired_up_to {
                verifier.expect_head(head);
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
        report.problems.extend(problem);
    }
    Ok(report)
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
