//! The vault's identifiers: record, audit event, audit chain, checkpoint signer, rewrap job,
//! account-history entry and consent ids, each a type of its own, and the one generator
//! that makes them.
//!
//! An id is a string everywhere it travels (protobuf, SQL, the trail, logs), so a bare
//! `&str` would let a purpose name, a placeholder or an identity value sent in the wrong
//! field stand where an id belongs. Here every id is a newtype with no public constructor
//! from an unchecked string: it is made by [`generate`](RecordId::generate) or by `parse`,
//! which is called where a string enters (a request field, a database row a store decodes)
//! and refuses with a [`Violation`] naming the field. The command-line clients pass record
//! ids through as they were typed: the vault refuses a malformed one, naming the field.
//!
//! # Shapes
//!
//! New ids are a prefix (`rec_`, `evt_`, `chn_`, `sgn_`, `rwj_`, `acc_`, `con_`) and 26
//! lowercase Crockford base32 characters: the text form of a ULID, here of a UUIDv7 (RFC
//! 9562) built by the `uuid` crate from the Unix millisecond and 74 bits from the OS
//! generator. Crockford's alphabet is in ASCII order, so ids sort by creation time as text
//! (to the millisecond; ids of one millisecond are in random order), and the indexes they
//! key grow at their right edge instead of taking every insert at a random leaf.
//!
//! Ids issued before (the database and clients keep them for years) still parse: record ids
//! are `rec_` and 26 RFC 4648 base32 characters (128 random bits), chain and signer ids their
//! prefix and 16 of them (80 bits), event and job ids their prefix, 13 hex digits
//! (microseconds) and 26 base32 characters (or `n` and a counter, the fallback of a failed
//! generator), account-history entry and consent ids their prefix and 26 RFC 4648 base32
//! characters (128 random bits), an account-history entry of a revocation also `_` and the
//! consent's position (`acc_…_0`: one entry per revoked consent, derived from the call's id).
//! The two alphabets overlap, so an old id can look like a new one; nothing depends on
//! telling them apart.
//!
//! What a new id reveals: the millisecond it was made. For records that is the creation
//! time, which a caller allowed to read the record already gets as `Record.create_time`, an
//! auditor sees on the `CreateRecord` event, and a database administrator reads in
//! `created_at`; a caller holding an id it may not read learns when the record was created
//! and nothing else. The 74 random bits keep ids unguessable (an id is never a credential:
//! every read is authorized by token, grant and purpose).
//!
//! Not ids here: a create's `request_id` and the `x-request-id` header are chosen by the
//! caller (an idempotency key, a correlation id), so they have no shape the vault could
//! check beyond what `edge` checks of all free text.
//!
//! Account-history entries (`AccountEventId`) and consents (`ConsentId`) have types of their
//! own rather than reusing `EventId`: they are rows of other tables (`account_events`,
//! `guardian_consents`) that no audit query reaches, a consent id is sent back by callers
//! (`RevokeGuardianConsent.consent_id`) where an audit event id must be refused, and the
//! ids stored so far carry `acc_`/`con_`. Each revoked consent's history entry gets an id of
//! its own from the generator, no longer the call's id with a suffix.
//!
//! Pure apart from the clock and the OS generator the generator reads. Violation reasons
//! are static text that never repeats the input.

use std::fmt;

use crate::domain::Violation;

/// Lowercase Crockford base32: digits, then letters without i, l, o, u. In ASCII order, so
/// the text of two ids of equal length sorts as their bits do.
const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters of a new id after its prefix: 128 bits in 5-bit groups, the first holding 3.
const NEW_LEN: usize = 26;
/// Characters of an old record id after `rec_` (128 bits, RFC 4648 base32, unpadded).
const OLD_RECORD_LEN: usize = 26;
/// Characters of an old chain or signer id after its prefix (80 bits).
const OLD_SHORT_LEN: usize = 16;
/// Hex digits of the microsecond clock that starts an old event or job id.
const OLD_MICROS_LEN: usize = 13;
/// Digits of the fallback counter an old event or job id may carry instead of randomness.
const OLD_COUNTER_MAX_LEN: usize = 20;

fn refused(field: &str, reason: &'static str) -> Violation {
    Violation::at(field, reason)
}

/// Which shapes an id kind accepted before the common one.
#[derive(Clone, Copy)]
enum Legacy {
    /// 128 random bits, RFC 4648 base32 (record ids).
    Random128,
    /// 80 random bits, RFC 4648 base32 (chain and signer ids).
    Random80,
    /// Microseconds in hex, then 128 random bits or a fallback counter (event and job ids).
    MicrosThenRandom,
    /// 128 random bits, RFC 4648 base32, and for a revocation's entries `_` and a position
    /// (account-history entry ids).
    Random128Derived,
}

fn is_rfc4648_lower(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'2'..=b'7')
}

fn is_new_body(body: &str) -> bool {
    let bytes = body.as_bytes();
    // The first character holds the top 3 bits: anything above 7 would not fit 128 bits.
    bytes.len() == NEW_LEN
        && matches!(bytes[0], b'0'..=b'7')
        && bytes.iter().all(|b| CROCKFORD.contains(b))
}

fn is_legacy_body(body: &str, legacy: Legacy) -> bool {
    match legacy {
        Legacy::Random128 => body.len() == OLD_RECORD_LEN && body.bytes().all(is_rfc4648_lower),
        Legacy::Random80 => body.len() == OLD_SHORT_LEN && body.bytes().all(is_rfc4648_lower),
        Legacy::MicrosThenRandom => {
            if body.len() <= OLD_MICROS_LEN {
                return false;
            }
            let (micros, rest) = body.split_at(OLD_MICROS_LEN);
            let random = rest.len() == OLD_RECORD_LEN && rest.bytes().all(is_rfc4648_lower);
            let counter = rest.strip_prefix('n').is_some_and(|digits| {
                (1..=OLD_COUNTER_MAX_LEN).contains(&digits.len())
                    && digits.bytes().all(|b| b.is_ascii_digit())
            });
            micros
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                && (random || counter)
        }
        Legacy::Random128Derived => {
            let (base, position) = body.split_once('_').unwrap_or((body, "0"));
            is_legacy_body(base, Legacy::Random128)
                && (1..=OLD_COUNTER_MAX_LEN).contains(&position.len())
                && position.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

fn has_shape(raw: &str, prefix: &str, legacy: Legacy) -> bool {
    raw.strip_prefix(prefix)
        .is_some_and(|body| is_new_body(body) || is_legacy_body(body, legacy))
}

/// 26 Crockford characters of a 128-bit value, most significant first (the ULID text form).
fn encode(value: u128) -> String {
    (0..NEW_LEN)
        .rev()
        .map(|group| {
            // Group 25 holds the top 3 bits, every other group 5.
            let index = (value >> (group * 5)) & 0x1f;
            char::from(CROCKFORD[index as usize])
        })
        .collect()
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The one generator: a UUIDv7 of this millisecond and 74 bits from the OS generator, in
/// Crockford base32. Not `Uuid::now_v7()`, which panics when the OS generator fails: a
/// record id that cannot be made is an error the caller reports.
fn fresh(prefix: &str) -> Result<String, getrandom::Error> {
    let mut random = [0u8; 10];
    getrandom::fill(&mut random)?;
    let uuid = uuid::Builder::from_unix_timestamp_millis(unix_millis(), &random).into_uuid();
    Ok(format!("{prefix}{}", encode(uuid.as_u128())))
}

/// As [`fresh`] where an id needs uniqueness, not secrecy (events, chains, signers, jobs):
/// should the OS generator fail, a process-wide counter and the nanoseconds of the clock
/// stand in for the random bits, so writing the trail never stops for want of an id.
fn fresh_unique(prefix: &str) -> String {
    static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    fresh(prefix).unwrap_or_else(|_| {
        let count = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let mut bits = [0u8; 10];
        bits[..8].copy_from_slice(&count.to_be_bytes());
        bits[8..].copy_from_slice(&nanos.to_be_bytes()[2..]);
        let uuid = uuid::Builder::from_unix_timestamp_millis(unix_millis(), &bits).into_uuid();
        format!("{prefix}{}", encode(uuid.as_u128()))
    })
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $legacy:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// What every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// Checks `raw` as the field (or column) `field`: an id of this kind in a shape
            /// this vault issues or issued, or a violation naming `field`.
            pub fn parse(field: &str, raw: &str) -> Result<$name, Violation> {
                if raw.is_empty() {
                    return Err(refused(field, "is required"));
                }
                if has_shape(raw, $prefix, $legacy) {
                    Ok($name(raw.to_owned()))
                } else {
                    Err(refused(field, concat!("is not ", $what, " issued by this vault")))
                }
            }

            /// Whether `raw` has the shape [`Self::parse`] accepts.
            pub fn is_valid(raw: &str) -> bool {
                has_shape(raw, $prefix, $legacy)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(
    /// A record id. Holding one says nothing about whether the record exists; it says the
    /// string is safe to store, log and return.
    RecordId,
    "rec_",
    Legacy::Random128,
    "a record id"
);

id_type!(
    /// An audit event's id.
    EventId,
    "evt_",
    Legacy::MicrosThenRandom,
    "an event id"
);

id_type!(
    /// An audit chain's id: one per vault process, new at every start.
    ChainId,
    "chn_",
    Legacy::Random80,
    "a chain id"
);

id_type!(
    /// A checkpoint signer's id: one per vault instance, kept in its state file.
    SignerId,
    "sgn_",
    Legacy::Random80,
    "a signer id"
);

id_type!(
    /// A rewrap job's id.
    JobId,
    "rwj_",
    Legacy::MicrosThenRandom,
    "a job id"
);

id_type!(
    /// An account-history entry's id (a suspension, reinstatement, consent recorded or
    /// revoked).
    AccountEventId,
    "acc_",
    Legacy::Random128Derived,
    "an account event id"
);

id_type!(
    /// A guardian consent's id. Also bound into the associated data of an inline guardian's
    /// sealed identity (`guardian.<consent id>`), so its text never changes once issued.
    ConsentId,
    "con_",
    Legacy::Random128,
    "a consent id"
);

impl RecordId {
    /// A fresh id: time-ordered, 74 bits from the OS generator, never derived from identity.
    /// Fails when the OS generator does (a record id must be unguessable, so nothing stands
    /// in for it).
    pub fn generate() -> Result<RecordId, getrandom::Error> {
        fresh(RecordId::PREFIX).map(RecordId)
    }
}

impl EventId {
    pub fn generate() -> EventId {
        EventId(fresh_unique(EventId::PREFIX))
    }
}

impl ChainId {
    pub fn generate() -> ChainId {
        ChainId(fresh_unique(ChainId::PREFIX))
    }
}

impl SignerId {
    pub fn generate() -> SignerId {
        SignerId(fresh_unique(SignerId::PREFIX))
    }
}

impl JobId {
    pub fn generate() -> JobId {
        JobId(fresh_unique(JobId::PREFIX))
    }
}

impl AccountEventId {
    pub fn generate() -> AccountEventId {
        AccountEventId(fresh_unique(AccountEventId::PREFIX))
    }
}

impl ConsentId {
    /// Uniqueness, not secrecy: a consent id is returned to the caller and authorizes
    /// nothing (revoking needs the grant and the record).
    pub fn generate() -> ConsentId {
        ConsentId(fresh_unique(ConsentId::PREFIX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ids of the shapes the hand-written generators issued, copied from databases they wrote.
    const OLD_RECORD: &str = "rec_mzxw6ytboi2dcnzrgq3tmojqgq";
    const OLD_EVENT: &str = "evt_0061f2c3a4b5cgezdgnbvgy3tqojqgezdgnbvgy";
    const OLD_EVENT_FALLBACK: &str = "evt_0061f2c3a4b5cn17";
    const OLD_CHAIN: &str = "chn_mfrggzdfmztwq2lk";
    const OLD_SIGNER: &str = "sgn_mfrggzdfmztwq2lk";
    const OLD_JOB: &str = "rwj_0061f2c3a4b5cgezdgnbvgy3tqojqgezdgnbvgy";
    // `acc_`/`con_` and `random_token`'s 26 characters; a revocation's entries add `_<n>`.
    const OLD_ACCOUNT_EVENT: &str = "acc_mzxw6ytboi2dcnzrgq3tmojqgq";
    const OLD_REVOCATION_ENTRY: &str = "acc_mzxw6ytboi2dcnzrgq3tmojqgq_12";
    const OLD_CONSENT: &str = "con_mzxw6ytboi2dcnzrgq3tmojqgq";

    #[test]
    fn old_shapes_still_parse() {
        assert_eq!(
            RecordId::parse("record_id", OLD_RECORD).unwrap().as_str(),
            OLD_RECORD
        );
        assert!(EventId::parse("event_id", OLD_EVENT).is_ok());
        assert!(EventId::parse("event_id", OLD_EVENT_FALLBACK).is_ok());
        assert!(ChainId::parse("chain_id", OLD_CHAIN).is_ok());
        assert!(SignerId::parse("signer_id", OLD_SIGNER).is_ok());
        assert!(JobId::parse("job_id", OLD_JOB).is_ok());
        for old in [OLD_ACCOUNT_EVENT, OLD_REVOCATION_ENTRY] {
            assert_eq!(
                AccountEventId::parse("event_id", old).unwrap().as_str(),
                old
            );
        }
        assert_eq!(
            ConsentId::parse("consent_id", OLD_CONSENT)
                .unwrap()
                .as_str(),
            OLD_CONSENT
        );
    }

    #[test]
    fn account_event_and_consent_ids_keep_to_their_shapes() {
        let entry = AccountEventId::generate();
        assert!(entry.as_str().starts_with("acc_"));
        assert_eq!(
            AccountEventId::parse("event_id", entry.as_str()).unwrap(),
            entry
        );
        let consent = ConsentId::generate();
        assert!(consent.as_str().starts_with("con_"));
        assert_eq!(
            ConsentId::parse("consent_id", consent.as_str()).unwrap(),
            consent
        );
        // Only an old entry takes a position; a consent id never did.
        assert!(AccountEventId::parse("event_id", &format!("{entry}_0")).is_err());
        assert!(ConsentId::parse("consent_id", &format!("{OLD_CONSENT}_0")).is_err());
        for wrong in [
            "acc_mzxw6ytboi2dcnzrgq3tmojqgq_",
            "acc_mzxw6ytboi2dcnzrgq3tmojqgq_x",
            "acc_mzxw6ytboi2dcnzrgq3tmojqgq_1_2",
            "acc_mzxw6ytboi2dcnzrgq3tmojqg_1",
        ] {
            assert!(AccountEventId::parse("event_id", wrong).is_err(), "{wrong}");
        }
        let violation = ConsentId::parse("consent_id", OLD_ACCOUNT_EVENT).unwrap_err();
        assert_eq!(violation.field, "consent_id");
        assert!(AccountEventId::parse("event_id", OLD_CONSENT).is_err());
        assert!(ConsentId::parse("consent_id", OLD_RECORD).is_err());
    }

    #[test]
    fn new_shapes_parse_and_round_trip() {
        let record = RecordId::generate().unwrap();
        assert_eq!(record.as_str().len(), OLD_RECORD.len());
        assert_eq!(
            RecordId::parse("record_id", record.as_str()).unwrap(),
            record
        );
        let event = EventId::generate();
        assert_eq!(EventId::parse("event_id", event.as_str()).unwrap(), event);
        let chain = ChainId::generate();
        assert_eq!(ChainId::parse("chain_id", chain.as_str()).unwrap(), chain);
        let signer = SignerId::generate();
        assert_eq!(
            SignerId::parse("signer_id", signer.as_str()).unwrap(),
            signer
        );
        let job = JobId::generate();
        assert_eq!(JobId::parse("job_id", job.as_str()).unwrap(), job);
        assert_eq!(record.to_string(), record.as_str());
    }

    #[test]
    fn other_strings_are_refused_naming_the_field() {
        let wrong = [
            "",
            "rec_",
            "rec_MZXW6YTBOI2DCNZRGQ3TMOJQGQ",
            "rec_mzxw6ytboi2dcnzrgq3tmojqg",
            "rec_mzxw6ytboi2dcnzrgq3tmojqgqq",
            // Crockford leaves out i, l, o, u; RFC 4648 leaves out 0, 1, 8, 9: mixing both
            // alphabets is neither.
            "rec_01mzxw6ytboi2dcnzrgq3tmoab",
            // The first character of a 128-bit value is at most 7.
            "rec_8zzzzzzzzzzzzzzzzzzzzzzzzz",
            "evt_mzxw6ytboi2dcnzrgq3tmojqgq",
            " rec_mzxw6ytboi2dcnzrgq3tmojqgq",
            "11010519491231002X",
        ];
        for raw in wrong {
            let violation = RecordId::parse("guardian_record_id", raw).unwrap_err();
            assert_eq!(violation.field, "guardian_record_id", "{raw:?}");
            assert!(!violation.reason.contains(raw) || raw.is_empty(), "{raw:?}");
        }
        assert_eq!(
            RecordId::parse("record_id", "").unwrap_err().reason,
            "is required"
        );
        assert!(EventId::parse("event_id", OLD_RECORD).is_err());
        assert!(ChainId::parse("chain_id", OLD_RECORD).is_err());
        assert!(JobId::parse("job_id", OLD_EVENT).is_err());
        assert!(EventId::parse("event_id", "evt_0061f2c3a4b5cn").is_err());
        assert!(EventId::parse("event_id", "evt_0061F2C3A4B5Cn17").is_err());
    }

    #[test]
    fn ids_sort_by_the_millisecond_they_were_made() {
        let mut made = Vec::new();
        for _ in 0..5 {
            made.push((
                RecordId::generate().unwrap(),
                EventId::generate(),
                JobId::generate(),
            ));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for pair in made.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} {}", pair[0].0, pair[1].0);
            assert!(pair[0].1 < pair[1].1, "{} {}", pair[0].1, pair[1].1);
            assert!(pair[0].2 < pair[1].2, "{} {}", pair[0].2, pair[1].2);
        }
    }

    #[test]
    fn the_text_is_the_ulid_of_a_uuid_v7() {
        let uuid =
            uuid::Builder::from_unix_timestamp_millis(1_700_000_000_000, &[0xff; 10]).into_uuid();
        assert_eq!(uuid.get_version_num(), 7);
        // 1_700_000_000_000 ms is 0x018bcfe56800: ULID text 01hf7yat00, then the bits.
        let text = encode(uuid.as_u128());
        assert_eq!(&text[..10], "01hf7yat00");
        assert_eq!(text.len(), NEW_LEN);
        assert_eq!(encode(0), "0".repeat(NEW_LEN));
        assert_eq!(encode(u128::MAX), format!("7{}", "z".repeat(NEW_LEN - 1)));
        // Order of values is order of text.
        assert!(encode(41) < encode(42) && encode(u128::MAX - 1) < encode(u128::MAX));
    }

    #[test]
    fn random_bits_differ_within_a_millisecond() {
        let a = RecordId::generate().unwrap();
        let b = RecordId::generate().unwrap();
        assert_ne!(a, b);
    }
}
