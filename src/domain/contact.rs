//! Contact details: phone number, email address and postal code.
//!
//! Phone numbers go through the libphonenumber metadata (the `phonenumber` crate) because
//! mainland number plans change and hand-written patterns rot; but the crate has panicked on
//! malformed input in the past, so it is only ever handed a string this module has already
//! reduced to "+86" followed by a bounded run of ASCII digits. The service only serves
//! mainland China, so anything that is not a valid mainland mobile or landline is rejected.

use std::fmt;
use std::sync::LazyLock;

use email_address::EmailAddress;
use phonenumber::metadata::{Descriptor, Descriptors};
use phonenumber::{Type, country, metadata::DATABASE};

use super::{Reason, clean_text};

/// Generous for "+86 (0771) 1234-5678"-style formatting, small enough to bound the work.
const MAX_PHONE_CHARS: usize = 32;
/// No mainland national significant number is longer than this.
const MAX_NATIONAL_DIGITS: usize = 12;
/// RFC 5321 path limit minus the angle brackets.
const MAX_EMAIL_CHARS: usize = 254;

const NOT_MAINLAND: Reason = "must be a mainland China (+86) number";
const NOT_VALID_PHONE: Reason = "is not a valid mainland China phone number";

/// A validated mainland China mobile or landline number, held in E.164 form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber {
    e164: String,
    mobile: bool,
}

impl PhoneNumber {
    /// Accepts `+86…`, `0086…` or a bare national number (landlines with or without the
    /// leading trunk 0), with spaces, `-`, `(` and `)` as separators.
    pub fn parse(raw: &str) -> Result<PhoneNumber, &'static str> {
        PhoneNumber::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<PhoneNumber, Reason> {
        let text = clean_text(raw, MAX_PHONE_CHARS, "is too long")?;
        let national = national_digits(&text)?;
        let parsed = phonenumber::parse(Some(country::Id::CN), format!("+86{national}"))
            .map_err(|_| NOT_VALID_PHONE)?;
        if parsed.code().value() != 86 || parsed.country().id() != Some(country::Id::CN) {
            return Err(NOT_MAINLAND);
        }
        if parsed.extension().is_some() {
            return Err("must not have an extension");
        }
        // `is_valid` is "the type is not Unknown", over the national number with its leading
        // zeros. A mainland number has none once its trunk 0 is gone, and then the type
        // computed here decides it: the library's pattern tables (most of a create's CPU,
        // BENCHMARKS.md) are walked once instead of twice.
        let kind = match MAINLAND_TYPES.as_ref() {
            Some(types) => types.number_type(&parsed.national().value().to_string()),
            None => parsed.number_type(&DATABASE),
        };
        let valid = if parsed.national().zeros() == 0 {
            kind != Type::Unknown
        } else {
            parsed.is_valid()
        };
        if !valid {
            return Err(NOT_VALID_PHONE);
        }
        let mobile = match kind {
            Type::Mobile => true,
            Type::FixedLine => false,
            // Overlapping patterns; mainland mobiles are exactly the numbers starting with 1.
            Type::FixedLineOrMobile => national.starts_with('1'),
            _ => return Err("must be a mobile or landline number"),
        };
        if mobile && !is_mainland_mobile(&national) {
            return Err("mobile numbers must be 11 digits starting with 13 to 19");
        }
        // Formatting happens only now that the number is known valid.
        // E.164 is `+`, the country code and the national number (the library's formatter
        // writes exactly that, after looking up display patterns E.164 does not use).
        let e164 = format!("+{}{}", parsed.code().value(), parsed.national());
        if e164.strip_prefix("+86") != Some(national.as_str()) {
            return Err(NOT_VALID_PHONE);
        }
        Ok(PhoneNumber { e164, mobile })
    }

    /// Canonical form, e.g. `+8613812345678`.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    pub fn is_mobile(&self) -> bool {
        self.mobile
    }
}

impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhoneNumber(<redacted>)")
    }
}

/// The mainland's number types, decided as the library's `number_type` decides them: the
/// same CN descriptors from its metadata, in the same order, matched by the same rule
/// (possible length, then a match starting at the first digit), over regexes compiled once
/// here. The library looks each pattern up in one mutex-guarded LRU cache keyed by the
/// pattern's text on every match, which made the type check about a tenth of a batch
/// create's CPU (BENCHMARKS.md). `None` (a pattern this build of `regex` cannot compile):
/// the library decides, as before.
static MAINLAND_TYPES: LazyLock<Option<MainlandTypes>> = LazyLock::new(MainlandTypes::load);

struct MainlandTypes {
    general: Matcher,
    /// Checked in this order before the fixed-line and mobile ones, as the library does.
    special: Vec<(Type, Matcher)>,
    fixed_line: Option<Matcher>,
    mobile: Option<Matcher>,
    /// The library calls a number FixedLineOrMobile when both descriptors have one pattern.
    same_fixed_and_mobile: bool,
}

struct Matcher {
    regex: regex::Regex,
    possible_length: Vec<u16>,
}

impl Matcher {
    fn compile(descriptor: &Descriptor) -> Option<Matcher> {
        let regex = regex::RegexBuilder::new(descriptor.national_number().as_str())
            .ignore_whitespace(true)
            .build()
            .ok()?;
        Some(Matcher {
            regex,
            possible_length: descriptor.possible_length().to_vec(),
        })
    }

    /// `phonenumber::metadata::Descriptor::is_match`, without the cache.
    fn is_match(&self, value: &str) -> bool {
        let length_ok = self.possible_length.is_empty()
            || u16::try_from(value.len()).is_ok_and(|len| self.possible_length.contains(&len));
        length_ok
            && self
                .regex
                .find(value)
                .is_some_and(|found| found.start() == 0)
    }
}

impl MainlandTypes {
    fn load() -> Option<MainlandTypes> {
        let metadata = DATABASE.by_id("CN")?;
        let descriptors: &Descriptors = metadata.descriptors();
        let optional = |descriptor: Option<&Descriptor>| match descriptor {
            Some(descriptor) => Matcher::compile(descriptor).map(Some),
            None => Some(None),
        };
        let mut special = Vec::new();
        for (kind, descriptor) in [
            (Type::PremiumRate, descriptors.premium_rate()),
            (Type::TollFree, descriptors.toll_free()),
            (Type::SharedCost, descriptors.shared_cost()),
            (Type::Voip, descriptors.voip()),
            (Type::PersonalNumber, descriptors.personal_number()),
            (Type::Pager, descriptors.pager()),
            (Type::Uan, descriptors.uan()),
            (Type::Voicemail, descriptors.voicemail()),
        ] {
            if let Some(matcher) = optional(descriptor)? {
                special.push((kind, matcher));
            }
        }
        let pattern = |d: Option<&Descriptor>| d.map(|d| d.national_number().as_str().to_owned());
        Some(MainlandTypes {
            general: Matcher::compile(descriptors.general())?,
            special,
            fixed_line: optional(descriptors.fixed_line())?,
            mobile: optional(descriptors.mobile())?,
            same_fixed_and_mobile: pattern(descriptors.fixed_line())
                == pattern(descriptors.mobile()),
        })
    }

    /// `phonenumber::validator::number_type` for a mainland national number.
    fn number_type(&self, national: &str) -> Type {
        let matches =
            |matcher: &Option<Matcher>| matcher.as_ref().is_some_and(|m| m.is_match(national));
        if !self.general.is_match(national) {
            return Type::Unknown;
        }
        if let Some((kind, _)) = self.special.iter().find(|(_, m)| m.is_match(national)) {
            return *kind;
        }
        if matches(&self.fixed_line) {
            return if self.same_fixed_and_mobile || matches(&self.mobile) {
                Type::FixedLineOrMobile
            } else {
                Type::FixedLine
            };
        }
        if matches(&self.mobile) {
            return Type::Mobile;
        }
        Type::Unknown
    }
}

/// Reduces the accepted notations to the national significant number (no trunk 0), so the
/// phone library only ever sees digits.
fn national_digits(text: &str) -> Result<String, Reason> {
    let (international, rest) = match text.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let mut digits = String::new();
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '(' | ')' => {}
            _ => return Err("must contain only digits, spaces, '-', '(', ')' and a leading '+'"),
        }
    }
    let national = if international {
        digits.strip_prefix("86").ok_or(NOT_MAINLAND)?
    } else {
        digits.strip_prefix("0086").unwrap_or(&digits)
    };
    // The mainland trunk prefix; people write it even after +86.
    let national = national.strip_prefix('0').unwrap_or(national);
    if national.is_empty() {
        Err("must contain a phone number")
    } else if national.len() > MAX_NATIONAL_DIGITS {
        Err("has too many digits")
    } else {
        Ok(national.to_owned())
    }
}

/// `1[3-9]` followed by 9 digits.
fn is_mainland_mobile(national: &str) -> bool {
    let bytes = national.as_bytes();
    bytes.len() == 11
        && bytes.iter().all(u8::is_ascii_digit)
        && matches!(bytes, [b'1', b'3'..=b'9', ..])
}

/// A syntactically valid email address with its domain lower-cased.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, &'static str> {
        Email::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<Email, Reason> {
        let text = clean_text(raw, MAX_EMAIL_CHARS, "must be at most 254 characters")?;
        let options = email_address::Options::default()
            .with_required_tld()
            .without_domain_literal()
            .without_display_text();
        EmailAddress::parse_with_options(&text, options).map_err(email_reason)?;
        let (local, domain) = text.rsplit_once('@').ok_or("must contain '@'")?;
        // Domains are case-insensitive, local parts are not (RFC 5321 section 2.4). ASCII
        // folding keeps the length unchanged and is idempotent, unlike full Unicode folding.
        Ok(Email(format!("{local}@{}", domain.to_ascii_lowercase())))
    }

    /// Canonical form: the address with its domain lower-cased.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Email(<redacted>)")
    }
}

/// The crate's own messages are not used: our reasons must stay static and value-free.
fn email_reason(error: email_address::Error) -> Reason {
    use email_address::Error as E;
    match error {
        E::MissingSeparator => "must contain '@'",
        E::LocalPartEmpty => "must have a part before '@'",
        E::LocalPartTooLong => "the part before '@' must be at most 64 characters",
        E::DomainEmpty => "must have a domain after '@'",
        E::DomainTooLong | E::SubDomainTooLong => "the domain is too long",
        E::DomainTooFew => "the domain must have at least two labels, e.g. example.com",
        E::SubDomainEmpty | E::DomainInvalidSeparator => "the domain has an empty label",
        E::UnsupportedDomainLiteral | E::InvalidIPAddress => "IP-address domains are not accepted",
        E::UnsupportedDisplayName | E::MissingDisplayName | E::MissingEndBracket => {
            "must be a bare address without a display name"
        }
        E::InvalidCharacter => "contains a character not allowed in an email address",
        _ => "is not a valid email address",
    }
}

/// A mainland postal code: six ASCII digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PostalCode(String);

impl PostalCode {
    pub fn parse(raw: &str) -> Result<PostalCode, &'static str> {
        PostalCode::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<PostalCode, Reason> {
        let text = raw.trim();
        if text.len() == 6 && text.bytes().all(|b| b.is_ascii_digit()) {
            Ok(PostalCode(text.to_owned()))
        } else {
            Err("must be 6 digits")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PostalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PostalCode(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn phone(raw: &str) -> Result<(String, bool), Reason> {
        PhoneNumber::parse_reason(raw).map(|p| (p.e164().to_owned(), p.is_mobile()))
    }

    /// The compiled mainland types decide exactly as the library's own `number_type`, over
    /// national numbers of 7 to 12 digits with every two-digit start (10 to 99) and 40
    /// pseudo-random tails each: mobiles, landlines of every area-code shape, service
    /// numbers and invalid ones.
    #[test]
    fn compiled_mainland_types_agree_with_the_library() {
        let Some(types) = MAINLAND_TYPES.as_ref() else {
            panic!("the CN descriptors must compile");
        };
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_digit = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            char::from(b'0' + u8::try_from((state >> 33) % 10).unwrap_or(0))
        };
        let mut checked = 0;
        let mut kinds = std::collections::HashSet::new();
        for prefix in 10..100u32 {
            for length in 7..=12 {
                for _ in 0..40 {
                    let mut national = prefix.to_string();
                    while national.len() < length {
                        national.push(next_digit());
                    }
                    let Ok(parsed) =
                        phonenumber::parse(Some(country::Id::CN), format!("+86{national}"))
                    else {
                        continue;
                    };
                    if parsed.country().id() != Some(country::Id::CN) {
                        continue;
                    }
                    let value = parsed.national().value().to_string();
                    let library = parsed.number_type(&DATABASE);
                    assert_eq!(types.number_type(&value), library, "{national}");
                    kinds.insert(format!("{library:?}"));
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000, "only {checked} numbers compared");
        for kind in ["Mobile", "FixedLine", "Unknown"] {
            assert!(
                kinds.contains(kind),
                "no {kind} number among those compared: {kinds:?}"
            );
        }
    }

    #[test]
    fn mobile_numbers_in_every_accepted_notation() {
        for raw in [
            "13812345678",
            "+8613812345678",
            "008613812345678",
            "+86 138 1234 5678",
            "0086 138-1234-5678",
            " 138 1234 5678 ",
        ] {
            assert_eq!(phone(raw), Ok(("+8613812345678".to_owned(), true)), "{raw}");
        }
        for raw in ["19912345678", "16612345678", "17012345678", "15012345678"] {
            assert!(phone(raw).is_ok_and(|(_, mobile)| mobile), "{raw}");
        }
    }

    #[test]
    fn landlines_with_or_without_trunk_zero() {
        for raw in [
            "010-62345678",
            "(010) 6234 5678",
            "+86 10 6234 5678",
            "+86 010 62345678",
        ] {
            assert_eq!(phone(raw), Ok(("+861062345678".to_owned(), false)), "{raw}");
        }
        assert_eq!(
            phone("0771-5601234"),
            Ok(("+867715601234".to_owned(), false))
        );
        assert_eq!(
            phone("0771-56012345"),
            Ok(("+8677156012345".to_owned(), false))
        );
        assert_eq!(
            phone("020-87654321"),
            Ok(("+862087654321".to_owned(), false))
        );
    }

    #[test]
    fn foreign_numbers_are_rejected() {
        for raw in [
            "+1 650 253 0000",
            "+852 9123 4567",
            "+853 6612 3456",
            "+886 912 345 678",
        ] {
            assert_eq!(phone(raw), Err(NOT_MAINLAND), "{raw}");
        }
    }

    #[test]
    fn non_numbers_and_unusable_numbers_are_rejected() {
        assert_eq!(
            phone("138abcd5678"),
            Err("must contain only digits, spaces, '-', '(', ')' and a leading '+'")
        );
        assert_eq!(
            phone("138\u{FF11}2345678"),
            Err("must contain only digits, spaces, '-', '(', ')' and a leading '+'")
        );
        assert_eq!(
            phone("+8613812345678 ext. 12"),
            Err("must contain only digits, spaces, '-', '(', ')' and a leading '+'")
        );
        assert!(phone("1+3812345678").is_err());
        assert_eq!(phone("+86"), Err("must contain a phone number"));
        assert_eq!(phone("0"), Err("must contain a phone number"));
        assert_eq!(phone("1381234567812345"), Err("has too many digits"));
        assert_eq!(phone("12345"), Err(NOT_VALID_PHONE));
        assert_eq!(phone("110"), Err(NOT_VALID_PHONE));
        assert_eq!(phone("11012345678"), Err(NOT_VALID_PHONE));
        assert_eq!(phone("1381234567"), Err(NOT_VALID_PHONE));
        assert_eq!(
            phone("4001234567"),
            Err("must be a mobile or landline number")
        );
        assert_eq!(phone(&"1".repeat(33)), Err("is too long"));
        assert_eq!(phone(""), Err("must not be empty"));
        assert_eq!(
            phone("138\n12345678"),
            Err("must not contain control characters")
        );
    }

    #[test]
    fn mobile_rule_requires_13_to_19() {
        assert!(is_mainland_mobile("13812345678"));
        assert!(is_mainland_mobile("19912345678"));
        assert!(!is_mainland_mobile("12812345678"));
        assert!(!is_mainland_mobile("1381234567"));
        assert!(!is_mainland_mobile("138123456789"));
    }

    #[test]
    fn phone_public_api_and_debug() {
        let p = PhoneNumber::parse("13812345678").unwrap();
        assert_eq!(p.e164(), "+8613812345678");
        assert_eq!(format!("{p:?}"), "PhoneNumber(<redacted>)");
        assert_eq!(
            PhoneNumber::parse("+1 650 253 0000").unwrap_err(),
            NOT_MAINLAND
        );
    }

    #[test]
    fn email_lowercases_the_domain_only() {
        let e = Email::parse("  ZhangSan@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "ZhangSan@example.com");
        assert_eq!(format!("{e:?}"), "Email(<redacted>)");
        assert!(Email::parse("张三@例子.中国").is_ok());
    }

    #[test]
    fn email_rejections_have_specific_value_free_reasons() {
        let reason = |raw: &str| Email::parse_reason(raw).map(|e| e.as_str().to_owned());
        assert_eq!(reason("zhangsan.example.com"), Err("must contain '@'"));
        assert_eq!(reason("@example.com"), Err("must have a part before '@'"));
        assert_eq!(reason("zhangsan@"), Err("must have a domain after '@'"));
        assert_eq!(
            reason("zhangsan@localhost"),
            Err("the domain must have at least two labels, e.g. example.com")
        );
        assert_eq!(
            reason("zhangsan@[127.0.0.1]"),
            Err("IP-address domains are not accepted")
        );
        assert_eq!(
            reason("Zhang San <zhangsan@example.com>"),
            Err("must be a bare address without a display name")
        );
        assert_eq!(
            reason("zhang san@example.com"),
            Err("contains a character not allowed in an email address")
        );
        assert_eq!(
            reason(&format!("{}@example.com", "a".repeat(65))),
            Err("the part before '@' must be at most 64 characters")
        );
        let long = format!("{}@{}.com", "a".repeat(60), "b".repeat(190));
        assert_eq!(reason(&long), Err("must be at most 254 characters"));
        assert_eq!(
            reason("a\u{0}b@example.com"),
            Err("must not contain control characters")
        );
    }

    #[test]
    fn postal_codes_are_six_ascii_digits() {
        assert_eq!(PostalCode::parse(" 530022 ").unwrap().as_str(), "530022");
        for bad in ["53002", "5300222", "53002a", "５３００２２", "530 022", ""] {
            assert_eq!(
                PostalCode::parse(bad).unwrap_err(),
                "must be 6 digits",
                "{bad}"
            );
        }
        assert_eq!(
            format!("{:?}", PostalCode::parse("530022").unwrap()),
            "PostalCode(<redacted>)"
        );
    }

    proptest! {
        #[test]
        fn any_string_is_handled_without_panicking(raw in any::<String>()) {
            for reason in [
                PhoneNumber::parse_reason(&raw).err(),
                Email::parse_reason(&raw).err(),
                PostalCode::parse_reason(&raw).err(),
            ].into_iter().flatten() {
                let raw = raw.trim();
                if raw.chars().count() >= 4 {
                    prop_assert!(!reason.contains(raw));
                }
            }
        }

        #[test]
        fn phone_shaped_strings_are_handled_without_panicking(raw in "[+]?[0-9 ()#:*-]{0,30}") {
            if let Ok(p) = PhoneNumber::parse_reason(&raw) {
                prop_assert!(p.e164().starts_with("+86"));
                prop_assert_eq!(PhoneNumber::parse_reason(p.e164()), Ok(p.clone()));
            }
        }

        #[test]
        fn notations_of_one_mobile_number_agree(national in "1[3-9][0-9]{9}") {
            let bare = PhoneNumber::parse_reason(&national);
            prop_assert_eq!(&PhoneNumber::parse_reason(&format!("+86{national}")), &bare);
            prop_assert_eq!(&PhoneNumber::parse_reason(&format!("0086 {national}")), &bare);
            if let Ok(p) = bare {
                prop_assert_eq!(p.e164(), format!("+86{national}"));
                prop_assert!(p.is_mobile());
            }
        }

        #[test]
        fn email_canonical_form_is_a_fixed_point(
            local in "[A-Za-z0-9._%+-]{1,20}",
            domain in "[A-Za-z0-9]{1,10}\\.[A-Za-z]{2,6}",
        ) {
            let raw = format!("{local}@{domain}");
            if let Ok(e) = Email::parse_reason(&raw) {
                prop_assert_eq!(e.as_str(), format!("{local}@{}", domain.to_ascii_lowercase()));
                prop_assert_eq!(Email::parse_reason(e.as_str()), Ok(e.clone()));
            }
        }

        #[test]
        fn every_six_digit_string_is_a_postal_code(code in "[0-9]{6}") {
            prop_assert_eq!(PostalCode::parse(&code).map(|p| p.as_str().to_owned()), Ok(code));
        }
    }
}
