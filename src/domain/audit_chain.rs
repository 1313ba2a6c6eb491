//! The audit trail's tamper evidence: canonical encoding of events, the hash chain that links
//! them, signed checkpoints of chain heads, and the verifier that walks it all.
//!
//! Here, below the store, because the store persists these types and links events as it
//! appends them; `audit` (the writer, the signer, verification) re-exports them.
//!
//! Pure: no I/O and no clock. The store calls [`link`] inside the transaction that appends
//! an event; `audit::verify` feeds stored rows to [`ChainVerifier`] page by page, so
//! verification needs memory for one page, not for the trail.
//!
//! Each event's hash is SHA-256 over a domain tag, its chain id, its sequence number, the
//! previous event's hash and the event's canonical encoding (every field length-prefixed,
//! so no two different events encode alike). Editing an event breaks its own hash; deleting
//! or reordering events breaks the links; cutting off the tail is caught by checkpoints,
//! which sign each chain's head at a point in time.
//!
//! Checkpoints come in two formats. Format 1 (before chained checkpoints) signs the heads
//! and a time, nothing else, so deleting one leaves no trace. Format 2 puts each checkpoint
//! in its signer's own chain of checkpoints: it signs a format byte, the signer's id, a
//! counter, the audit key's id, the previous checkpoint's hash, the time, the heads and the
//! chains it closes, all length-prefixed. A deleted checkpoint then leaves a gap, and a
//! deleted newest one contradicts the copy outside the database (the witness file).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// One audit event. Holds no identity: record ids, names of fields and levels, caller and
/// purpose names, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub event_id: String,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
    /// The chain this event is appended to: one per running vault process.
    pub chain_id: String,
    pub caller: String,
    pub peer: Option<String>,
    pub rpc: String,
    pub record_ids: Vec<String>,
    pub purpose: Option<String>,
    pub justification: Option<String>,
    /// (field, level) pairs actually released.
    pub released: Vec<(String, String)>,
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
}

impl AuditEvent {
    /// Whether the event records plaintext leaving the vault.
    pub fn released_plaintext(&self) -> bool {
        self.released.iter().any(|(_, level)| level == "PLAIN")
    }

    /// The record the event is about, when it is about exactly one.
    pub fn subject(&self) -> Option<&str> {
        match self.record_ids.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// An event as stored: with its place in its chain.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event: AuditEvent,
    pub seq: i64,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// The head of a chain: its last sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub chain_id: String,
    pub seq: i64,
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
}

/// A signed statement of chain heads at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The database's row id; 0 for a checkpoint read from elsewhere.
    pub id: i64,
    pub created_at: i64,
    pub heads: Vec<ChainHead>,
    pub signature: Vec<u8>,
    /// Its place in its signer's chain of checkpoints; `None` for format 1.
    pub link: Option<CheckpointLink>,
}

/// What a format-2 checkpoint signs besides time and heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointLink {
    /// The instance that signed it (`sgn_…`, kept in its signer state file).
    pub signer: String,
    /// 1 for the signer's first checkpoint, one more for each after.
    pub counter: i64,
    /// `crypto::AuditPublicKey::key_id` of the key that signed (named, not linked: `domain`
    /// imports no other module).
    pub key_id: String,
    /// Hash of the signer's previous checkpoint, or [`checkpoint_genesis`] for the first.
    #[serde(with = "hex_bytes")]
    pub prev: Vec<u8>,
    /// Chains whose head in this checkpoint is final: nothing may follow it.
    #[serde(default)]
    pub closed: Vec<String>,
}

/// Format byte of chained checkpoints. Format 1 messages begin with their text tag, so the
/// two can never be mistaken for each other.
pub const CHECKPOINT_FORMAT_CHAINED: u8 = 2;

impl Checkpoint {
    pub fn format(&self) -> u8 {
        match self.link {
            None => 1,
            Some(_) => CHECKPOINT_FORMAT_CHAINED,
        }
    }

    /// The bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        match &self.link {
            None => checkpoint_message(self.created_at, &self.heads),
            Some(link) => chained_checkpoint_message(link, self.created_at, &self.heads),
        }
    }

    /// What the signer's next checkpoint names as `prev`.
    pub fn hash(&self) -> Hash {
        Sha256::digest(self.message()).into()
    }

    /// Format 1 left the head hashes without length prefixes; heads of any other length than
    /// a SHA-256 would make two different lists encode alike, so they are refused.
    pub fn encoding_is_unambiguous(&self) -> bool {
        self.link.is_some() || self.heads.iter().all(|head| head.hash.len() == 32)
    }
}

/// Left where expired events were removed: the chain continues from `hash` at `up_to_seq`.
#[derive(Debug, Clone)]
pub struct ExpiryMarker {
    pub chain_id: String,
    pub up_to_seq: i64,
    pub hash: Vec<u8>,
    pub expired_at: i64,
    pub signature: Vec<u8>,
}

/// The hash a new chain starts from.
pub fn genesis(chain_id: &str) -> Hash {
    let mut hasher = Sha256::new();
    put(&mut hasher, b"pdvault.audit.genesis.v1");
    put(&mut hasher, chain_id.as_bytes());
    hasher.finalize().into()
}

/// The hash of `event` appended at `seq` after `prev`.
pub fn link(event: &AuditEvent, seq: i64, prev: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    put(&mut hasher, b"pdvault.audit.event.v1");
    put(&mut hasher, event.chain_id.as_bytes());
    put(&mut hasher, &seq.to_be_bytes());
    put(&mut hasher, prev);
    encode_event(&mut hasher, event);
    hasher.finalize().into()
}

fn encode_event(hasher: &mut Sha256, event: &AuditEvent) {
    put(hasher, event.event_id.as_bytes());
    put(hasher, &event.occurred_at.to_be_bytes());
    put(hasher, event.caller.as_bytes());
    put_opt(hasher, event.peer.as_deref());
    put(hasher, event.rpc.as_bytes());
    put(hasher, &(event.record_ids.len() as u64).to_be_bytes());
    for id in &event.record_ids {
        put(hasher, id.as_bytes());
    }
    put_opt(hasher, event.purpose.as_deref());
    put_opt(hasher, event.justification.as_deref());
    put(hasher, &(event.released.len() as u64).to_be_bytes());
    for (field, level) in &event.released {
        put(hasher, field.as_bytes());
        put(hasher, level.as_bytes());
    }
    put(hasher, event.outcome.as_bytes());
    put_opt(hasher, event.reason.as_deref());
    put_opt(hasher, event.request_id.as_deref());
    put_opt(hasher, event.trace_id.as_deref());
}

fn put(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn put_opt(hasher: &mut Sha256, value: Option<&str>) {
    match value {
        None => hasher.update([0u8]),
        Some(value) => {
            hasher.update([1u8]);
            put(hasher, value.as_bytes());
        }
    }
}

/// Where a signer's chain of checkpoints starts, as `genesis` is where an event chain does.
pub fn checkpoint_genesis(signer: &str) -> Hash {
    let mut hasher = Sha256::new();
    put(&mut hasher, b"pdvault.audit.checkpoint-genesis.v2");
    put(&mut hasher, signer.as_bytes());
    hasher.finalize().into()
}

/// The bytes a format-2 checkpoint's signature covers: every variable-length part
/// length-prefixed and every list counted, heads in a canonical order.
pub fn chained_checkpoint_message(
    link: &CheckpointLink,
    created_at: i64,
    heads: &[ChainHead],
) -> Vec<u8> {
    let mut heads: Vec<&ChainHead> = heads.iter().collect();
    heads.sort_by(|a, b| (&a.chain_id, a.seq, &a.hash).cmp(&(&b.chain_id, b.seq, &b.hash)));
    let mut closed: Vec<&String> = link.closed.iter().collect();
    closed.sort();
    let mut message = vec![CHECKPOINT_FORMAT_CHAINED];
    put_vec(&mut message, b"pdvault.audit.checkpoint.v2");
    put_vec(&mut message, link.key_id.as_bytes());
    put_vec(&mut message, link.signer.as_bytes());
    message.extend_from_slice(&link.counter.to_be_bytes());
    put_vec(&mut message, &link.prev);
    message.extend_from_slice(&created_at.to_be_bytes());
    message.extend_from_slice(&(heads.len() as u64).to_be_bytes());
    for head in heads {
        put_vec(&mut message, head.chain_id.as_bytes());
        message.extend_from_slice(&head.seq.to_be_bytes());
        put_vec(&mut message, &head.hash);
    }
    message.extend_from_slice(&(closed.len() as u64).to_be_bytes());
    for chain_id in closed {
        put_vec(&mut message, chain_id.as_bytes());
    }
    message
}

fn put_vec(message: &mut Vec<u8>, bytes: &[u8]) {
    message.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    message.extend_from_slice(bytes);
}

/// The bytes a format-1 checkpoint's signature covers.
pub fn checkpoint_message(created_at: i64, heads: &[ChainHead]) -> Vec<u8> {
    let mut heads = heads.to_vec();
    heads.sort_by(|a, b| a.chain_id.cmp(&b.chain_id));
    let mut message = b"pdvault.audit.checkpoint.v1".to_vec();
    message.extend_from_slice(&created_at.to_be_bytes());
    for head in &heads {
        message.extend_from_slice(&(head.chain_id.len() as u64).to_be_bytes());
        message.extend_from_slice(head.chain_id.as_bytes());
        message.extend_from_slice(&head.seq.to_be_bytes());
        message.extend_from_slice(&head.hash);
    }
    message
}

/// The bytes an expiry marker's signature covers.
pub fn marker_message(chain_id: &str, up_to_seq: i64, hash: &[u8], expired_at: i64) -> Vec<u8> {
    let mut message = b"pdvault.audit.expiry.v1".to_vec();
    message.extend_from_slice(&(chain_id.len() as u64).to_be_bytes());
    message.extend_from_slice(chain_id.as_bytes());
    message.extend_from_slice(&up_to_seq.to_be_bytes());
    message.extend_from_slice(hash);
    message.extend_from_slice(&expired_at.to_be_bytes());
    message
}

/// What verification found wrong, the first problem per chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The event's content no longer matches its hash: it was edited.
    Altered { chain_id: String, seq: i64 },
    /// The event does not follow its predecessor: events were reordered or inserted.
    BrokenLink { chain_id: String, seq: i64 },
    /// Sequence numbers skip: events were deleted.
    Missing {
        chain_id: String,
        expected_seq: i64,
        found_seq: i64,
    },
    /// A checkpoint saw the chain reach `checkpointed_seq` but the chain now ends earlier, or
    /// the event there has another hash: the tail was cut off or rewritten.
    Truncated {
        chain_id: String,
        checkpointed_seq: i64,
        last_seq: i64,
    },
    /// A checkpoint's or expiry marker's signature does not verify.
    BadSignature { what: String },
    /// A checkpoint closed the chain at `closed_seq`, yet events follow: they were added
    /// after its vault stopped writing to it.
    AfterClose {
        chain_id: String,
        closed_seq: i64,
        last_seq: i64,
    },
    /// The chain holds events but no checkpoint or expiry marker names it: no vault vouches
    /// for it, so it was invented (or its vault never got to sign it).
    Unvouched { chain_id: String },
    /// A signer's checkpoints skip from one counter to a later one: checkpoints in between
    /// were deleted (`expected` is the first one missing).
    CheckpointGap {
        signer: String,
        expected: i64,
        found: i64,
    },
    /// The checkpoint does not name its predecessor's hash: the one before it was replaced.
    CheckpointBrokenLink { signer: String, counter: i64 },
    /// The witness file holds this checkpoint and the database does not: it was deleted.
    CheckpointMissing { signer: String, counter: i64 },
    /// The database's checkpoint differs from the witness file's copy.
    CheckpointAltered { signer: String, counter: i64 },
    /// Signed with another key than the one verifying.
    UnknownKey { what: String, key_id: String },
    /// The witness file could not be read, or a line of it is not a checkpoint.
    Witness { detail: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Altered { chain_id, seq } => {
                write!(f, "chain {chain_id}: event {seq} was altered")
            }
            Problem::BrokenLink { chain_id, seq } => write!(
                f,
                "chain {chain_id}: event {seq} does not follow its predecessor (reordered or inserted)"
            ),
            Problem::Missing {
                chain_id,
                expected_seq,
                found_seq,
            } => write!(
                f,
                "chain {chain_id}: events {expected_seq}..{} are missing",
                found_seq - 1
            ),
            Problem::Truncated {
                chain_id,
                checkpointed_seq,
                last_seq,
            } => write!(
                f,
                "chain {chain_id}: a checkpoint saw event {checkpointed_seq} but the chain ends at {last_seq} (tail cut or rewritten)"
            ),
            Problem::BadSignature { what } => write!(f, "{what}: signature does not verify"),
            Problem::AfterClose {
                chain_id,
                closed_seq,
                last_seq,
            } => write!(
                f,
                "chain {chain_id}: closed at event {closed_seq} but continues to {last_seq} (events added after its vault stopped)"
            ),
            Problem::Unvouched { chain_id } => write!(
                f,
                "chain {chain_id}: holds events but no checkpoint names it (invented chain)"
            ),
            Problem::CheckpointGap {
                signer,
                expected,
                found,
            } => write!(
                f,
                "signer {signer}: checkpoints {expected}..{} are missing from the database",
                found - 1
            ),
            Problem::CheckpointBrokenLink { signer, counter } => write!(
                f,
                "signer {signer}: checkpoint {counter} does not link to its predecessor (replaced)"
            ),
            Problem::CheckpointMissing { signer, counter } => write!(
                f,
                "signer {signer}: checkpoint {counter} is in the witness file but not in the database (deleted)"
            ),
            Problem::CheckpointAltered { signer, counter } => write!(
                f,
                "signer {signer}: checkpoint {counter} in the database differs from the witness file's copy (edited)"
            ),
            Problem::UnknownKey { what, key_id } => {
                write!(f, "{what}: signed with key {key_id}, not the key verifying")
            }
            Problem::Witness { detail } => write!(f, "witness file: {detail}"),
        }
    }
}

/// Walks one chain in sequence order, remembering the first problem.
pub struct ChainVerifier {
    chain_id: String,
    next_seq: i64,
    prev_hash: Vec<u8>,
    events: u64,
    /// (seq, hash) of every event seen, kept only for the sequence numbers checkpoints name.
    wanted: std::collections::BTreeMap<i64, Vec<u8>>,
    seen_wanted: std::collections::BTreeMap<i64, Vec<u8>>,
    /// Where a checkpoint closed the chain: nothing may follow.
    closed_at: Option<i64>,
    problem: Option<Problem>,
}

impl ChainVerifier {
    /// Starts at the beginning of the chain, or after an expiry marker.
    pub fn new(chain_id: &str, marker: Option<&ExpiryMarker>) -> ChainVerifier {
        match marker {
            Some(marker) => ChainVerifier::resume(chain_id, marker.up_to_seq, &marker.hash),
            None => ChainVerifier::resume(chain_id, 0, &genesis(chain_id)),
        }
    }

    /// Starts after the event at `seq` whose hash is `hash` (0 and the genesis hash for the
    /// whole chain): how a signer checks only what was appended since it last signed.
    pub fn resume(chain_id: &str, seq: i64, hash: &[u8]) -> ChainVerifier {
        ChainVerifier {
            chain_id: chain_id.to_owned(),
            next_seq: seq + 1,
            prev_hash: hash.to_vec(),
            events: 0,
            wanted: Default::default(),
            seen_wanted: Default::default(),
            closed_at: None,
            problem: None,
        }
    }

    /// Asks the verifier to check that the chain reaches `head`. A head at 0 names the
    /// chain's origin (a format-2 checkpoint introduces a chain before its first event).
    pub fn expect_head(&mut self, head: &ChainHead) {
        if head.seq == 0 {
            if head.hash != genesis(&self.chain_id) && self.problem.is_none() {
                self.problem = Some(Problem::BrokenLink {
                    chain_id: self.chain_id.clone(),
                    seq: 0,
                });
            }
            return;
        }
        self.wanted.insert(head.seq, head.hash.clone());
    }

    /// As [`ChainVerifier::expect_head`], for a head a checkpoint declared final.
    pub fn expect_final(&mut self, head: &ChainHead) {
        self.expect_head(head);
        self.close_at(head.seq);
    }

    /// Nothing may follow the event at `seq`.
    pub fn close_at(&mut self, seq: i64) {
        self.closed_at = Some(self.closed_at.map_or(seq, |closed| closed.min(seq)));
    }

    /// The last event fed (or where the walk started): its sequence number and hash.
    pub fn last(&self) -> (i64, &[u8]) {
        (self.next_seq - 1, &self.prev_hash)
    }

    /// The first problem seen so far.
    pub fn problem(&self) -> Option<&Problem> {
        self.problem.as_ref()
    }

    /// Feeds the next stored event, in ascending `seq` order.
    pub fn feed(&mut self, stored: &StoredEvent) {
        self.events += 1;
        if self.wanted.contains_key(&stored.seq) {
            self.seen_wanted.insert(stored.seq, stored.hash.clone());
        }
        if self.problem.is_some() {
            return;
        }
        let chain_id = self.chain_id.clone();
        if stored.seq > self.next_seq {
            self.problem = Some(Problem::Missing {
                chain_id,
                expected_seq: self.next_seq,
                found_seq: stored.seq,
            });
        } else if stored.seq < self.next_seq || stored.prev_hash != self.prev_hash {
            self.problem = Some(Problem::BrokenLink {
                chain_id,
                seq: stored.seq,
            });
        } else if link(&stored.event, stored.seq, &stored.prev_hash).as_slice() != stored.hash {
            self.problem = Some(Problem::Altered {
                chain_id,
                seq: stored.seq,
            });
        }
        self.next_seq = stored.seq + 1;
        self.prev_hash = stored.hash.clone();
    }

    /// The chain's verdict: events seen and the first problem, if any.
    pub fn finish(self) -> (u64, Option<Problem>) {
        if self.problem.is_some() {
            return (self.events, self.problem);
        }
        let last_seq = self.next_seq - 1;
        for (seq, hash) in &self.wanted {
            if self.seen_wanted.get(seq) != Some(hash) {
                return (
                    self.events,
                    Some(Problem::Truncated {
                        chain_id: self.chain_id,
                        checkpointed_seq: *seq,
                        last_seq,
                    }),
                );
            }
        }
        if let Some(closed_seq) = self.closed_at.filter(|closed| last_seq > *closed) {
            return (
                self.events,
                Some(Problem::AfterClose {
                    chain_id: self.chain_id,
                    closed_seq,
                    last_seq,
                }),
            );
        }
        (self.events, None)
    }
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&data_encoding::HEXLOWER.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> AuditEvent {
        AuditEvent {
            event_id: format!("evt_{n}"),
            occurred_at: i64::from(n),
            chain_id: "chn_a".into(),
            caller: "claims".into(),
            peer: Some("127.0.0.1:1".into()),
            rpc: "GetRecord".into(),
            record_ids: vec!["rec_x".into()],
            purpose: Some("service-delivery".into()),
            justification: None,
            released: vec![("name".into(), "PLAIN".into())],
            outcome: "OK".into(),
            reason: None,
            request_id: None,
            trace_id: None,
        }
    }

    fn chain(n: u32) -> Vec<StoredEvent> {
        let mut prev = genesis("chn_a").to_vec();
        (1..=n)
            .map(|i| {
                let e = event(i);
                let hash = link(&e, i64::from(i), &prev).to_vec();
                let stored = StoredEvent {
                    event: e,
                    seq: i64::from(i),
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                stored
            })
            .collect()
    }

    fn verify(events: &[StoredEvent], heads: &[ChainHead]) -> Option<Problem> {
        let mut verifier = ChainVerifier::new("chn_a", None);
        for head in heads {
            verifier.expect_head(head);
        }
        for e in events {
            verifier.feed(e);
        }
        verifier.finish().1
    }

    fn head_of(events: &[StoredEvent], seq: i64) -> ChainHead {
        ChainHead {
            chain_id: "chn_a".into(),
            seq,
            hash: events[(seq - 1) as usize].hash.clone(),
        }
    }

    #[test]
    fn an_intact_chain_verifies() {
        let events = chain(5);
        assert_eq!(verify(&events, &[head_of(&events, 5)]), None);
    }

    #[test]
    fn edits_are_detected() {
        let mut events = chain(5);
        events[2].event.caller = "someone-else".into();
        assert_eq!(
            verify(&events, &[]),
            Some(Problem::Altered {
                chain_id: "chn_a".into(),
                seq: 3
            })
        );
    }

    #[test]
    fn deletions_are_detected() {
        let mut events = chain(5);
        events.remove(1);
        assert!(matches!(
            verify(&events, &[]),
            Some(Problem::Missing {
                expected_seq: 2,
                found_seq: 3,
                ..
            })
        ));
    }

    #[test]
    fn reordering_is_detected() {
        let mut events = chain(5);
        // Swap the contents of two rows but keep the sequence numbers in place.
        let (a, b) = (events[1].clone(), events[2].clone());
        events[1] = StoredEvent { seq: 2, ..b };
        events[2] = StoredEvent { seq: 3, ..a };
        assert!(matches!(
            verify(&events, &[]),
            Some(Problem::BrokenLink { seq: 2, .. })
        ));
    }

    #[test]
    fn truncation_after_a_checkpoint_is_detected() {
        let events = chain(5);
        let head = head_of(&events, 5);
        assert!(matches!(
            verify(&events[..3], &[head]),
            Some(Problem::Truncated {
                checkpointed_seq: 5,
                last_seq: 3,
                ..
            })
        ));
    }

    #[test]
    fn an_expiry_marker_lets_the_rest_verify() {
        let events = chain(5);
        let marker = ExpiryMarker {
            chain_id: "chn_a".into(),
            up_to_seq: 2,
            hash: events[1].hash.clone(),
            expired_at: 0,
            signature: vec![],
        };
        let mut verifier = ChainVerifier::new("chn_a", Some(&marker));
        for e in &events[2..] {
            verifier.feed(e);
        }
        assert_eq!(verifier.finish(), (3, None));
    }

    fn chained(counter: i64, prev: Vec<u8>) -> CheckpointLink {
        CheckpointLink {
            signer: "sgn_a".into(),
            counter,
            key_id: "0123456789abcdef".into(),
            prev,
            closed: vec![],
        }
    }

    #[test]
    fn chained_messages_sign_every_part_and_differ_from_format_1() {
        let events = chain(2);
        let heads = vec![head_of(&events, 2)];
        let base = chained(1, checkpoint_genesis("sgn_a").to_vec());
        let message = chained_checkpoint_message(&base, 7, &heads);
        assert_eq!(message[0], CHECKPOINT_FORMAT_CHAINED);
        assert_ne!(message, checkpoint_message(7, &heads));
        let variants = [
            CheckpointLink {
                counter: 2,
                ..base.clone()
            },
            CheckpointLink {
                signer: "sgn_b".into(),
                ..base.clone()
            },
            CheckpointLink {
                key_id: "fedcba9876543210".into(),
                ..base.clone()
            },
            CheckpointLink {
                prev: vec![0; 32],
                ..base.clone()
            },
            CheckpointLink {
                closed: vec!["chn_a".into()],
                ..base.clone()
            },
        ];
        for variant in &variants {
            assert_ne!(chained_checkpoint_message(variant, 7, &heads), message);
        }
        assert_ne!(chained_checkpoint_message(&base, 8, &heads), message);
        assert_ne!(
            chained_checkpoint_message(&base, 7, &[head_of(&events, 1)]),
            message
        );
    }

    #[test]
    fn chained_messages_are_injective_where_format_1_was_not() {
        // Moving bytes between a chain id and the hash before it, or between the signer and
        // the key id, must change the message.
        let a = ChainHead {
            chain_id: "chn_a".into(),
            seq: 1,
            hash: vec![1, 2],
        };
        let b = ChainHead {
            chain_id: "chn_b".into(),
            seq: 2,
            hash: vec![3],
        };
        let shifted = [
            ChainHead {
                hash: vec![1],
                ..a.clone()
            },
            ChainHead {
                hash: vec![2, 3],
                ..b.clone()
            },
        ];
        let base = chained(1, vec![9; 32]);
        assert_ne!(
            chained_checkpoint_message(&base, 0, &[a.clone(), b.clone()]),
            chained_checkpoint_message(&base, 0, &shifted)
        );
        // key_id then signer: the same bytes concatenated, split differently.
        let moved = CheckpointLink {
            key_id: "0123456789abcdefs".into(),
            signer: "gn_a".into(),
            ..base.clone()
        };
        assert_ne!(
            chained_checkpoint_message(&base, 0, &[]),
            chained_checkpoint_message(&moved, 0, &[])
        );
        let legacy = Checkpoint {
            id: 0,
            created_at: 0,
            heads: vec![a, b],
            signature: vec![],
            link: None,
        };
        assert!(!legacy.encoding_is_unambiguous());
    }

    #[test]
    fn a_checkpoint_hash_covers_its_link() {
        let events = chain(1);
        let first = Checkpoint {
            id: 1,
            created_at: 5,
            heads: vec![head_of(&events, 1)],
            signature: vec![],
            link: Some(chained(1, checkpoint_genesis("sgn_a").to_vec())),
        };
        let mut other = first.clone();
        other.link.as_mut().unwrap().counter = 2;
        assert_ne!(first.hash(), other.hash());
        // The row id and the signature are not part of what the next checkpoint links to.
        let mut same = first.clone();
        same.id = 9;
        same.signature = vec![1];
        assert_eq!(first.hash(), same.hash());
    }

    #[test]
    fn a_closed_chain_accepts_nothing_after_its_final_head() {
        let events = chain(4);
        let mut verifier = ChainVerifier::new("chn_a", None);
        verifier.expect_final(&head_of(&events, 3));
        for e in &events {
            verifier.feed(e);
        }
        assert_eq!(
            verifier.finish().1,
            Some(Problem::AfterClose {
                chain_id: "chn_a".into(),
                closed_seq: 3,
                last_seq: 4
            })
        );
        let mut verifier = ChainVerifier::new("chn_a", None);
        verifier.expect_final(&head_of(&events, 4));
        for e in &events {
            verifier.feed(e);
        }
        assert_eq!(verifier.finish().1, None);
    }

    #[test]
    fn an_origin_head_must_be_the_genesis_hash() {
        let mut verifier = ChainVerifier::new("chn_a", None);
        verifier.expect_head(&ChainHead {
            chain_id: "chn_a".into(),
            seq: 0,
            hash: genesis("chn_a").to_vec(),
        });
        assert_eq!(verifier.finish().1, None);
        let mut verifier = ChainVerifier::new("chn_a", None);
        verifier.expect_head(&ChainHead {
            chain_id: "chn_a".into(),
            seq: 0,
            hash: genesis("chn_b").to_vec(),
        });
        assert!(matches!(
            verifier.finish().1,
            Some(Problem::BrokenLink { seq: 0, .. })
        ));
    }

    #[test]
    fn a_resumed_walk_checks_only_what_follows() {
        let events = chain(5);
        let mut verifier = ChainVerifier::resume("chn_a", 3, &events[2].hash);
        for e in &events[3..] {
            verifier.feed(e);
        }
        assert_eq!(verifier.last(), (5, events[4].hash.as_slice()));
        assert_eq!(verifier.finish(), (2, None));
        // Resuming from a hash the chain no longer has fails on the first event.
        let mut verifier = ChainVerifier::resume("chn_a", 3, &events[1].hash);
        verifier.feed(&events[3]);
        assert!(matches!(
            verifier.problem(),
            Some(Problem::BrokenLink { seq: 4, .. })
        ));
    }

    #[test]
    fn checkpoint_messages_do_not_depend_on_head_order() {
        let events = chain(2);
        let a = head_of(&events, 1);
        let b = ChainHead {
            chain_id: "chn_b".into(),
            ..head_of(&events, 2)
        };
        assert_eq!(
            checkpoint_message(7, &[a.clone(), b.clone()]),
            checkpoint_message(7, &[b, a])
        );
    }
}
