//! Identity documents: the document types the app accepts, their number formats, and what a
//! number itself tells us (birth date, gender, administrative division).
//!
//! The GB 11643-1999 citizen identity number and the documents modelled on it (the HK/Macau/
//! Taiwan residence permit and the 2023 foreign permanent residence ID) are checked by hand
//! here rather than through a crate: the rules are short, fully specified, and this is the
//! place where a mistake would silently let a mistyped identity into an insurance record.
//!
//! Administrative division codes are deliberately not checked against a current code list:
//! codes are retired and renumbered over time while the ID numbers issued under them stay
//! valid for life, so only the province-level prefix (which has been stable) is checked.

use std::fmt;

use chrono::NaiveDate;

use super::{Reason, check_birth_date, clean_text};

/// Raw id numbers longer than this are rejected before any parsing work.
const MAX_RAW_CHARS: usize = 64;

const CHECK_MISMATCH: Reason = "check character does not match (ISO 7064 MOD 11-2)";
const GB11643_SHAPE: Reason = "must be 17 digits followed by a check digit or X";
const INVALID_DATE: Reason = "birth date is not a valid calendar date";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gender {
    Male,
    Female,
}

impl Gender {
    pub fn as_str(self) -> &'static str {
        match self {
            Gender::Male => "MALE",
            Gender::Female => "FEMALE",
        }
    }

    /// Exact canonical names only; the edge maps its own enum onto these.
    pub fn parse(s: &str) -> Option<Gender> {
        [Gender::Male, Gender::Female]
            .into_iter()
            .find(|g| g.as_str() == s)
    }

    /// GB 11643 sequence codes are odd for men and even for women.
    fn from_sequence_digit(digit: u8) -> Gender {
        if digit % 2 == 1 {
            Gender::Male
        } else {
            Gender::Female
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdType {
    /// 居民身份证 (GB 11643-1999).
    ResidentId,
    /// 外国人永久居留身份证.
    ForeignPermanentResidenceId,
    /// 港澳台居民居住证.
    HkmotwResidencePermit,
    /// 港澳居民来往内地通行证 (回乡证).
    HkmoTravelPermit,
    /// 台湾居民来往大陆通行证 (台胞证).
    TwTravelPermit,
    Passport,
    Other,
}

impl IdType {
    pub const ALL: [IdType; 7] = [
        IdType::ResidentId,
        IdType::ForeignPermanentResidenceId,
        IdType::HkmotwResidencePermit,
        IdType::HkmoTravelPermit,
        IdType::TwTravelPermit,
        IdType::Passport,
        IdType::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdType::ResidentId => "RESIDENT_ID",
            IdType::ForeignPermanentResidenceId => "FOREIGN_PERMANENT_RESIDENCE_ID",
            IdType::HkmotwResidencePermit => "HKMOTW_RESIDENCE_PERMIT",
            IdType::HkmoTravelPermit => "HKMO_TRAVEL_PERMIT",
            IdType::TwTravelPermit => "TW_TRAVEL_PERMIT",
            IdType::Passport => "PASSPORT",
            IdType::Other => "OTHER",
        }
    }

    /// Exact canonical names only; the edge maps its own enum onto these.
    pub fn parse(s: &str) -> Option<IdType> {
        IdType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A validated identity document number, normalised, with what the number itself encodes.
#[derive(Clone, PartialEq, Eq)]
pub struct IdDocument {
    id_type: IdType,
    number: String,
    birth_date: Option<NaiveDate>,
    gender: Option<Gender>,
}

impl IdDocument {
    /// Validates and normalises `raw` as a number of `id_type`. The error is a reason that
    /// never contains any part of `raw`.
    pub fn parse(id_type: IdType, raw: &str, today: NaiveDate) -> Result<IdDocument, &'static str> {
        IdDocument::parse_reason(id_type, raw, today)
    }

    pub(super) fn parse_reason(
        id_type: IdType,
        raw: &str,
        today: NaiveDate,
    ) -> Result<IdDocument, Reason> {
        let text = clean_text(raw, MAX_RAW_CHARS, "is too long")?;
        match id_type {
            IdType::ResidentId => resident_id(&text, today),
            IdType::ForeignPermanentResidenceId => foreign_permanent_residence_id(&text, today),
            IdType::HkmotwResidencePermit => hkmotw_residence_permit(&text, today),
            IdType::HkmoTravelPermit => hkmo_travel_permit(&text),
            IdType::TwTravelPermit => tw_travel_permit(&text),
            IdType::Passport => passport(&text),
            IdType::Other => Ok(IdDocument::plain(IdType::Other, text.into_owned())),
        }
    }

    pub fn id_type(&self) -> IdType {
        self.id_type
    }

    /// The normalised number (the canonical, to-be-encrypted form).
    pub fn number(&self) -> &str {
        &self.number
    }

    pub fn birth_date(&self) -> Option<NaiveDate> {
        self.birth_date
    }

    pub fn gender(&self) -> Option<Gender> {
        self.gender
    }

    /// The 6-digit administrative division code, for formats that carry one. (The foreign
    /// permanent residence ID's first six digits are "9" + province + nationality instead.)
    pub fn division_code(&self) -> Option<&str> {
        match self.id_type {
            IdType::ResidentId | IdType::HkmotwResidencePermit => self.number.get(..6),
            _ => None,
        }
    }

    fn plain(id_type: IdType, number: String) -> IdDocument {
        IdDocument {
            id_type,
            number,
            birth_date: None,
            gender: None,
        }
    }

    fn gb11643(id_type: IdType, number: String, parsed: Gb11643) -> IdDocument {
        IdDocument {
            id_type,
            number,
            birth_date: Some(parsed.birth_date),
            gender: Some(parsed.gender),
        }
    }
}

impl fmt::Debug for IdDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdDocument")
            .field("id_type", &self.id_type)
            .field("number", &format_args!("<redacted>"))
            .finish_non_exhaustive()
    }
}

fn resident_id(text: &str, today: NaiveDate) -> Result<IdDocument, Reason> {
    let number = compact_upper_ascii(text)?;
    reject_other_gb11643_documents(&number)?;
    let number = match number.len() {
        18 => number,
        15 => upgrade_15_digit(&number)?,
        _ => return Err("must be 18 characters (or 15 digits for the pre-1999 form)"),
    };
    let parsed = parse_gb11643(&number, today)?;
    let [p1, p2, ..] = parsed.body;
    if !is_province_code(p1, p2) {
        return Err("administrative division code does not start with a province-level code");
    }
    Ok(IdDocument::gb11643(IdType::ResidentId, number, parsed))
}

/// The residence permits and the new foreign PR ID reuse the GB 11643 layout, so a user can
/// easily pick the wrong type; a pointed reason saves a support call.
fn reject_other_gb11643_documents(number: &str) -> Result<(), Reason> {
    if ["81", "82", "83"].iter().any(|p| number.starts_with(p)) {
        Err(
            "is a Hong Kong/Macau/Taiwan residence permit number: use id_type HKMOTW_RESIDENCE_PERMIT",
        )
    } else if number.starts_with('9') {
        Err(
            "is a foreign permanent residence ID number: use id_type FOREIGN_PERMANENT_RESIDENCE_ID",
        )
    } else {
        Ok(())
    }
}

/// The pre-1999 15-digit number has no century and no check character: every such number was
/// issued to someone born in the 1900s, so the century is "19" and the check is computed.
fn upgrade_15_digit(number: &str) -> Result<String, Reason> {
    let bytes: [u8; 15] = number
        .as_bytes()
        .try_into()
        .map_err(|_| "must be 15 digits")?;
    let [d1, d2, d3, d4, d5, d6, rest @ ..] = digits(bytes).ok_or("must be 15 digits")?;
    let mut body = [0u8; 17];
    let upgraded = [d1, d2, d3, d4, d5, d6, 1, 9].into_iter().chain(rest);
    for (slot, digit) in body.iter_mut().zip(upgraded) {
        *slot = digit;
    }
    let mut out: String = body.iter().map(|&d| char::from(b'0' + d)).collect();
    out.push(check_character(&body));
    Ok(out)
}

fn hkmotw_residence_permit(text: &str, today: NaiveDate) -> Result<IdDocument, Reason> {
    let number = compact_upper_ascii(text)?;
    if !["810000", "820000", "830000"]
        .iter()
        .any(|p| number.starts_with(p))
    {
        return Err("must start with 810000 (Hong Kong), 820000 (Macau) or 830000 (Taiwan)");
    }
    let parsed = parse_gb11643(&number, today)?;
    Ok(IdDocument::gb11643(
        IdType::HkmotwResidencePermit,
        number,
        parsed,
    ))
}

fn foreign_permanent_residence_id(text: &str, today: NaiveDate) -> Result<IdDocument, Reason> {
    let number = compact_upper_ascii(text)?;
    match number.len() {
        18 if number.starts_with('9') => {
            // The province and nationality codes are not checked against lists: none is
            // published for this purpose, and the check character already catches typos.
            let parsed = parse_gb11643(&number, today)?;
            Ok(IdDocument::gb11643(
                IdType::ForeignPermanentResidenceId,
                number,
                parsed,
            ))
        }
        15 => {
            check_old_foreign_permanent_residence_id(&number, today)?;
            Ok(IdDocument::plain(
                IdType::ForeignPermanentResidenceId,
                number,
            ))
        }
        _ => Err("must be 18 characters starting with 9 (or the 15-character pre-2023 form)"),
    }
}

/// The 2004-2023 form: 3 letters (ISO alpha-3 nationality) and 12 digits. Official sources
/// only give "3 letters + 12 digits"; the one complete layout found (a third-party library)
/// is 4-digit issuing place, YYMMDD birth date, 1 sequence digit, 1 check digit computed
/// ICAO 9303 style (weights 7-3-1). That check algorithm is unconfirmed, so it is not
/// enforced: a wrong guess would lock out every old-card holder. Only the structure and the
/// birth date are validated, and nothing is derived: a two-digit year has no century.
fn check_old_foreign_permanent_residence_id(number: &str, today: NaiveDate) -> Result<(), Reason> {
    const SHAPE: Reason = "must be 3 letters followed by 12 digits (pre-2023 form)";
    let bytes: [u8; 15] = number.as_bytes().try_into().map_err(|_| SHAPE)?;
    let [l1, l2, l3, rest @ ..] = bytes;
    if ![l1, l2, l3].iter().all(u8::is_ascii_uppercase) {
        return Err(SHAPE);
    }
    let [_, _, _, _, y1, y2, m1, m2, d1, d2, _, _] = digits(rest).ok_or(SHAPE)?;
    let (yy, month, day) = (decimal(&[y1, y2]), decimal(&[m1, m2]), decimal(&[d1, d2]));
    let plausible = [1900, 2000].into_iter().any(|century| {
        calendar_date(century + yy, month, day)
            .and_then(|date| check_birth_date(date, today).ok())
            .is_some()
    });
    if plausible {
        Ok(())
    } else {
        Err("birth date is not a valid past date in the 1900s or 2000s")
    }
}

fn hkmo_travel_permit(text: &str) -> Result<IdDocument, Reason> {
    const SHAPE: Reason =
        "must be H or M followed by 8 digits, optionally plus a 2-digit issue count";
    let number = compact_upper_ascii(text)?;
    let (prefix, rest) = number.split_at_checked(1).ok_or(SHAPE)?;
    let shape_ok = matches!(prefix, "H" | "M")
        && matches!(rest.len(), 8 | 10)
        && rest.bytes().all(|b| b.is_ascii_digit());
    if shape_ok {
        Ok(IdDocument::plain(IdType::HkmoTravelPermit, number))
    } else {
        Err(SHAPE)
    }
}

fn tw_travel_permit(text: &str) -> Result<IdDocument, Reason> {
    let number = compact_upper_ascii(text)?;
    if matches!(number.len(), 8 | 10) && number.bytes().all(|b| b.is_ascii_digit()) {
        Ok(IdDocument::plain(IdType::TwTravelPermit, number))
    } else {
        Err("must be 8 digits (or 10 digits for the older card)")
    }
}

fn passport(text: &str) -> Result<IdDocument, Reason> {
    let number = compact_upper_ascii(text)?;
    if (5..=17).contains(&number.len()) {
        Ok(IdDocument::plain(IdType::Passport, number))
    } else {
        Err("must be 5 to 17 letters or digits")
    }
}

/// Machine-readable document numbers are ASCII letters and digits; spaces inside one are a
/// transcription error rather than formatting, so they are rejected, not stripped.
fn compact_upper_ascii(text: &str) -> Result<String, Reason> {
    if text.chars().any(char::is_whitespace) {
        return Err("must not contain spaces");
    }
    if !text.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("must contain only letters and digits");
    }
    Ok(text.to_ascii_uppercase())
}

/// What an 18-character GB 11643-style number encodes, once its structure and check
/// character are verified.
struct Gb11643 {
    body: [u8; 17],
    birth_date: NaiveDate,
    gender: Gender,
}

/// Layout: 6-digit region, YYYYMMDD birth date, 3-digit sequence, check character.
fn parse_gb11643(number: &str, today: NaiveDate) -> Result<Gb11643, Reason> {
    let bytes: [u8; 18] = number
        .as_bytes()
        .try_into()
        .map_err(|_| "must be 18 characters")?;
    let [body @ .., check] = bytes;
    let body = digits(body).ok_or(GB11643_SHAPE)?;
    if !(check.is_ascii_digit() || check == b'X') {
        return Err(GB11643_SHAPE);
    }
    if char::from(check) != check_character(&body) {
        return Err(CHECK_MISMATCH);
    }
    let [_, _, _, _, _, _, y1, y2, y3, y4, m1, m2, d1, d2, _, _, s3] = body;
    let date = calendar_date(
        decimal(&[y1, y2, y3, y4]),
        decimal(&[m1, m2]),
        decimal(&[d1, d2]),
    )
    .ok_or(INVALID_DATE)?;
    Ok(Gb11643 {
        body,
        birth_date: check_birth_date(date, today)?,
        gender: Gender::from_sequence_digit(s3),
    })
}

/// ISO 7064 MOD 11-2 weights (2^(17-i) mod 11) for the 17 body digits.
const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];

/// ISO 7064 MOD 11-2 check character. The standard's table "10X98765432" indexed by
/// `sum % 11` is the closed form `(12 - sum % 11) % 11`, with 10 written as X; computing it
/// avoids a table lookup that would need an index.
fn check_character(body: &[u8; 17]) -> char {
    let sum: u32 = body
        .iter()
        .zip(WEIGHTS)
        .map(|(&digit, weight)| u32::from(digit) * weight)
        .sum();
    char::from_digit((12 - sum % 11) % 11, 10).unwrap_or('X')
}

/// Province-level codes that have ever been used as the first two digits of a citizen
/// identity number (71 is Taiwan, never issued but defined).
fn is_province_code(d1: u8, d2: u8) -> bool {
    matches!(
        d1 * 10 + d2,
        11..=15 | 21..=23 | 31..=37 | 41..=46 | 50..=54 | 61..=65 | 71
    )
}

/// ASCII bytes to digit values, or None if any byte is not a digit.
fn digits<const N: usize>(bytes: [u8; N]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (slot, byte) in out.iter_mut().zip(bytes) {
        if !byte.is_ascii_digit() {
            return None;
        }
        *slot = byte - b'0';
    }
    Some(out)
}

fn decimal(digits: &[u8]) -> u32 {
    digits.iter().fold(0, |acc, &d| acc * 10 + u32::from(d))
}

fn calendar_date(year: u32, month: u32, day: u32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{date, guangxi_id, today, with_check};
    use super::*;
    use chrono::Days;
    use proptest::prelude::*;

    fn parse(id_type: IdType, raw: &str) -> Result<IdDocument, Reason> {
        IdDocument::parse_reason(id_type, raw, today())
    }

    fn resident(raw: &str) -> Result<IdDocument, Reason> {
        parse(IdType::ResidentId, raw)
    }

    /// Replaces the check character with a wrong one.
    fn corrupt_check(id: &str) -> String {
        let (body, check) = id.split_at(17);
        let wrong = if check == "1" { "2" } else { "1" };
        format!("{body}{wrong}")
    }

    #[test]
    fn standard_examples_from_gb_11643() {
        let doc = resident("11010519491231002X").unwrap();
        assert_eq!(doc.birth_date(), Some(date(1949, 12, 31)));
        assert_eq!(doc.gender(), Some(Gender::Female));
        assert_eq!(doc.division_code(), Some("110105"));
        let doc = resident("440524188001010014").unwrap();
        assert_eq!(doc.birth_date(), Some(date(1880, 1, 1)));
        assert_eq!(doc.gender(), Some(Gender::Male));
    }

    #[test]
    fn check_character_matches_the_standard_table() {
        assert_eq!(
            check_character(&[1, 1, 0, 1, 0, 5, 1, 9, 4, 9, 1, 2, 3, 1, 0, 0, 2]),
            'X'
        );
        assert_eq!(
            check_character(&[4, 4, 0, 5, 2, 4, 1, 8, 8, 0, 0, 1, 0, 1, 0, 0, 1]),
            '4'
        );
    }

    #[test]
    fn guangxi_resident_id_derives_birth_date_gender_and_division() {
        let id = guangxi_id("19900307", "123");
        let doc = resident(&id).unwrap();
        assert_eq!(doc.id_type(), IdType::ResidentId);
        assert_eq!(doc.number(), id);
        assert_eq!(doc.birth_date(), Some(date(1990, 3, 7)));
        assert_eq!(doc.gender(), Some(Gender::Male));
        assert_eq!(doc.division_code(), Some("450102"));
        let doc = resident(&guangxi_id("19900307", "124")).unwrap();
        assert_eq!(doc.gender(), Some(Gender::Female));
    }

    #[test]
    fn person_born_in_1899_is_accepted() {
        let doc = resident(&guangxi_id("18991231", "001")).unwrap();
        assert_eq!(doc.birth_date(), Some(date(1899, 12, 31)));
    }

    #[test]
    fn lowercase_x_and_surrounding_whitespace_are_normalised() {
        let doc = resident(" \t11010519491231002x\u{3000}").unwrap();
        assert_eq!(doc.number(), "11010519491231002X");
    }

    #[test]
    fn internal_spaces_are_rejected() {
        assert_eq!(
            resident("110105 19491231002X"),
            Err("must not contain spaces")
        );
    }

    #[test]
    fn wrong_check_character_is_rejected() {
        let id = corrupt_check(&guangxi_id("19900307", "123"));
        assert_eq!(resident(&id), Err(CHECK_MISMATCH));
    }

    #[test]
    fn malformed_numbers_are_rejected_with_a_shape_reason() {
        assert_eq!(resident("45010219900307123Y"), Err(GB11643_SHAPE));
        assert_eq!(resident("4501021990030712YX"), Err(GB11643_SHAPE));
        assert_eq!(
            resident("4501021990030712"),
            Err("must be 18 characters (or 15 digits for the pre-1999 form)")
        );
        assert_eq!(
            resident("45010219900-071234"),
            Err("must contain only letters and digits")
        );
        assert_eq!(resident(""), Err("must not be empty"));
        assert_eq!(resident(&"1".repeat(65)), Err("is too long"));
    }

    #[test]
    fn birth_date_must_be_a_real_past_date_from_1800() {
        assert_eq!(resident(&guangxi_id("19900230", "123")), Err(INVALID_DATE));
        assert_eq!(resident(&guangxi_id("19901301", "123")), Err(INVALID_DATE));
        assert_eq!(resident(&guangxi_id("19000229", "123")), Err(INVALID_DATE));
        assert!(resident(&guangxi_id("20000229", "123")).is_ok());
        assert_eq!(
            resident(&guangxi_id("17991231", "123")),
            Err("birth date is before 1800-01-01")
        );
        assert!(resident(&guangxi_id("18000101", "123")).is_ok());
        assert!(resident(&guangxi_id("20240601", "123")).is_ok());
        assert_eq!(
            resident(&guangxi_id("20240602", "123")),
            Err("birth date is in the future")
        );
    }

    #[test]
    fn division_code_must_start_with_a_historic_province_code() {
        for ok in [
            "11", "15", "21", "23", "31", "37", "41", "46", "50", "54", "61", "65", "71",
        ] {
            let id = with_check(&format!("{ok}010219900307123"));
            assert!(resident(&id).is_ok(), "{ok}");
        }
        for bad in [
            "00", "10", "16", "20", "24", "30", "38", "40", "47", "49", "55", "60", "66", "70",
            "72", "80",
        ] {
            let id = with_check(&format!("{bad}010219900307123"));
            assert_eq!(
                resident(&id),
                Err("administrative division code does not start with a province-level code"),
                "{bad}"
            );
        }
    }

    #[test]
    fn retired_division_codes_stay_valid() {
        // 452101 was 南宁地区 before its 2002 dissolution.
        assert!(resident(&with_check("45210119600101123")).is_ok());
    }

    #[test]
    fn other_documents_in_the_same_layout_are_redirected() {
        for prefix in ["810000", "820000", "830000"] {
            let id = with_check(&format!("{prefix}19900307123"));
            assert!(
                resident(&id)
                    .unwrap_err()
                    .contains("HKMOTW_RESIDENCE_PERMIT")
            );
        }
        let fpr = with_check("91134819900307123");
        assert!(
            resident(&fpr)
                .unwrap_err()
                .contains("FOREIGN_PERMANENT_RESIDENCE_ID")
        );
    }

    #[test]
    fn fifteen_digit_form_is_upgraded_to_eighteen() {
        let doc = resident("450102550307123").unwrap();
        assert_eq!(doc.number(), guangxi_id("19550307", "123"));
        assert_eq!(doc.birth_date(), Some(date(1955, 3, 7)));
        assert_eq!(doc.gender(), Some(Gender::Male));
        assert_eq!(resident("450102550230123"), Err(INVALID_DATE));
        assert_eq!(resident("45010255030712X"), Err("must be 15 digits"));
        assert_eq!(
            resident("000102550307123"),
            Err("administrative division code does not start with a province-level code")
        );
    }

    #[test]
    fn hkmotw_residence_permit() {
        for prefix in ["810000", "820000", "830000"] {
            let id = with_check(&format!("{prefix}19900307124"));
            let doc = parse(IdType::HkmotwResidencePermit, &id).unwrap();
            assert_eq!(doc.birth_date(), Some(date(1990, 3, 7)));
            assert_eq!(doc.gender(), Some(Gender::Female));
            assert_eq!(doc.division_code(), Some(prefix));
        }
        let wrong_prefix = with_check("81000119900307124");
        assert!(parse(IdType::HkmotwResidencePermit, &wrong_prefix).is_err());
        let resident_id = guangxi_id("19900307", "123");
        assert!(parse(IdType::HkmotwResidencePermit, &resident_id).is_err());
        let bad_check = corrupt_check(&with_check("81000019900307124"));
        assert_eq!(
            parse(IdType::HkmotwResidencePermit, &bad_check),
            Err(CHECK_MISMATCH)
        );
        let future = with_check("81000020300307124");
        assert_eq!(
            parse(IdType::HkmotwResidencePermit, &future),
            Err("birth date is in the future")
        );
    }

    #[test]
    fn new_foreign_permanent_residence_id() {
        let id = with_check("91139819901231002");
        let doc = parse(IdType::ForeignPermanentResidenceId, &id).unwrap();
        assert_eq!(doc.birth_date(), Some(date(1990, 12, 31)));
        assert_eq!(doc.gender(), Some(Gender::Female));
        assert_eq!(doc.division_code(), None);
        assert_eq!(
            parse(IdType::ForeignPermanentResidenceId, &corrupt_check(&id)),
            Err(CHECK_MISMATCH)
        );
        let not_nine = guangxi_id("19900307", "123");
        assert!(parse(IdType::ForeignPermanentResidenceId, &not_nine).is_err());
    }

    #[test]
    fn old_foreign_permanent_residence_id_is_structure_checked_only() {
        let doc = parse(IdType::ForeignPermanentResidenceId, "kaz110090123105").unwrap();
        assert_eq!(doc.number(), "KAZ110090123105");
        assert_eq!((doc.birth_date(), doc.gender()), (None, None));
        // 29 Feb 00 exists only in 2000.
        assert!(parse(IdType::ForeignPermanentResidenceId, "USA110000022915").is_ok());
        // A 20YY date in the future is fine when the 19YY reading is a real past date.
        assert!(parse(IdType::ForeignPermanentResidenceId, "KAZ110025010115").is_ok());
        // 31 Feb and month 13 exist in neither century.
        for bad_date in ["KAZ110090023105", "KAZ110091323105"] {
            assert_eq!(
                parse(IdType::ForeignPermanentResidenceId, bad_date)
                    .map(|_| ())
                    .map_err(|r| r.starts_with("birth date")),
                Err(true),
                "{bad_date}"
            );
        }
        for bad_shape in ["KA1110090123105", "KAZ11009012310A", "1AZ110090123105"] {
            assert_eq!(
                parse(IdType::ForeignPermanentResidenceId, bad_shape),
                Err("must be 3 letters followed by 12 digits (pre-2023 form)")
            );
        }
        assert!(parse(IdType::ForeignPermanentResidenceId, "KAZ11009012310").is_err());
    }

    #[test]
    fn hkmo_travel_permit() {
        for (raw, canonical) in [
            ("H12345678", "H12345678"),
            ("m12345678", "M12345678"),
            ("H1234567801", "H1234567801"),
        ] {
            assert_eq!(
                parse(IdType::HkmoTravelPermit, raw).unwrap().number(),
                canonical
            );
        }
        for bad in [
            "X12345678",
            "H1234567",
            "H123456789",
            "H123456780123",
            "12345678",
            "HH2345678",
        ] {
            assert!(parse(IdType::HkmoTravelPermit, bad).is_err(), "{bad}");
        }
        let doc = parse(IdType::HkmoTravelPermit, "H12345678").unwrap();
        assert_eq!(
            (doc.birth_date(), doc.gender(), doc.division_code()),
            (None, None, None)
        );
    }

    #[test]
    fn tw_travel_permit() {
        assert!(parse(IdType::TwTravelPermit, "12345678").is_ok());
        assert!(parse(IdType::TwTravelPermit, "1234567890").is_ok());
        for bad in [
            "1234567",
            "123456789",
            "12345678901",
            "1234567A",
            "T1234567",
        ] {
            assert!(parse(IdType::TwTravelPermit, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passport() {
        assert_eq!(
            parse(IdType::Passport, " e1234 ").unwrap().number(),
            "E1234"
        );
        assert!(parse(IdType::Passport, &"A".repeat(17)).is_ok());
        for bad in [
            "1234",
            "A".repeat(18).as_str(),
            "E-123456",
            "E 123456",
            "护照12345",
        ] {
            assert!(parse(IdType::Passport, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_documents_are_trimmed_free_text() {
        assert_eq!(
            parse(IdType::Other, " 军官证 第123号 ").unwrap().number(),
            "军官证 第123号"
        );
        assert!(parse(IdType::Other, &"证".repeat(64)).is_ok());
        assert_eq!(parse(IdType::Other, &"证".repeat(65)), Err("is too long"));
        assert_eq!(
            parse(IdType::Other, "a\u{1b}[31m"),
            Err("must not contain control characters")
        );
        assert_eq!(parse(IdType::Other, "   "), Err("must not be empty"));
    }

    #[test]
    fn enums_round_trip_through_their_canonical_names() {
        for t in IdType::ALL {
            assert_eq!(IdType::parse(t.as_str()), Some(t));
        }
        assert_eq!(IdType::ResidentId.as_str(), "RESIDENT_ID");
        assert_eq!(IdType::parse("resident_id"), None);
        assert_eq!(Gender::parse("MALE"), Some(Gender::Male));
        assert_eq!(Gender::parse("FEMALE"), Some(Gender::Female));
        assert_eq!(Gender::parse("F"), None);
    }

    #[test]
    fn public_parse_and_debug_do_not_leak_the_number() {
        let id = guangxi_id("19900307", "123");
        let doc = IdDocument::parse(IdType::ResidentId, &id, today()).unwrap();
        let debug = format!("{doc:?}");
        assert_eq!(
            debug,
            "IdDocument { id_type: ResidentId, number: <redacted>, .. }"
        );
        let err = IdDocument::parse(IdType::ResidentId, &corrupt_check(&id), today()).unwrap_err();
        assert_eq!(err, CHECK_MISMATCH);
    }

    const PROVINCES: [&str; 34] = [
        "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37",
        "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64",
        "65", "71", "11", "45",
    ];

    fn birth_date_between(from: NaiveDate, to: NaiveDate) -> impl Strategy<Value = NaiveDate> {
        let span = (to - from).num_days() as u64;
        (0..=span).prop_map(move |d| from.checked_add_days(Days::new(d)).unwrap())
    }

    /// A valid 17-digit resident body and its parts.
    fn resident_body() -> impl Strategy<Value = (String, NaiveDate, u32)> {
        resident_body_born(birth_date_between(date(1800, 1, 1), today()))
    }

    fn resident_body_born(
        birth: impl Strategy<Value = NaiveDate>,
    ) -> impl Strategy<Value = (String, NaiveDate, u32)> {
        (
            proptest::sample::select(PROVINCES.to_vec()),
            "[0-9]{4}",
            birth,
            0u32..1000,
        )
            .prop_map(|(province, rest, birth, seq)| {
                let body = format!("{province}{rest}{}{seq:03}", birth.format("%Y%m%d"));
                (body, birth, seq)
            })
    }

    proptest! {
        #[test]
        fn any_string_is_handled_without_panicking(
            raw in any::<String>(),
            id_type in proptest::sample::select(IdType::ALL.to_vec()),
        ) {
            if let Err(reason) = parse(id_type, &raw) {
                let raw = raw.trim();
                prop_assert!(!reason.is_empty());
                if raw.chars().count() >= 4 {
                    prop_assert!(!reason.contains(raw));
                }
            }
        }

        #[test]
        fn id_shaped_strings_are_handled_without_panicking(
            raw in "[0-9xX ]{0,20}|[A-Za-z]{0,4}[0-9]{0,14}",
            id_type in proptest::sample::select(IdType::ALL.to_vec()),
        ) {
            let _ = parse(id_type, &raw);
        }

        #[test]
        fn valid_resident_ids_parse_and_derive((body, birth, seq) in resident_body()) {
            let id = with_check(&body);
            let doc = resident(&id.to_lowercase()).unwrap();
            prop_assert_eq!(doc.number(), id.as_str());
            prop_assert_eq!(doc.birth_date(), Some(birth));
            let gender = if seq % 2 == 1 { Gender::Male } else { Gender::Female };
            prop_assert_eq!(doc.gender(), Some(gender));
            prop_assert_eq!(doc.division_code(), id.get(..6));
            // The canonical form is a fixed point.
            prop_assert_eq!(resident(doc.number()), Ok(doc.clone()));
        }

        #[test]
        fn every_wrong_check_character_is_rejected(
            (body, _, _) in resident_body(),
            wrong in proptest::sample::select("0123456789X".chars().collect::<Vec<_>>()),
        ) {
            let id = with_check(&body);
            prop_assume!(!id.ends_with(wrong));
            prop_assert_eq!(resident(&format!("{body}{wrong}")), Err(CHECK_MISMATCH));
        }

        #[test]
        fn single_digit_substitutions_are_detected(
            (body, _, _) in resident_body(),
            position in 0usize..17,
            delta in 1u32..10,
        ) {
            let id = with_check(&body);
            let mut chars: Vec<char> = id.chars().collect();
            let digit = chars[position].to_digit(10).unwrap();
            chars[position] = char::from_digit((digit + delta) % 10, 10).unwrap();
            let mutated: String = chars.into_iter().collect();
            prop_assert!(resident(&mutated).is_err());
        }

        #[test]
        fn adjacent_transpositions_are_detected(
            (body, _, _) in resident_body(),
            position in 0usize..16,
        ) {
            let id = with_check(&body);
            let mut chars: Vec<char> = id.chars().collect();
            prop_assume!(chars[position] != chars[position + 1]);
            chars.swap(position, position + 1);
            let mutated: String = chars.into_iter().collect();
            prop_assert!(resident(&mutated).is_err());
        }

        #[test]
        fn birth_dates_after_today_are_rejected(days_ahead in 1u64..100_000) {
            let birth = today().checked_add_days(Days::new(days_ahead)).unwrap();
            let id = guangxi_id(&birth.format("%Y%m%d").to_string(), "123");
            prop_assert_eq!(resident(&id), Err("birth date is in the future"));
        }

        #[test]
        fn fifteen_digit_ids_upgrade_to_the_equivalent_eighteen(
            (body, birth, _) in resident_body_born(
                birth_date_between(date(1900, 1, 1), date(1999, 12, 31)),
            ),
        ) {
            let fifteen = format!("{}{}", &body[..6], &body[8..]);
            let doc = resident(&fifteen).unwrap();
            prop_assert_eq!(doc.number(), with_check(&body));
            prop_assert_eq!(doc.birth_date(), Some(birth));
        }

        #[test]
        fn permit_and_foreign_ids_share_the_gb11643_rules(
            (body, birth, _) in resident_body(),
            prefix in proptest::sample::select(vec!["810000", "820000", "830000", "913156"]),
        ) {
            let id = with_check(&format!("{prefix}{}", &body[6..]));
            let id_type = if prefix.starts_with('9') {
                IdType::ForeignPermanentResidenceId
            } else {
                IdType::HkmotwResidencePermit
            };
            let doc = parse(id_type, &id).unwrap();
            prop_assert_eq!(doc.birth_date(), Some(birth));
            prop_assert_eq!(parse(id_type, &corrupt_check(&id)), Err(CHECK_MISMATCH));
            prop_assert!(resident(&id).is_err());
        }
    }
}
