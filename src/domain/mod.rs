//! Identity domain: parsing, normalising and disclosing the personal fields the vault stores.
//!
//! Everything that decides whether an identity value is acceptable, what its canonical
//! (to-be-encrypted) form is, and how it may be shown partially lives here, so the gRPC layer
//! and the storage layer never touch raw identity strings themselves.
//!
//! Two rules shape the whole module:
//! - It is pure: no I/O and no clock. "Today" is always passed in, so validation is
//!   deterministic and testable, and a request is judged against one instant.
//! - Identity plaintext never leaves through diagnostics. Rejection reasons are `&'static str`
//!   internally (turned into `String` only at the public boundary), so by construction they
//!   cannot contain any part of the input; and every type that holds an identity value has a
//!   hand-written `Debug` that redacts it and no `Display`.

pub mod age;
pub mod audit_chain;
mod contact;
mod disclosure;
pub mod edge;
mod id_document;
mod person;

use std::borrow::Cow;
use std::fmt;

use chrono::NaiveDate;

pub use contact::{Email, PhoneNumber, PostalCode};
pub use disclosure::{generalize, mask, supports_generalize, supports_mask};
pub use id_document::{Gender, IdDocument, IdType};
pub use person::{Address, Nationality, PersonName, parse_date_of_birth};

/// A rejection reason. Static so that no code path can interpolate user input into it.
type Reason = &'static str;

/// The identity fields of the external contract, in their canonical order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldName {
    Name,
    Gender,
    IdType,
    IdNumber,
    DateOfBirth,
    Nationality,
    Phone,
    Email,
    Address,
    PostalCode,
}

impl FieldName {
    /// Every field, in the order canonical field lists are produced.
    pub const ALL: [FieldName; 10] = [
        FieldName::Name,
        FieldName::Gender,
        FieldName::IdType,
        FieldName::IdNumber,
        FieldName::DateOfBirth,
        FieldName::Nationality,
        FieldName::Phone,
        FieldName::Email,
        FieldName::Address,
        FieldName::PostalCode,
    ];

    /// The contract (wire and config) name of the field.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldName::Name => "name",
            FieldName::Gender => "gender",
            FieldName::IdType => "id_type",
            FieldName::IdNumber => "id_number",
            FieldName::DateOfBirth => "date_of_birth",
            FieldName::Nationality => "nationality",
            FieldName::Phone => "phone",
            FieldName::Email => "email",
            FieldName::Address => "address",
            FieldName::PostalCode => "postal_code",
        }
    }

    /// Inverse of [`FieldName::as_str`]; exact match only, since these names come from config
    /// and wire contracts where a near miss is a bug worth surfacing.
    pub fn parse(s: &str) -> Option<FieldName> {
        FieldName::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// One rejected field. `reason` is `'static`, so it cannot hold the submitted value or any
/// part of it: a type, not a convention. A reason that states a bound the vault sets (a
/// byte limit, a batch size from configuration) says `{limit}` where the number goes and
/// carries the number in `limit`; [`Violation::description`] puts it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Contract field name, e.g. `"id_number"`, or its path in the request
    /// (`requests[3].identity.id_number`).
    pub field: String,
    pub reason: &'static str,
    /// The bound `reason` names as `{limit}`, if it names one.
    pub limit: Option<u64>,
}

impl Violation {
    pub fn new(field: FieldName, reason: &'static str) -> Violation {
        Violation::at(field.as_str(), reason)
    }

    /// A violation of the request field (or path) `field`.
    pub fn at(field: impl Into<String>, reason: &'static str) -> Violation {
        Violation {
            field: field.into(),
            reason,
            limit: None,
        }
    }

    /// A violation whose reason states a bound: `reason` says `{limit}` where it goes.
    pub fn bounded(field: impl Into<String>, reason: &'static str, limit: u64) -> Violation {
        debug_assert!(reason.contains("{limit}"), "{reason}");
        Violation {
            field: field.into(),
            reason,
            limit: Some(limit),
        }
    }

    /// The same violation, of the field at `field` (a path in a larger request).
    pub fn moved_to(self, field: String) -> Violation {
        Violation { field, ..self }
    }

    /// The reason as a person reads it: the bound, if any, in place of `{limit}`.
    pub fn description(&self) -> Cow<'static, str> {
        match self.limit {
            Some(limit) => Cow::Owned(self.reason.replace("{limit}", &limit.to_string())),
            None => Cow::Borrowed(self.reason),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description())
    }
}

impl std::error::Error for Violation {}

/// Raw input from the edge. Empty strings have already been turned into `None` by the caller.
#[derive(Clone, Default)]
pub struct IdentityInput {
    pub name: Option<String>,
    pub gender: Option<Gender>,
    pub id_type: Option<IdType>,
    pub id_number: Option<String>,
    pub date_of_birth: Option<String>,
    pub nationality: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub address: Option<String>,
    pub postal_code: Option<String>,
}

impl IdentityInput {
    /// Rebuilds an input from canonical fields, e.g. to merge a partial update onto a stored
    /// record and re-validate the result. Empty values become `None`; a later duplicate of a
    /// field wins. A `gender` or `id_type` value that is not a known canonical name is dropped:
    /// use [`IdentityInput::try_from_canonical`] where that must be reported instead.
    pub fn from_canonical(fields: &[(FieldName, String)]) -> IdentityInput {
        let mut input = IdentityInput::default();
        for (field, value) in fields {
            // An unknown enum name is deliberately ignored here; see the doc comment.
            let _ = input.set_canonical(*field, value);
        }
        input
    }

    /// Like [`IdentityInput::from_canonical`], but reports `gender` / `id_type` values that are
    /// not known canonical names instead of dropping them.
    pub fn try_from_canonical(
        fields: &[(FieldName, String)],
    ) -> Result<IdentityInput, Vec<Violation>> {
        let mut input = IdentityInput::default();
        let violations: Vec<Violation> = fields
            .iter()
            .filter_map(|(field, value)| input.set_canonical(*field, value).err())
            .collect();
        if violations.is_empty() {
            Ok(input)
        } else {
            Err(violations)
        }
    }

    fn set_canonical(&mut self, field: FieldName, value: &str) -> Result<(), Violation> {
        let text = (!value.is_empty()).then(|| value.to_owned());
        match field {
            FieldName::Name => self.name = text,
            FieldName::Gender => self.gender = parse_enum(field, value, Gender::parse)?,
            FieldName::IdType => self.id_type = parse_enum(field, value, IdType::parse)?,
            FieldName::IdNumber => self.id_number = text,
            FieldName::DateOfBirth => self.date_of_birth = text,
            FieldName::Nationality => self.nationality = text,
            FieldName::Phone => self.phone = text,
            FieldName::Email => self.email = text,
            FieldName::Address => self.address = text,
            FieldName::PostalCode => self.postal_code = text,
        }
        Ok(())
    }
}

fn parse_enum<T>(
    field: FieldName,
    value: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>, Violation> {
    if value.is_empty() {
        return Ok(None);
    }
    parse(value)
        .map(Some)
        .ok_or_else(|| Violation::new(field, "is not a recognised value"))
}

impl fmt::Debug for IdentityInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityInput")
            .field("name", &Redacted::of(&self.name))
            .field("gender", &Redacted::of(&self.gender))
            // The document type is a category, not an identity value, and helps debugging.
            .field("id_type", &self.id_type)
            .field("id_number", &Redacted::of(&self.id_number))
            .field("date_of_birth", &Redacted::of(&self.date_of_birth))
            .field("nationality", &Redacted::of(&self.nationality))
            .field("phone", &Redacted::of(&self.phone))
            .field("email", &Redacted::of(&self.email))
            .field("address", &Redacted::of(&self.address))
            .field("postal_code", &Redacted::of(&self.postal_code))
            .finish()
    }
}

/// Debug stand-in for an optional identity value: tells presence, never content.
struct Redacted(bool);

impl Redacted {
    fn of<T>(value: &Option<T>) -> Redacted {
        Redacted(value.is_some())
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "Some(<redacted>)" } else { "None" })
    }
}

/// A validated identity: every present field parsed and normalised, derivations checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    name: Option<PersonName>,
    gender: Option<Gender>,
    id_document: Option<IdDocument>,
    date_of_birth: Option<NaiveDate>,
    nationality: Option<Nationality>,
    phone: Option<PhoneNumber>,
    email: Option<Email>,
    address: Option<Address>,
    postal_code: Option<PostalCode>,
}

impl Identity {
    /// Validates every field and returns all violations at once, so a client can fix a form
    /// in one round trip.
    pub fn parse(input: IdentityInput, today: NaiveDate) -> Result<Identity, Vec<Violation>> {
        let mut v = Vec::new();
        let id_document = parse_id_document(&input, today, &mut v);
        let stated_dob = field(
            &mut v,
            FieldName::DateOfBirth,
            input.date_of_birth.as_deref(),
            |s| person::date_of_birth_reason(s, today),
        );
        let identity = Identity {
            name: field(
                &mut v,
                FieldName::Name,
                input.name.as_deref(),
                PersonName::parse_reason,
            ),
            gender: derive_gender(input.gender, id_document.as_ref(), &mut v),
            date_of_birth: derive_birth_date(stated_dob, id_document.as_ref(), &mut v),
            id_document,
            nationality: field(
                &mut v,
                FieldName::Nationality,
                input.nationality.as_deref(),
                Nationality::parse_reason,
            ),
            phone: field(
                &mut v,
                FieldName::Phone,
                input.phone.as_deref(),
                PhoneNumber::parse_reason,
            ),
            email: field(
                &mut v,
                FieldName::Email,
                input.email.as_deref(),
                Email::parse_reason,
            ),
            address: field(
                &mut v,
                FieldName::Address,
                input.address.as_deref(),
                Address::parse_reason,
            ),
            postal_code: field(
                &mut v,
                FieldName::PostalCode,
                input.postal_code.as_deref(),
                PostalCode::parse_reason,
            ),
        };
        if v.is_empty() {
            Ok(identity)
        } else {
            v.sort_by_key(|violation| FieldName::parse(&violation.field));
            Err(v)
        }
    }

    /// Canonical string per present field, in [`FieldName::ALL`] order. This is what gets
    /// encrypted, so it must be stable: parsing it again yields the same strings.
    pub fn canonical_fields(&self) -> Vec<(FieldName, String)> {
        FieldName::ALL
            .into_iter()
            .filter_map(|f| self.canonical(f).map(|value| (f, value)))
            .collect()
    }

    /// The canonical string of one field, if present.
    pub fn canonical(&self, field: FieldName) -> Option<String> {
        let doc = self.id_document.as_ref();
        match field {
            FieldName::Name => self.name.as_ref().map(|n| n.as_str().to_owned()),
            FieldName::Gender => self.gender.map(|g| g.as_str().to_owned()),
            FieldName::IdType => doc.map(|d| d.id_type().as_str().to_owned()),
            FieldName::IdNumber => doc.map(|d| d.number().to_owned()),
            FieldName::DateOfBirth => self.date_of_birth.map(format_date),
            FieldName::Nationality => self.nationality.as_ref().map(|n| n.as_str().to_owned()),
            FieldName::Phone => self.phone.as_ref().map(|p| p.e164().to_owned()),
            FieldName::Email => self.email.as_ref().map(|e| e.as_str().to_owned()),
            FieldName::Address => self.address.as_ref().map(|a| a.as_str().to_owned()),
            FieldName::PostalCode => self.postal_code.as_ref().map(|p| p.as_str().to_owned()),
        }
    }

    /// Rebuild an input from canonical fields; see [`IdentityInput::from_canonical`].
    pub fn input_from_canonical(fields: &[(FieldName, String)]) -> IdentityInput {
        IdentityInput::from_canonical(fields)
    }

    pub fn is_empty(&self) -> bool {
        FieldName::ALL
            .into_iter()
            .all(|f| self.canonical(f).is_none())
    }

    pub fn id_document(&self) -> Option<&IdDocument> {
        self.id_document.as_ref()
    }

    pub fn phone(&self) -> Option<&PhoneNumber> {
        self.phone.as_ref()
    }

    pub fn date_of_birth(&self) -> Option<NaiveDate> {
        self.date_of_birth
    }

    pub fn gender(&self) -> Option<Gender> {
        self.gender
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &Redacted::of(&self.name))
            .field("gender", &Redacted::of(&self.gender))
            .field("id_document", &self.id_document)
            .field("date_of_birth", &Redacted::of(&self.date_of_birth))
            .field("nationality", &Redacted::of(&self.nationality))
            .field("phone", &Redacted::of(&self.phone))
            .field("email", &Redacted::of(&self.email))
            .field("address", &Redacted::of(&self.address))
            .field("postal_code", &Redacted::of(&self.postal_code))
            .finish()
    }
}

/// Parses one optional field, recording a violation instead of failing fast.
fn field<T>(
    violations: &mut Vec<Violation>,
    name: FieldName,
    raw: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, Reason>,
) -> Option<T> {
    match parse(raw?) {
        Ok(value) => Some(value),
        Err(reason) => {
            violations.push(Violation::new(name, reason));
            None
        }
    }
}

/// id_type and id_number only mean something together, so either one alone is rejected on
/// the missing one.
fn parse_id_document(
    input: &IdentityInput,
    today: NaiveDate,
    violations: &mut Vec<Violation>,
) -> Option<IdDocument> {
    match (input.id_type, input.id_number.as_deref()) {
        (None, None) => None,
        (Some(_), None) => {
            violations.push(Violation::new(
                FieldName::IdNumber,
                "is required when id_type is given",
            ));
            None
        }
        (None, Some(_)) => {
            violations.push(Violation::new(
                FieldName::IdType,
                "is required when id_number is given",
            ));
            None
        }
        (Some(id_type), Some(raw)) => field(violations, FieldName::IdNumber, Some(raw), |s| {
            IdDocument::parse_reason(id_type, s, today)
        }),
    }
}

/// The document is authoritative for gender when it encodes one; a stated gender must agree.
fn derive_gender(
    stated: Option<Gender>,
    doc: Option<&IdDocument>,
    violations: &mut Vec<Violation>,
) -> Option<Gender> {
    match (stated, doc.and_then(IdDocument::gender)) {
        (Some(s), Some(carried)) if s != carried => {
            violations.push(Violation::new(
                FieldName::Gender,
                "does not match the gender carried by id_number",
            ));
            None
        }
        (_, Some(carried)) => Some(carried),
        (stated, None) => stated,
    }
}

/// The document is authoritative for the birth date when it encodes one; a stated date must
/// agree. (A stated date that failed to parse has already been reported.)
fn derive_birth_date(
    stated: Option<NaiveDate>,
    doc: Option<&IdDocument>,
    violations: &mut Vec<Violation>,
) -> Option<NaiveDate> {
    match (stated, doc.and_then(IdDocument::birth_date)) {
        (Some(s), Some(carried)) if s != carried => {
            violations.push(Violation::new(
                FieldName::DateOfBirth,
                "does not match the birth date carried by id_number",
            ));
            None
        }
        (_, Some(carried)) => Some(carried),
        (stated, None) => stated,
    }
}

/// Earliest birth date accepted anywhere: records of people born in the 1800s are real.
const EARLIEST_BIRTH_DATE: NaiveDate = match NaiveDate::from_ymd_opt(1800, 1, 1) {
    Some(date) => date,
    None => NaiveDate::MIN,
};

/// The calendar-range rule shared by stated birth dates and birth dates carried by documents.
fn check_birth_date(date: NaiveDate, today: NaiveDate) -> Result<NaiveDate, Reason> {
    if date < EARLIEST_BIRTH_DATE {
        Err("birth date is before 1800-01-01")
    } else if date > today {
        Err("birth date is in the future")
    } else {
        Ok(date)
    }
}

fn format_date(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// Characters that must never be stored: C0/C1 controls, plus the Unicode line separators
/// and bidirectional overrides/isolates, which can reorder or split text when it is later
/// displayed or logged ("Trojan Source" style spoofing).
fn is_forbidden_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The invariants every free-text value shares: trimmed, non-empty, bounded, no controls,
/// and in Unicode normalisation form C.
///
/// NFC because blind indexes, pseudonyms and uniqueness compare bytes: "é" typed as one code
/// point and as "e" plus a combining accent are the same text to the person and must be
/// the same value to the vault. C, not KC: compatibility folding (full-width digits to
/// ASCII, ligatures) changes what a document says, composition does not.
fn clean_text(raw: &str, max_chars: usize, too_long: Reason) -> Result<Cow<'_, str>, Reason> {
    let text = raw.trim();
    if text.is_empty() {
        return Err("must not be empty");
    }
    // Checked before anything scans the whole value, so huge inputs are cheap to reject.
    if text.chars().nth(max_chars).is_some() {
        return Err(too_long);
    }
    if text.chars().any(is_forbidden_control) {
        return Err("must not contain control characters");
    }
    let text = nfc(text);
    // Composition shortens text, but a few characters decompose under NFC.
    if text.chars().nth(max_chars).is_some() {
        return Err(too_long);
    }
    Ok(text)
}

/// `text` in Unicode normalisation form C, borrowed when it already is (the common case).
/// Callers holding decrypted text put an owned result in a `Zeroizing` buffer.
pub fn nfc(text: &str) -> Cow<'_, str> {
    use unicode_normalization::UnicodeNormalization;
    if unicode_normalization::is_nfc(text) {
        Cow::Borrowed(text)
    } else {
        // NFC is at most three times longer in UTF-8 bytes (Unicode's stated bound): one
        // allocation, never grown, so no stray copy of the text is left behind by a
        // reallocation.
        let mut normalized = String::with_capacity(text.len() * 3);
        normalized.extend(text.nfc());
        Cow::Owned(normalized)
    }
}

/// Fixtures shared by the test modules of this domain.
#[cfg(test)]
mod test_support {
    use chrono::NaiveDate;

    /// The fixed "today" every test validates against.
    pub(crate) fn today() -> NaiveDate {
        date(2024, 6, 1)
    }

    pub(crate) fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    /// Appends the GB 11643 check character, computed independently of the code under test:
    /// weights derived as 2^(17-i) mod 11 and the standard's lookup table.
    pub(crate) fn with_check(body: &str) -> String {
        assert_eq!(body.len(), 17, "fixture body must be 17 digits");
        let sum: u32 = body
            .chars()
            .enumerate()
            .map(|(i, c)| c.to_digit(10).unwrap() * (2u32.pow(17 - i as u32) % 11))
            .sum();
        let check = "10X98765432".chars().nth((sum % 11) as usize).unwrap();
        format!("{body}{check}")
    }

    /// A resident ID from Nanning (450102) with the given birth date and sequence.
    pub(crate) fn guangxi_id(birth: &str, sequence: &str) -> String {
        with_check(&format!("450102{birth}{sequence}"))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{date, guangxi_id, today};
    use super::*;
    use proptest::prelude::*;

    fn full_input() -> IdentityInput {
        IdentityInput {
            name: Some("  张小三 ".into()),
            gender: Some(Gender::Male),
            id_type: Some(IdType::ResidentId),
            id_number: Some(guangxi_id("19900307", "123").to_lowercase()),
            date_of_birth: Some("1990-03-07".into()),
            nationality: Some("chn".into()),
            phone: Some("138 1234 5678".into()),
            email: Some("ZhangSan@Example.COM".into()),
            address: Some(" 广西壮族自治区南宁市青秀区民族大道100号 ".into()),
            postal_code: Some("530022".into()),
        }
    }

    fn reasons_for(violations: &[Violation], field: FieldName) -> Vec<&str> {
        violations
            .iter()
            .filter(|v| v.field == field.as_str())
            .map(|v| v.reason)
            .collect()
    }

    #[test]
    fn field_names_round_trip_in_contract_order() {
        let names: Vec<_> = FieldName::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "name",
                "gender",
                "id_type",
                "id_number",
                "date_of_birth",
                "nationality",
                "phone",
                "email",
                "address",
                "postal_code"
            ]
        );
        for f in FieldName::ALL {
            assert_eq!(FieldName::parse(f.as_str()), Some(f));
        }
        assert_eq!(FieldName::parse("Name"), None);
        assert_eq!(FieldName::parse(""), None);
    }

    #[test]
    fn full_identity_is_normalised_into_canonical_fields() {
        let identity = Identity::parse(full_input(), today()).unwrap();
        let id = guangxi_id("19900307", "123");
        let expected: Vec<(FieldName, String)> = vec![
            (FieldName::Name, "张小三".into()),
            (FieldName::Gender, "MALE".into()),
            (FieldName::IdType, "RESIDENT_ID".into()),
            (FieldName::IdNumber, id),
            (FieldName::DateOfBirth, "1990-03-07".into()),
            (FieldName::Nationality, "CHN".into()),
            (FieldName::Phone, "+8613812345678".into()),
            (FieldName::Email, "ZhangSan@example.com".into()),
            (
                FieldName::Address,
                "广西壮族自治区南宁市青秀区民族大道100号".into(),
            ),
            (FieldName::PostalCode, "530022".into()),
        ];
        assert_eq!(identity.canonical_fields(), expected);
        assert_eq!(identity.date_of_birth(), Some(date(1990, 3, 7)));
        assert_eq!(identity.gender(), Some(Gender::Male));
        assert_eq!(
            identity.phone().map(PhoneNumber::e164),
            Some("+8613812345678")
        );
        assert_eq!(
            identity.id_document().and_then(IdDocument::division_code),
            Some("450102")
        );
        assert!(!identity.is_empty());
    }

    #[test]
    fn lowercase_check_character_is_normalised() {
        // Find a Nanning number whose check character is X.
        let id = (0..1000)
            .map(|seq| guangxi_id("19900307", &format!("{seq:03}")))
            .find(|id| id.ends_with('X'))
            .unwrap();
        let input = IdentityInput {
            id_type: Some(IdType::ResidentId),
            id_number: Some(id.to_lowercase()),
            ..IdentityInput::default()
        };
        let identity = Identity::parse(input, today()).unwrap();
        assert_eq!(identity.canonical(FieldName::IdNumber), Some(id));
    }

    #[test]
    fn birth_date_and_gender_are_derived_from_the_document() {
        let input = IdentityInput {
            id_type: Some(IdType::ResidentId),
            id_number: Some(guangxi_id("19900307", "124")),
            ..IdentityInput::default()
        };
        let identity = Identity::parse(input, today()).unwrap();
        assert_eq!(identity.date_of_birth(), Some(date(1990, 3, 7)));
        assert_eq!(identity.gender(), Some(Gender::Female));
        let fields = identity.canonical_fields();
        assert!(fields.contains(&(FieldName::DateOfBirth, "1990-03-07".into())));
        assert!(fields.contains(&(FieldName::Gender, "FEMALE".into())));
    }

    #[test]
    fn stated_values_that_contradict_the_document_are_violations() {
        let input = IdentityInput {
            gender: Some(Gender::Female),
            date_of_birth: Some("1990-03-08".into()),
            ..full_input()
        };
        let violations = Identity::parse(input, today()).unwrap_err();
        assert_eq!(
            reasons_for(&violations, FieldName::DateOfBirth),
            ["does not match the birth date carried by id_number"]
        );
        assert_eq!(
            reasons_for(&violations, FieldName::Gender),
            ["does not match the gender carried by id_number"]
        );
        assert_eq!(violations.len(), 2);
    }

    #[test]
    fn documents_without_a_birth_date_keep_the_stated_values() {
        let input = IdentityInput {
            gender: Some(Gender::Female),
            id_type: Some(IdType::Passport),
            id_number: Some("e12345678".into()),
            date_of_birth: Some("1985-12-01".into()),
            ..IdentityInput::default()
        };
        let identity = Identity::parse(input, today()).unwrap();
        assert_eq!(identity.gender(), Some(Gender::Female));
        assert_eq!(identity.date_of_birth(), Some(date(1985, 12, 1)));
        assert_eq!(
            identity.canonical(FieldName::IdNumber).as_deref(),
            Some("E12345678")
        );
    }

    #[test]
    fn id_type_and_number_require_each_other() {
        let only_type = IdentityInput {
            id_type: Some(IdType::Passport),
            ..IdentityInput::default()
        };
        assert_eq!(
            Identity::parse(only_type, today()).unwrap_err(),
            [Violation::new(
                FieldName::IdNumber,
                "is required when id_type is given"
            )]
        );
        let only_number = IdentityInput {
            id_number: Some("E12345678".into()),
            ..IdentityInput::default()
        };
        assert_eq!(
            Identity::parse(only_number, today()).unwrap_err(),
            [Violation::new(
                FieldName::IdType,
                "is required when id_number is given"
            )]
        );
    }

    #[test]
    fn all_violations_are_reported_at_once_in_field_order() {
        let input = IdentityInput {
            postal_code: Some("5300".into()),
            email: Some("not-an-email".into()),
            phone: Some("+1 650 253 0000".into()),
            name: Some("张三3".into()),
            nationality: Some("ZZZ".into()),
            address: Some("a\u{0}b".into()),
            date_of_birth: Some("2030-01-01".into()),
            ..IdentityInput::default()
        };
        let violations = Identity::parse(input, today()).unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "date_of_birth",
                "nationality",
                "phone",
                "email",
                "address",
                "postal_code"
            ]
        );
        assert_eq!(
            reasons_for(&violations, FieldName::DateOfBirth),
            ["birth date is in the future"]
        );
    }

    #[test]
    fn a_bad_id_number_does_not_hide_other_violations() {
        let mut id = guangxi_id("19900307", "123");
        let wrong = if id.ends_with('1') { '2' } else { '1' };
        id.pop();
        id.push(wrong);
        let input = IdentityInput {
            id_number: Some(id),
            postal_code: Some("x".into()),
            ..full_input()
        };
        let violations = Identity::parse(input, today()).unwrap_err();
        assert_eq!(
            reasons_for(&violations, FieldName::IdNumber),
            ["check character does not match (ISO 7064 MOD 11-2)"]
        );
        assert_eq!(
            reasons_for(&violations, FieldName::PostalCode),
            ["must be 6 digits"]
        );
    }

    #[test]
    fn fifteen_digit_ids_are_stored_upgraded() {
        let input = IdentityInput {
            id_type: Some(IdType::ResidentId),
            id_number: Some("450102550307123".into()),
            ..IdentityInput::default()
        };
        let identity = Identity::parse(input, today()).unwrap();
        assert_eq!(
            identity.canonical(FieldName::IdNumber),
            Some(guangxi_id("19550307", "123"))
        );
        assert_eq!(identity.date_of_birth(), Some(date(1955, 3, 7)));
    }

    #[test]
    fn canonical_fields_round_trip_through_input_from_canonical() {
        let identity = Identity::parse(full_input(), today()).unwrap();
        let fields = identity.canonical_fields();
        let again = Identity::parse(Identity::input_from_canonical(&fields), today()).unwrap();
        assert_eq!(again.canonical_fields(), fields);
        assert_eq!(again, identity);
    }

    #[test]
    fn input_from_canonical_merges_later_values_and_skips_empty_ones() {
        let fields = vec![
            (FieldName::Phone, "+8613812345678".to_owned()),
            (FieldName::Phone, "+8613912345678".to_owned()),
            (FieldName::Email, String::new()),
            (FieldName::Gender, "FEMALE".to_owned()),
        ];
        let input = IdentityInput::from_canonical(&fields);
        assert_eq!(input.phone.as_deref(), Some("+8613912345678"));
        assert_eq!(input.email, None);
        assert_eq!(input.gender, Some(Gender::Female));
    }

    #[test]
    fn unknown_enum_names_are_dropped_or_reported() {
        let fields = vec![
            (FieldName::Gender, "male".to_owned()),
            (FieldName::IdType, "ID_CARD".to_owned()),
        ];
        let lenient = IdentityInput::from_canonical(&fields);
        assert_eq!((lenient.gender, lenient.id_type), (None, None));
        let strict = IdentityInput::try_from_canonical(&fields).unwrap_err();
        assert_eq!(
            strict,
            [
                Violation::new(FieldName::Gender, "is not a recognised value"),
                Violation::new(FieldName::IdType, "is not a recognised value"),
            ]
        );
    }

    #[test]
    fn empty_input_gives_an_empty_identity() {
        let identity = Identity::parse(IdentityInput::default(), today()).unwrap();
        assert!(identity.is_empty());
        assert!(identity.canonical_fields().is_empty());
        assert_eq!(identity.id_document(), None);
        assert_eq!(identity.phone(), None);
        assert_eq!(identity.date_of_birth(), None);
    }

    #[test]
    fn debug_output_never_contains_values() {
        let input = full_input();
        let input_debug = format!("{input:?}");
        let identity = Identity::parse(input, today()).unwrap();
        let identity_debug = format!("{identity:?} {identity:#?}");
        for debug in [&input_debug, &identity_debug] {
            for needle in [
                "张小三",
                "450102",
                "1990",
                "138",
                "ZhangSan",
                "CHN",
                "chn",
                "南宁",
                "530022",
                "Male",
                "MALE",
            ] {
                assert!(!debug.contains(needle), "{needle} leaked into {debug}");
            }
            assert!(debug.contains("<redacted>"));
        }
        assert!(input_debug.contains("ResidentId"));
    }

    #[test]
    fn violation_display_names_field_and_reason_only() {
        let v = Violation::new(FieldName::PostalCode, "must be 6 digits");
        assert_eq!(v.to_string(), "postal_code: must be 6 digits");
    }

    #[test]
    fn clean_text_enforces_the_shared_invariants() {
        assert_eq!(clean_text("  ab  ", 2, "too long").as_deref(), Ok("ab"));
        assert_eq!(
            clean_text(" \u{3000} ", 2, "too long"),
            Err("must not be empty")
        );
        assert_eq!(clean_text("abc", 2, "too long"), Err("too long"));
        for bad in [
            "a\u{7}b",
            "a\nb",
            "a\u{85}b",
            "a\u{202E}b",
            "a\u{2028}b",
            "a\u{2066}b",
        ] {
            assert_eq!(
                clean_text(bad, 10, "too long"),
                Err("must not contain control characters")
            );
        }
    }

    #[test]
    fn equivalent_spellings_normalise_to_one_value() {
        let precomposed = "Jos\u{e9} N\u{fa}\u{f1}ez";
        let decomposed = "Jose\u{301} Nu\u{301}n\u{303}ez";
        assert_ne!(precomposed, decomposed);
        let name = |raw| PersonName::parse(raw).unwrap().as_str().to_owned();
        assert_eq!(name(decomposed), precomposed);
        assert_eq!(name(precomposed), precomposed);
        let address = |raw| Address::parse(raw).unwrap().as_str().to_owned();
        assert_eq!(address("Cafe\u{301} 1"), "Caf\u{e9} 1");
        let other = |raw| {
            IdDocument::parse(IdType::Other, raw, test_support::today())
                .unwrap()
                .number()
                .to_owned()
        };
        assert_eq!(other("N\u{303}-123"), "\u{d1}-123");
        // Compatibility forms are not folded: a full-width digit stays what it is.
        assert_eq!(other("\u{ff11}23"), "\u{ff11}23");
        assert!(matches!(nfc("already NFC"), Cow::Borrowed(_)));
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            any::<String>().prop_map(Some),
            "[0-9A-Za-z@.+ -]{0,24}".prop_map(Some),
        ]
    }

    fn arbitrary_input() -> impl Strategy<Value = IdentityInput> {
        (
            (opt_text(), opt_text(), opt_text(), opt_text(), opt_text()),
            (opt_text(), opt_text(), opt_text()),
            proptest::option::of(prop_oneof![Just(Gender::Male), Just(Gender::Female)]),
            proptest::option::of(proptest::sample::select(IdType::ALL.to_vec())),
        )
            .prop_map(
                |(
                    (name, id_number, dob, nationality, phone),
                    (email, address, postal),
                    gender,
                    id_type,
                )| {
                    IdentityInput {
                        name,
                        gender,
                        id_type,
                        id_number,
                        date_of_birth: dob,
                        nationality,
                        phone,
                        email,
                        address,
                        postal_code: postal,
                    }
                },
            )
    }

    fn values(input: &IdentityInput) -> Vec<String> {
        [
            &input.name,
            &input.id_number,
            &input.date_of_birth,
            &input.nationality,
            &input.phone,
            &input.email,
            &input.address,
            &input.postal_code,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_reasons_never_echo_input(input in arbitrary_input()) {
            let values = values(&input);
            match Identity::parse(input, today()) {
                Ok(identity) => {
                    // Canonical output is stable under re-parsing.
                    let fields = identity.canonical_fields();
                    let again = Identity::parse(Identity::input_from_canonical(&fields), today());
                    prop_assert_eq!(again.map(|i| i.canonical_fields()), Ok(fields));
                }
                Err(violations) => {
                    prop_assert!(!violations.is_empty());
                    for v in &violations {
                        prop_assert!(FieldName::parse(&v.field).is_some());
                        for value in &values {
                            let value = value.trim();
                            if value.chars().count() >= 4 {
                                prop_assert!(!v.reason.contains(value));
                            }
                        }
                    }
                }
            }
        }
    }
}
