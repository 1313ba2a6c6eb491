//! Personal attributes that are not document numbers: name, address, nationality and the
//! stated date of birth.
//!
//! Names are accepted in any script because the app serves ethnic-minority citizens
//! (transliterated names joined by "·") and foreign residents; the allowed punctuation is the
//! small set that real names use, so that markup, digits and injection payloads are refused.

use std::fmt;

use chrono::NaiveDate;
use isocountry::CountryCode;

use super::{Reason, check_birth_date, clean_text};

const MAX_NAME_CHARS: usize = 64;
const MAX_ADDRESS_CHARS: usize = 256;

/// A person's name, trimmed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PersonName(String);

impl PersonName {
    pub fn parse(raw: &str) -> Result<PersonName, &'static str> {
        PersonName::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<PersonName, Reason> {
        let name = clean_text(raw, MAX_NAME_CHARS, "must be at most 64 characters")?;
        if name.chars().any(char::is_numeric) {
            return Err("must not contain digits");
        }
        if !name.chars().all(is_name_char) {
            return Err("may contain only letters, spaces and the marks · • . - '");
        }
        if !name.chars().any(char::is_alphabetic) {
            return Err("must contain a letter");
        }
        Ok(PersonName(name.into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Letters of any script, plus the separators used in transliterated and Western names.
fn is_name_char(c: char) -> bool {
    c.is_alphabetic() || matches!(c, ' ' | '\u{00B7}' | '\u{2022}' | '.' | '-' | '\'')
}

impl fmt::Debug for PersonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PersonName(<redacted>)")
    }
}

/// A free-form postal address, trimmed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Address(String);

impl Address {
    pub fn parse(raw: &str) -> Result<Address, &'static str> {
        Address::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<Address, Reason> {
        clean_text(raw, MAX_ADDRESS_CHARS, "must be at most 256 characters")
            .map(|text| Address(text.into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Address(<redacted>)")
    }
}

/// Nationality as an ISO 3166-1 alpha-3 code (identical to GB/T 2659), e.g. `CHN`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nationality(CountryCode);

impl Nationality {
    /// Case-insensitive; the canonical form is upper case.
    pub fn parse(raw: &str) -> Result<Nationality, &'static str> {
        Nationality::parse_reason(raw)
    }

    pub(super) fn parse_reason(raw: &str) -> Result<Nationality, Reason> {
        const NOT_ALPHA3: Reason = "must be an ISO 3166-1 alpha-3 country code";
        let code = raw.trim();
        // The length check keeps arbitrary input away from the lookup table.
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(NOT_ALPHA3);
        }
        CountryCode::for_alpha3_caseless(code)
            .map(Nationality)
            .map_err(|_| NOT_ALPHA3)
    }

    pub fn as_str(&self) -> &'static str {
        self.0.alpha3()
    }
}

impl fmt::Debug for Nationality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Nationality(<redacted>)")
    }
}

/// Parses a stated date of birth: strictly `YYYY-MM-DD`, a real calendar date, not before
/// 1800-01-01 and not after `today`.
pub fn parse_date_of_birth(raw: &str, today: NaiveDate) -> Result<NaiveDate, &'static str> {
    date_of_birth_reason(raw, today)
}

pub(super) fn date_of_birth_reason(raw: &str, today: NaiveDate) -> Result<NaiveDate, Reason> {
    const SHAPE: Reason = "must be a date in YYYY-MM-DD form";
    // A fixed-width pattern rather than a format string: chrono's parser also accepts
    // unpadded fields and signed years, which would give one date several stored spellings.
    let bytes: [u8; 10] = raw.trim().as_bytes().try_into().map_err(|_| SHAPE)?;
    let [y1, y2, y3, y4, b'-', m1, m2, b'-', d1, d2] = bytes else {
        return Err(SHAPE);
    };
    let field = |digits: &[u8]| -> Result<u32, Reason> {
        digits.iter().try_fold(0u32, |acc, &b| {
            b.is_ascii_digit()
                .then(|| acc * 10 + u32::from(b - b'0'))
                .ok_or(SHAPE)
        })
    };
    let (year, month, day) = (
        field(&[y1, y2, y3, y4])?,
        field(&[m1, m2])?,
        field(&[d1, d2])?,
    );
    let date = i32::try_from(year)
        .ok()
        .and_then(|y| NaiveDate::from_ymd_opt(y, month, day))
        .ok_or("is not a valid calendar date")?;
    check_birth_date(date, today)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{date, today};
    use super::*;
    use chrono::Days;
    use proptest::prelude::*;

    fn name(raw: &str) -> Result<String, Reason> {
        PersonName::parse_reason(raw).map(|n| n.as_str().to_owned())
    }

    #[test]
    fn names_in_any_script_with_name_punctuation() {
        for ok in [
            "张三",
            "欧阳娜娜",
            "阿卜杜拉·买买提",
            "阿卜杜拉•买买提",
            "John Smith",
            "O'Brien",
            "Jean-Luc Picard",
            "J. R. R. Tolkien",
            "Müller",
            "Иван Петров",
            "김민수",
        ] {
            assert_eq!(name(ok).as_deref(), Ok(ok), "{ok}");
        }
        assert_eq!(name("  张三 ").as_deref(), Ok("张三"));
    }

    #[test]
    fn names_reject_digits_symbols_and_bad_lengths() {
        assert_eq!(name("张三3"), Err("must not contain digits"));
        assert_eq!(name("张三三"), Ok("张三三".to_owned()));
        assert_eq!(name("Ⅻ世"), Err("must not contain digits"));
        assert_eq!(
            name("<script>"),
            Err("may contain only letters, spaces and the marks · • . - '")
        );
        assert!(name("张_三").is_err());
        assert_eq!(name("---"), Err("must contain a letter"));
        assert_eq!(name(""), Err("must not be empty"));
        assert_eq!(name("张\t三"), Err("must not contain control characters"));
        assert!(name(&"张".repeat(64)).is_ok());
        assert_eq!(name(&"张".repeat(65)), Err("must be at most 64 characters"));
        assert_eq!(
            format!("{:?}", PersonName::parse("张三").unwrap()),
            "PersonName(<redacted>)"
        );
    }

    #[test]
    fn addresses_are_trimmed_bounded_free_text() {
        let a = Address::parse("  广西壮族自治区南宁市青秀区民族大道100号 ").unwrap();
        assert_eq!(a.as_str(), "广西壮族自治区南宁市青秀区民族大道100号");
        assert!(Address::parse(&"路".repeat(256)).is_ok());
        assert_eq!(
            Address::parse(&"路".repeat(257)).unwrap_err(),
            "must be at most 256 characters"
        );
        assert_eq!(
            Address::parse("民族大道\u{202E}001").unwrap_err(),
            "must not contain control characters"
        );
        assert_eq!(Address::parse(" ").unwrap_err(), "must not be empty");
        assert_eq!(format!("{a:?}"), "Address(<redacted>)");
    }

    #[test]
    fn nationality_is_iso_alpha3_case_insensitive() {
        assert_eq!(Nationality::parse("chn").unwrap().as_str(), "CHN");
        assert_eq!(Nationality::parse(" Kaz ").unwrap().as_str(), "KAZ");
        for bad in ["CN", "CHNA", "XXX", "中国", "C1N", ""] {
            assert_eq!(
                Nationality::parse(bad).unwrap_err(),
                "must be an ISO 3166-1 alpha-3 country code",
                "{bad}"
            );
        }
        assert_eq!(
            format!("{:?}", Nationality::parse("CHN").unwrap()),
            "Nationality(<redacted>)"
        );
    }

    #[test]
    fn date_of_birth_is_strict_yyyy_mm_dd() {
        let dob = |raw: &str| date_of_birth_reason(raw, today());
        assert_eq!(dob("1990-03-07"), Ok(date(1990, 3, 7)));
        assert_eq!(dob(" 1990-03-07 "), Ok(date(1990, 3, 7)));
        for bad in [
            "1990-3-7",
            "1990/03/07",
            "19900307",
            "+1990-03-07",
            "1990-03-07T00:00",
            "９９９９-01-01",
            "199a-03-07",
            "",
        ] {
            assert_eq!(dob(bad), Err("must be a date in YYYY-MM-DD form"), "{bad}");
        }
        assert_eq!(dob("1990-02-30"), Err("is not a valid calendar date"));
        assert_eq!(dob("1990-00-10"), Err("is not a valid calendar date"));
        assert_eq!(dob("1900-02-29"), Err("is not a valid calendar date"));
        assert_eq!(dob("2000-02-29"), Ok(date(2000, 2, 29)));
        assert_eq!(dob("1799-12-31"), Err("birth date is before 1800-01-01"));
        assert_eq!(dob("1800-01-01"), Ok(date(1800, 1, 1)));
        assert_eq!(dob("2024-06-01"), Ok(today()));
        assert_eq!(dob("2024-06-02"), Err("birth date is in the future"));
        assert_eq!(
            parse_date_of_birth("0000-01-01", today()).unwrap_err(),
            "birth date is before 1800-01-01"
        );
    }

    proptest! {
        #[test]
        fn any_string_is_handled_without_panicking(raw in any::<String>()) {
            for reason in [
                PersonName::parse_reason(&raw).err(),
                Address::parse_reason(&raw).err(),
                Nationality::parse_reason(&raw).err(),
                date_of_birth_reason(&raw, today()).err(),
            ].into_iter().flatten() {
                let raw = raw.trim();
                if raw.chars().count() >= 4 {
                    prop_assert!(!reason.contains(raw));
                }
            }
        }

        #[test]
        fn date_shaped_strings_are_handled_without_panicking(raw in "[0-9]{4}-[0-9]{2}-[0-9]{2}") {
            if let Ok(d) = date_of_birth_reason(&raw, today()) {
                prop_assert_eq!(d.format("%Y-%m-%d").to_string(), raw);
            }
        }

        #[test]
        fn dates_round_trip_exactly_within_bounds(days in 0u64..=90_000) {
            let d = date(1800, 1, 1).checked_add_days(Days::new(days)).unwrap();
            let result = date_of_birth_reason(&d.format("%Y-%m-%d").to_string(), today());
            if d <= today() {
                prop_assert_eq!(result, Ok(d));
            } else {
                prop_assert_eq!(result, Err("birth date is in the future"));
            }
        }

        #[test]
        fn name_length_is_counted_in_chars(len in 1usize..=80, c in proptest::sample::select(vec!['张', 'a', 'é', '𠀀'])) {
            let raw: String = std::iter::repeat_n(c, len).collect();
            let result = PersonName::parse_reason(&raw);
            prop_assert_eq!(result.is_ok(), len <= MAX_NAME_CHARS);
        }

        #[test]
        fn canonical_names_are_fixed_points(raw in "[ ]{0,2}[A-Za-z张三李四·' -]{1,20}[ ]{0,2}") {
            if let Ok(n) = PersonName::parse_reason(&raw) {
                prop_assert_eq!(PersonName::parse_reason(n.as_str()), Ok(n.clone()));
            }
        }
    }
}
