//! The audit trail's tamper evidence: canonical encoding of events, the hash chain that links
//! them, signed checkpoints of chain heads, and the verifier that walks it all.
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

/// A signed statement of every chain's head at one moment.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub id: i64,
    pub created_at: i64,
    pub heads: Vec<ChainHead>,
    pub signature: Vec<u8>,
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

/// The bytes a checkpoint's signature covers.
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
    problem: Option<Problem>,
}

impl ChainVerifier {
    /// Starts at the beginning of the chain, or after an expiry marker.
    pub fn new(chain_id: &str, marker: Option<&ExpiryMarker>) -> ChainVerifier {
        let (next_seq, prev_hash) = match marker {
            Some(marker) => (marker.up_to_seq + 1, marker.hash.clone()),
            None => (1, genesis(chain_id).to_vec()),
        };
        ChainVerifier {
            chain_id: chain_id.to_owned(),
            next_seq,
            prev_hash,
            events: 0,
            wanted: Default::default(),
            seen_wanted: Default::default(),
            problem: None,
        }
    }

    /// Asks the verifier to check that the chain reaches `head`.
    pub fn expect_head(&mut self, head: &ChainHead) {
        self.wanted.insert(head.seq, head.hash.clone());
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
        (self.events, None)
    }
}

mod hex_bytes {
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
