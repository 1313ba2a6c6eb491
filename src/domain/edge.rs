//! Request strings, checked once where they enter: record ids, purposes, free text (the
//! justification, reasons, evidence and ticket references, notes) and the request's
//! correlation headers (`x-request-id`, `traceparent`).
//!
//! Everything a caller sends that can reach an audit event, a log line, an error message or
//! a database row passes through here first and comes out as a type that says it was
//! checked ([`RecordId`], [`FreeText`]) or as a [`Violation`] naming the field. The rules are
//! the same everywhere: a byte limit per field (the trail is kept for years, so its rows must
//! be bounded), valid text, and no control, format (bidi overrides, zero-width characters),
//! separator-line, private-use or unassigned code points, which could hide text from the
//! person later shown it or break the database that stores it (PostgreSQL refuses NUL).
//!
//! Refused requests are audited too, but only with values checked here: [`audit_record_id`]
//! and [`audit_purpose`] turn what a caller sent into what the trail may hold (the value
//! when it has the right shape, otherwise a fixed placeholder with its length), so an
//! identity value sent in the wrong field never lands in the trail.
//!
//! Pure: no I/O, no clock. Violation reasons are static text that never repeats the input.

use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use crate::domain::Violation;

/// Record ids are `rec_` and 26 lowercase base32 characters (128 random bits).
pub const RECORD_ID_PREFIX: &str = "rec_";
const RECORD_ID_RANDOM_LEN: usize = 26;
/// Purpose names: configured, short identifiers.
pub const MAX_PURPOSE_BYTES: usize = 64;
/// A justification or a reason: a legal basis or a ticket-like reference, never prose.
pub const MAX_JUSTIFICATION_BYTES: usize = 512;
/// References: evidence, tickets, consent ids, create request ids.
pub const MAX_REFERENCE_BYTES: usize = 128;
/// Privacy-policy version names.
pub const MAX_POLICY_VERSION_BYTES: usize = 64;
/// Staff notes (sealed under the record's key, never in the trail).
pub const MAX_NOTE_BYTES: usize = 2048;
/// Filters of audit queries that name a caller or an outcome.
pub const MAX_FILTER_BYTES: usize = 128;
/// A justification that a purpose requires must have at least this many visible characters:
/// a zero-width space or a lone dot is not a legal basis.
pub const MIN_JUSTIFICATION_CHARS: usize = 4;
/// `x-request-id`: printable ASCII, at most this long.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// `traceparent`: far longer than any version of the format needs.
const MAX_TRACEPARENT_BYTES: usize = 256;

fn violation(field: &str, reason: &'static str) -> Violation {
    Violation::at(field, reason)
}

/// A record id of the shape this vault issues. Holding one says nothing about whether the
/// record exists; it says the string is safe to store, log and return.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(String);

impl RecordId {
    /// Checks `raw` as the request field `field`.
    pub fn parse(field: &str, raw: &str) -> Result<RecordId, Violation> {
        if raw.is_empty() {
            return Err(violation(field, "is required"));
        }
        if is_record_id(raw) {
            Ok(RecordId(raw.to_owned()))
        } else {
            Err(violation(field, "is not a record id issued by this vault"))
        }
    }

    /// A fresh random id: 128 bits from the OS generator, never derived from identity.
    pub fn generate() -> Result<RecordId, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let random = data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase();
        Ok(RecordId(format!("{RECORD_ID_PREFIX}{random}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_record_id(raw: &str) -> bool {
    raw.strip_prefix(RECORD_ID_PREFIX).is_some_and(|rest| {
        rest.len() == RECORD_ID_RANDOM_LEN
            && rest.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'))
    })
}

/// What the trail may hold for a record id a caller sent: the id when it has the shape of
/// one, otherwise a placeholder that keeps only its length.
pub fn audit_record_id(raw: &str) -> String {
    if is_record_id(raw) {
        raw.to_owned()
    } else {
        placeholder("malformed record id", raw.len())
    }
}

/// What the trail may hold for a purpose a caller named: the name when it is a configured
/// purpose (`known`), otherwise a placeholder with its length; `None` when none was named.
pub fn audit_purpose(raw: &str, known: bool) -> Option<String> {
    if raw.is_empty() {
        None
    } else if known {
        Some(raw.to_owned())
    } else {
        Some(placeholder("unknown purpose", raw.len()))
    }
}

/// A stand-in for a value the trail must not hold: what it was and how many bytes it had.
/// The parentheses keep it from ever looking like a record id or a configured name.
pub fn placeholder(what: &str, len: usize) -> String {
    format!("({what}, {len} bytes)")
}

/// Free text that passed the checks: bounded, printable, no hidden characters. Empty is
/// allowed (the field was not given); [`FreeText::required`] asks for visible text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreeText(String);

impl FreeText {
    pub fn parse(field: &str, raw: &str, max_bytes: usize) -> Result<FreeText, Violation> {
        check_text(field, raw, max_bytes)?;
        Ok(FreeText(raw.to_owned()))
    }

    /// As [`FreeText::parse`], and at least `min_visible` characters that are not spaces.
    pub fn required(
        field: &str,
        raw: &str,
        max_bytes: usize,
        min_visible: usize,
    ) -> Result<FreeText, Violation> {
        let text = FreeText::parse(field, raw, max_bytes)?;
        if visible_chars(raw) == 0 {
            return Err(violation(field, "is required"));
        }
        if visible_chars(raw) < min_visible {
            return Err(Violation::bounded(
                field,
                "must have at least {limit} visible characters",
                min_visible as u64,
            ));
        }
        Ok(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `None` when empty, as optional columns store it.
    pub fn non_empty(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.clone())
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The rules every free-text field follows. A string that passes can be stored in either
/// database, written to a log line and shown to a person without hiding anything.
pub fn check_text(field: &str, raw: &str, max_bytes: usize) -> Result<(), Violation> {
    if raw.len() > max_bytes {
        return Err(Violation::bounded(
            field,
            "must be at most {limit} bytes",
            max_bytes as u64,
        ));
    }
    if let Some(reason) = raw.chars().find_map(hidden_character) {
        return Err(violation(field, reason));
    }
    Ok(())
}

/// Why `c` may not appear in request text, if it may not.
fn hidden_character(c: char) -> Option<&'static str> {
    match c.general_category() {
        GeneralCategory::Control => Some("must not contain control characters"),
        GeneralCategory::Format => Some(
            "must not contain invisible formatting characters (bidi controls, zero-width characters)",
        ),
        GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
            Some("must not contain line or paragraph separators")
        }
        _ if c.general_category_group() == GeneralCategoryGroup::Other => {
            Some("must not contain private-use or unassigned characters")
        }
        _ => None,
    }
}

/// Characters a reader sees: not spaces (the hidden ones are refused before this counts).
pub fn visible_chars(raw: &str) -> usize {
    raw.chars().filter(|c| !c.is_whitespace()).count()
}

/// Checks a client's `x-request-id`: printable ASCII without spaces, at most
/// [`MAX_REQUEST_ID_BYTES`].
pub fn check_request_id(raw: &[u8]) -> Result<(), Violation> {
    if !raw.is_empty() && raw.len() <= MAX_REQUEST_ID_BYTES && raw.iter().all(u8::is_ascii_graphic)
    {
        Ok(())
    } else {
        Err(request_id_violation())
    }
}

/// What a refused `x-request-id` is told.
pub fn request_id_violation() -> Violation {
    violation(
        "x-request-id",
        "must be 1 to 128 printable ASCII characters without spaces",
    )
}

/// The trace id of a W3C `traceparent` (`version-traceid-parentid-flags`), lowercase.
pub fn parse_traceparent(raw: &[u8]) -> Result<String, Violation> {
    let refused = || violation("traceparent", "is not a W3C trace context traceparent");
    if raw.len() > MAX_TRACEPARENT_BYTES {
        return Err(refused());
    }
    let text = std::str::from_utf8(raw).map_err(|_| refused())?;
    let mut parts = text.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused());
    };
    // Version 00 has exactly four parts; later versions may append more.
    let more = parts.next().is_some();
    let hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let zero = |part: &str| part.bytes().all(|b| b == b'0');
    let well_formed = hex(version, 2)
        && version != "ff"
        && !(version == "00" && more)
        && hex(trace_id, 32)
        && !zero(trace_id)
        && hex(parent_id, 16)
        && !zero(parent_id)
        && hex(flags, 2);
    if well_formed {
        Ok(trace_id.to_owned())
    } else {
        Err(refused())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_have_one_shape() {
        let id = RecordId::generate().unwrap();
        assert_eq!(RecordId::parse("record_id", id.as_str()).unwrap(), id);
        assert_ne!(RecordId::generate().unwrap(), id);
        for bad in [
            "",
            "rec_",
            "rec_AAAAAAAAAAAAAAAAAAAAAAAAAA",
            "rec_aaaaaaaaaaaaaaaaaaaaaaaaa",
            "rec_aaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "rec_aaaaaaaaaaaaaaaaaaaaaaaaa\0",
            "11010519491231002X",
        ] {
            let refused = RecordId::parse("record_id", bad).unwrap_err();
            assert_eq!(refused.field, "record_id");
            assert!(!bad.is_empty() || refused.reason == "is required");
        }
    }

    #[test]
    fn the_trail_keeps_record_ids_and_known_purposes_and_only_the_length_of_the_rest() {
        let id = RecordId::generate().unwrap();
        assert_eq!(audit_record_id(id.as_str()), id.as_str());
        let sent = "11010519491231002X";
        let kept = audit_record_id(sent);
        assert_eq!(kept, "(malformed record id, 18 bytes)");
        assert!(!kept.contains("1101"));
        assert_eq!(audit_purpose("", false), None);
        assert_eq!(
            audit_purpose("customer-support", true).unwrap(),
            "customer-support"
        );
        assert_eq!(
            audit_purpose(sent, false).unwrap(),
            "(unknown purpose, 18 bytes)"
        );
    }

    #[test]
    fn free_text_is_bounded_in_bytes_and_hides_nothing() {
        assert!(FreeText::parse("note", "用户来电称账号被盗", 64).is_ok());
        assert!(FreeText::parse("note", "", 64).unwrap().is_empty());
        // 22 CJK characters are 66 bytes.
        let long = "用".repeat(22);
        let refused = FreeText::parse("note", &long, 64).unwrap_err();
        assert_eq!(refused.description(), "must be at most 64 bytes");
        assert_eq!(
            (refused.reason, refused.limit),
            ("must be at most {limit} bytes", Some(64))
        );
        for hidden in [
            "a\0b",
            "line\nbreak",
            "tab\there",
            "\u{7f}",
            "\u{202e}gnp.exe",
            "\u{2066}isolate",
            "zero\u{200b}width",
            "\u{feff}bom",
            "soft\u{ad}hyphen",
            "\u{2028}",
            "\u{2029}",
            "\u{e000}",
            "\u{fffe}",
            "\u{10ffff}",
        ] {
            let refused = FreeText::parse("justification", hidden, 512).unwrap_err();
            assert_eq!(refused.field, "justification", "{hidden:?}");
            assert!(!refused.reason.contains(hidden), "{hidden:?}");
        }
    }

    #[test]
    fn a_required_justification_needs_visible_text() {
        let min = MIN_JUSTIFICATION_CHARS;
        let check = |raw: &str| FreeText::required("justification", raw, 512, min);
        assert!(check("(2026)京0105刑初123号").is_ok());
        assert!(check("R-42").is_ok());
        assert_eq!(check("").unwrap_err().reason, "is required");
        assert_eq!(check("   ").unwrap_err().reason, "is required");
        assert!(
            check("a b c")
                .unwrap_err()
                .description()
                .contains("at least 4")
        );
        assert!(check("\u{200b}").is_err());
        assert!(check("\u{202e}abcd").is_err());
    }

    #[test]
    fn request_ids_and_trace_context_have_their_formats() {
        assert!(check_request_id(b"req-42").is_ok());
        assert!(check_request_id(b"").is_err());
        assert!(check_request_id(b"a b").is_err());
        assert!(check_request_id("\u{e9}".as_bytes()).is_err());
        assert!(check_request_id(&[b'a'; 129]).is_err());
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(parent.as_bytes()).unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent(future.as_bytes()).is_ok());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473\0-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
