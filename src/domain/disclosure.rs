//! Partial disclosure of canonical field values: display masking ("张*三", "138****1234") and
//! generalisation (birth year, region, division code) for policies that release less than
//! the full value.
//!
//! Both functions take the canonical string produced by `Identity::canonical_fields`, because
//! that (decrypted) string is all the release path has. They are total and never echo a value
//! they do not understand: a maskable field whose value has an unexpected shape is masked
//! completely rather than passed through.

use super::FieldName;

/// Shown in place of everything that is hidden without a character-for-character shape.
const HIDDEN: &str = "****";

/// Whether [`mask`] has a masked form for `field` (for policy/config validation).
pub fn supports_mask(field: FieldName) -> bool {
    !matches!(
        field,
        FieldName::Gender | FieldName::IdType | FieldName::Nationality
    )
}

/// Whether [`generalize`] can produce a generalised form for `field`.
pub fn supports_generalize(field: FieldName) -> bool {
    matches!(
        field,
        FieldName::DateOfBirth | FieldName::Address | FieldName::IdNumber | FieldName::PostalCode
    )
}

/// The display mask of a canonical value, or `None` when the field has no masked form
/// (gender, id_type and nationality are released plain, generalised or not at all).
pub fn mask(field: FieldName, canonical: &str) -> Option<String> {
    let masked = match field {
        FieldName::Name => mask_name(canonical),
        FieldName::IdNumber => mask_document_number(canonical),
        FieldName::DateOfBirth => {
            birth_year(canonical).map_or_else(hidden, |y| format!("{y}-**-**"))
        }
        FieldName::Phone => mask_phone(canonical).unwrap_or_else(hidden),
        FieldName::Email => mask_email(canonical).unwrap_or_else(hidden),
        FieldName::Address => format!("{}{HIDDEN}", admin_prefix(canonical).full()),
        FieldName::PostalCode => {
            six_digits(canonical).map_or_else(hidden, |c| keep_head(c, 3, '*'))
        }
        FieldName::Gender | FieldName::IdType | FieldName::Nationality => return None,
    };
    Some(masked)
}

/// The generalised form of a canonical value, or `None` when there is none for this field or
/// this value: birth year, province + city, 6-digit division code, postal area.
pub fn generalize(field: FieldName, canonical: &str) -> Option<String> {
    match field {
        FieldName::DateOfBirth => birth_year(canonical).map(str::to_owned),
        FieldName::Address => admin_prefix(canonical).region().map(str::to_owned),
        FieldName::IdNumber => division_code(canonical).map(str::to_owned),
        FieldName::PostalCode => six_digits(canonical).map(|c| keep_head(c, 2, '0')),
        _ => None,
    }
}

fn hidden() -> String {
    HIDDEN.to_owned()
}

/// Keeps the first `keep` chars and replaces every other char with `fill`.
fn keep_head(value: &str, keep: usize, fill: char) -> String {
    value
        .chars()
        .enumerate()
        .map(|(i, c)| if i < keep { c } else { fill })
        .collect()
}

/// Keeps `head` leading and `tail` trailing chars, one star per hidden char.
fn keep_ends(value: &str, head: usize, tail: usize) -> String {
    let len = value.chars().count();
    let tail_start = len.saturating_sub(tail);
    value
        .chars()
        .enumerate()
        .map(|(i, c)| if i < head || i >= tail_start { c } else { '*' })
        .collect()
}

/// Chinese convention keeps the surname (first char) and, for 3+ chars, the last char;
/// space-separated or pure-ASCII names keep each word's initial.
fn mask_name(name: &str) -> String {
    let masked = if name.contains(' ') || name.is_ascii() {
        name.split(' ')
            .map(|word| keep_head(word, 1, '*'))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        match name.chars().count() {
            0 | 1 => "*".to_owned(),
            2 => keep_head(name, 1, '*'),
            _ => keep_ends(name, 1, 1),
        }
    };
    // Names made only of one-letter words would otherwise be shown in full.
    if masked.contains('*') {
        masked
    } else {
        match name.chars().count() {
            0 | 1 => "*".to_owned(),
            _ => keep_head(name, 1, '*'),
        }
    }
}

/// Long numbers keep 3 + 4 so the embedded birth date (digits 7-14) is always hidden; short
/// ones (passports, permits) keep at most 1 + 2 and never more than half.
fn mask_document_number(number: &str) -> String {
    let len = number.chars().count();
    let (head, tail) = if len >= 15 {
        (3, 4)
    } else {
        let budget = len / 2;
        let head = budget.min(1);
        (head, (budget - head).min(2))
    };
    keep_ends(number, head, tail)
}

/// "+8613812341234" -> "138****1234"; landlines keep trunk 0 + area code and the last 4.
fn mask_phone(e164: &str) -> Option<String> {
    let national = e164.strip_prefix("+86")?;
    if national.is_empty() || !national.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if national.len() == 11 && national.starts_with('1') {
        let (head, tail) = (national.get(..3)?, national.get(7..)?);
        return Some(format!("{head}****{tail}"));
    }
    // Beijing (10) and the 2x cities have 2-digit area codes, everywhere else 3 digits.
    let area_len = if national.starts_with("10") || national.starts_with('2') {
        2
    } else {
        3
    };
    let tail_start = national.len().checked_sub(4).filter(|&t| t > area_len)?;
    let (area, tail) = (national.get(..area_len)?, national.get(tail_start..)?);
    Some(format!("0{area}****{tail}"))
}

/// "zhangsan@example.com" -> "z***@example.com": the domain is not personal to the user.
fn mask_email(email: &str) -> Option<String> {
    let (local, domain) = email.rsplit_once('@')?;
    let first = local.chars().next()?;
    Some(format!("{first}***@{domain}"))
}

/// The year of a canonical `YYYY-MM-DD` date.
fn birth_year(date: &str) -> Option<&str> {
    let shape_ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    shape_ok.then(|| date.get(..4)).flatten()
}

fn six_digits(code: &str) -> Option<&str> {
    (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())).then_some(code)
}

/// The region prefix of a GB 11643-style number: 17 digits and a check digit or X. Only the
/// shape is visible here, so this covers resident IDs, HK/Macau/Taiwan residence permits and
/// the new foreign permanent residence ID alike.
fn division_code(number: &str) -> Option<&str> {
    let bytes = number.as_bytes();
    let shape_ok = bytes.len() == 18
        && bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b.is_ascii_digit() || (i == 17 && b == b'X'));
    shape_ok.then(|| number.get(..6)).flatten()
}

/// Province-level divisions, by full official name; a list because the province level is
/// fixed and its suffixes (市 for municipalities) are too ambiguous to match on their own.
const PROVINCES: [&str; 34] = [
    "北京市",
    "天津市",
    "上海市",
    "重庆市",
    "河北省",
    "山西省",
    "辽宁省",
    "吉林省",
    "黑龙江省",
    "江苏省",
    "浙江省",
    "安徽省",
    "福建省",
    "江西省",
    "山东省",
    "河南省",
    "湖北省",
    "湖南省",
    "广东省",
    "海南省",
    "四川省",
    "贵州省",
    "云南省",
    "陕西省",
    "甘肃省",
    "青海省",
    "台湾省",
    "内蒙古自治区",
    "广西壮族自治区",
    "西藏自治区",
    "宁夏回族自治区",
    "新疆维吾尔自治区",
    "香港特别行政区",
    "澳门特别行政区",
];

/// Province-level divisions with no prefecture level below them.
const WITHOUT_PREFECTURES: [&str; 6] = [
    "北京市",
    "天津市",
    "上海市",
    "重庆市",
    "香港特别行政区",
    "澳门特别行政区",
];

/// Prefecture level: city, league (盟), prefecture (地区), autonomous prefecture.
const CITY_ENDINGS: [&str; 4] = ["市", "盟", "地区", "自治州"];
/// County level: district, county, banner (旗), county-level city; autonomous variants and
/// forestry districts (林区) end the same way.
const COUNTY_ENDINGS: [char; 4] = ['区', '县', '旗', '市'];
/// Longest real names: e.g. 克孜勒苏柯尔克孜自治州 (11), 双江拉祜族佤族布朗族傣族自治县 (15).
const MAX_CITY_CHARS: usize = 12;
const MAX_COUNTY_CHARS: usize = 16;

/// Characters that occur in street addresses but not (after the first char) in division
/// names; a candidate containing one is a street fragment, not a division.
const STREET_CHARS: [char; 11] = [
    '路', '道', '街', '巷', '弄', '村', '号', '楼', '栋', '幢', '室',
];
/// Place words that end like a division but are not one.
const NON_DIVISION_ENDINGS: [&str; 14] = [
    "小区",
    "社区",
    "校区",
    "园区",
    "厂区",
    "景区",
    "街区",
    "片区",
    "营区",
    "院区",
    "生活区",
    "住宅区",
    "工业区",
    "开发区",
];
const NON_DIVISION_WORDS: [&str; 5] = ["城市", "超市", "门市", "夜市", "都市"];

/// The recognised administrative prefix of an address, as lengths of its consecutive parts.
struct AdminPrefix<'a> {
    address: &'a str,
    province: usize,
    city: usize,
    county: usize,
}

impl<'a> AdminPrefix<'a> {
    /// Province + city + county as written, or "" when nothing was recognised.
    fn full(&self) -> &'a str {
        self.address
            .get(..self.province + self.city + self.county)
            .unwrap_or("")
    }

    /// Province + city, or None when neither was recognised.
    fn region(&self) -> Option<&'a str> {
        self.address
            .get(..self.province + self.city)
            .filter(|region| !region.is_empty())
    }
}

/// Recognises province / city / county at the start of an address. A county is only taken
/// after a recognised province or city: on its own, "…区" is too often a housing estate.
fn admin_prefix(address: &str) -> AdminPrefix<'_> {
    let province = PROVINCES
        .into_iter()
        .find(|p| address.starts_with(p))
        .unwrap_or("");
    let rest = address.get(province.len()..).unwrap_or("");
    let city = if WITHOUT_PREFECTURES.contains(&province) {
        ""
    } else {
        city_level(rest).unwrap_or("")
    };
    let rest = rest.get(city.len()..).unwrap_or("");
    let county = if province.is_empty() && city.is_empty() {
        ""
    } else {
        county_level(rest).unwrap_or("")
    };
    AdminPrefix {
        address,
        province: province.len(),
        city: city.len(),
        county: county.len(),
    }
}

fn city_level(rest: &str) -> Option<&str> {
    let candidate = shortest_prefix(rest, MAX_CITY_CHARS, |p| {
        CITY_ENDINGS.iter().any(|e| p.ends_with(e))
    })?;
    is_division_name(candidate).then_some(candidate)
}

fn county_level(rest: &str) -> Option<&str> {
    let candidate = shortest_prefix(rest, MAX_COUNTY_CHARS, |p| p.ends_with(COUNTY_ENDINGS))?;
    // "沙市区": the shortest match "沙市" is followed by another level ending.
    let extended = rest
        .get(candidate.len()..)
        .and_then(|after| after.chars().next())
        .filter(|c| COUNTY_ENDINGS.contains(c))
        .and_then(|c| rest.get(..candidate.len() + c.len_utf8()));
    let candidate = extended.unwrap_or(candidate);
    is_division_name(candidate).then_some(candidate)
}

/// The shortest prefix of at least 2 and at most `max_chars` chars accepted by `ends_ok`.
fn shortest_prefix(text: &str, max_chars: usize, ends_ok: impl Fn(&str) -> bool) -> Option<&str> {
    text.char_indices()
        .take(max_chars)
        .skip(1)
        .filter_map(|(i, c)| text.get(..i + c.len_utf8()))
        .find(|prefix| ends_ok(prefix))
}

fn is_division_name(name: &str) -> bool {
    name.chars().all(is_han)
        && !name.chars().skip(1).any(|c| STREET_CHARS.contains(&c))
        && !NON_DIVISION_ENDINGS.iter().any(|e| name.ends_with(e))
        && !NON_DIVISION_WORDS.contains(&name)
}

/// CJK Unified Ideographs and Extension A: division names are written in Han characters only.
fn is_han(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}
