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
    // A leading 9 is a foreign permanent residence ID: its prefix is a province and a
    // nationality, not a division code, and would disclose the nationality.
    let shape_ok = bytes.len() == 18
        && bytes[0] != b'9'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b.is_ascii_digit() || (i == 17 && b == b'X'));
    shape_ok.then(|| number.get(..6)).flatten()
}

/// Province-level divisions, by full official name; a list because the province level is
/// fixed and its suffixes (市 for municipalities) are too ambiguous to match on their own.
#[rustfmt::skip]
const PROVINCES: [&str; 34] = [
    "北京市", "天津市", "上海市", "重庆市", "河北省", "山西省", "辽宁省", "吉林省",
    "黑龙江省", "江苏省", "浙江省", "安徽省", "福建省", "江西省", "山东省", "河南省",
    "湖北省", "湖南省", "广东省", "海南省", "四川省", "贵州省", "云南省", "陕西省",
    "甘肃省", "青海省", "台湾省", "内蒙古自治区", "广西壮族自治区", "西藏自治区",
    "宁夏回族自治区", "新疆维吾尔自治区", "香港特别行政区", "澳门特别行政区",
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
/// names; a candidate containing one is a street fragment, not a division. ("楼" is not
/// here: 鼓楼区 and 钟楼区 are real districts.)
const STREET_CHARS: [char; 10] = ['路', '道', '街', '巷', '弄', '村', '号', '栋', '幢', '室'];
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(field: FieldName, value: &str) -> String {
        mask(field, value).unwrap()
    }

    #[test]
    fn foreign_permanent_residence_ids_have_no_division_code_to_generalise_to() {
        // 9 + province 45 + nationality code 840: generalising would disclose nationality.
        assert_eq!(generalize(FieldName::IdNumber, "945840199001011234"), None);
        assert_eq!(
            generalize(FieldName::IdNumber, "450102199003071234").as_deref(),
            Some("450102")
        );
    }

    fn address_mask(address: &str) -> String {
        m(FieldName::Address, address)
    }

    #[test]
    fn chinese_names_keep_the_surname() {
        assert_eq!(m(FieldName::Name, "张"), "*");
        assert_eq!(m(FieldName::Name, "张三"), "张*");
        assert_eq!(m(FieldName::Name, "张小三"), "张*三");
        assert_eq!(m(FieldName::Name, "欧阳娜娜"), "欧**娜");
        assert_eq!(m(FieldName::Name, "阿卜杜拉·买买提"), "阿******提");
    }

    #[test]
    fn latin_names_keep_each_initial() {
        assert_eq!(m(FieldName::Name, "John Smith"), "J*** S****");
        assert_eq!(m(FieldName::Name, "Madonna"), "M******");
        assert_eq!(m(FieldName::Name, "Иван Петров"), "И*** П*****");
        // One-letter words would otherwise be shown whole.
        assert_eq!(m(FieldName::Name, "A B"), "A**");
        assert_eq!(m(FieldName::Name, "A"), "*");
    }

    #[test]
    fn id_numbers_hide_the_birth_date() {
        assert_eq!(
            m(FieldName::IdNumber, "450102199003071234"),
            "450***********1234"
        );
        assert_eq!(
            m(FieldName::IdNumber, "11010519491231002X"),
            "110***********002X"
        );
        assert_eq!(m(FieldName::IdNumber, "KAZ110090123105"), "KAZ********3105");
    }

    #[test]
    fn short_document_numbers_hide_at_least_half() {
        assert_eq!(m(FieldName::IdNumber, "H12345678"), "H******78");
        assert_eq!(m(FieldName::IdNumber, "E1234"), "E***4");
        assert_eq!(m(FieldName::IdNumber, "12345678"), "1*****78");
        assert_eq!(m(FieldName::IdNumber, "AB"), "A*");
        assert_eq!(m(FieldName::IdNumber, "A"), "*");
        assert_eq!(m(FieldName::IdNumber, "军官证123"), "军***23");
    }

    #[test]
    fn phones_show_in_national_display_form() {
        assert_eq!(m(FieldName::Phone, "+8613812341234"), "138****1234");
        assert_eq!(m(FieldName::Phone, "+8677156785678"), "0771****5678");
        assert_eq!(m(FieldName::Phone, "+867715601234"), "0771****1234");
        assert_eq!(m(FieldName::Phone, "+861062345678"), "010****5678");
        assert_eq!(m(FieldName::Phone, "+862087654321"), "020****4321");
        for unexpected in ["13812341234", "+86", "+86abc", "+8612345"] {
            assert_eq!(m(FieldName::Phone, unexpected), "****", "{unexpected}");
        }
    }

    #[test]
    fn emails_keep_the_first_character_and_the_domain() {
        assert_eq!(
            m(FieldName::Email, "zhangsan@example.com"),
            "z***@example.com"
        );
        assert_eq!(m(FieldName::Email, "张三@例子.中国"), "张***@例子.中国");
        assert_eq!(m(FieldName::Email, "no-at-sign"), "****");
        assert_eq!(m(FieldName::Email, "@example.com"), "****");
    }

    #[test]
    fn dates_and_postal_codes() {
        assert_eq!(m(FieldName::DateOfBirth, "1990-03-07"), "1990-**-**");
        assert_eq!(m(FieldName::DateOfBirth, "1990/03/07"), "****");
        assert_eq!(m(FieldName::PostalCode, "530022"), "530***");
        assert_eq!(m(FieldName::PostalCode, "5300"), "****");
    }

    #[test]
    fn addresses_keep_the_administrative_prefix() {
        let cases = [
            (
                "广西壮族自治区南宁市青秀区民族大道100号",
                "广西壮族自治区南宁市青秀区****",
            ),
            (
                "广西壮族自治区南宁市西乡塘区大学东路",
                "广西壮族自治区南宁市西乡塘区****",
            ),
            ("北京市朝阳区望京花园小区3号楼", "北京市朝阳区****"),
            ("上海市浦东新区世纪大道1号", "上海市浦东新区****"),
            ("重庆市渝中区解放碑", "重庆市渝中区****"),
            ("湖北省荆州市沙市区北京路", "湖北省荆州市沙市区****"),
            ("山东省济南市市中区经四路", "山东省济南市市中区****"),
            ("江苏省南京市鼓楼区中山路", "江苏省南京市鼓楼区****"),
            ("湖北省仙桃市沙嘴街道杨林小区", "湖北省仙桃市****"),
            ("湖北省神农架林区松柏镇", "湖北省神农架林区****"),
            (
                "海南省琼中黎族苗族自治县营根镇",
                "海南省琼中黎族苗族自治县****",
            ),
            (
                "内蒙古自治区锡林郭勒盟锡林浩特市额尔敦路",
                "内蒙古自治区锡林郭勒盟锡林浩特市****",
            ),
            (
                "内蒙古自治区鄂尔多斯市乌审旗嘎鲁图镇",
                "内蒙古自治区鄂尔多斯市乌审旗****",
            ),
            (
                "新疆维吾尔自治区克孜勒苏柯尔克孜自治州阿图什市",
                "新疆维吾尔自治区克孜勒苏柯尔克孜自治州阿图什市****",
            ),
            (
                "西藏自治区阿里地区噶尔县狮泉河镇",
                "西藏自治区阿里地区噶尔县****",
            ),
            (
                "香港特别行政区油尖旺区弥敦道1号",
                "香港特别行政区油尖旺区****",
            ),
            ("南宁市青秀区民族大道100号", "南宁市青秀区****"),
            (
                "广西壮族自治区南宁市人民路东区5号",
                "广西壮族自治区南宁市****",
            ),
            ("广西壮族自治区", "广西壮族自治区****"),
        ];
        for (address, masked) in cases {
            assert_eq!(address_mask(address), masked, "{address}");
        }
    }

    #[test]
    fn addresses_without_a_recognised_prefix_are_fully_hidden() {
        for address in [
            "民族大道100号",
            "青秀区民族大道100号",
            "阳光花园东区5栋",
            "城市花园3栋",
            "1600 Amphitheatre Parkway, Mountain View",
            "",
        ] {
            assert_eq!(address_mask(address), "****", "{address}");
        }
    }

    #[test]
    fn unmaskable_fields() {
        for f in [FieldName::Gender, FieldName::IdType, FieldName::Nationality] {
            assert_eq!(mask(f, "MALE"), None);
            assert!(!supports_mask(f));
        }
        for f in FieldName::ALL {
            assert_eq!(supports_mask(f), mask(f, "x").is_some());
        }
    }

    #[test]
    fn generalisations() {
        let g = |f, v| generalize(f, v);
        assert_eq!(
            g(FieldName::DateOfBirth, "1990-03-07").as_deref(),
            Some("1990")
        );
        assert_eq!(g(FieldName::DateOfBirth, "1990"), None);
        assert_eq!(
            g(
                FieldName::Address,
                "广西壮族自治区南宁市青秀区民族大道100号"
            )
            .as_deref(),
            Some("广西壮族自治区南宁市")
        );
        assert_eq!(
            g(FieldName::Address, "北京市朝阳区望京").as_deref(),
            Some("北京市")
        );
        assert_eq!(
            g(FieldName::Address, "南宁市青秀区").as_deref(),
            Some("南宁市")
        );
        assert_eq!(g(FieldName::Address, "民族大道100号"), None);
        assert_eq!(
            g(FieldName::IdNumber, "450102199003071234").as_deref(),
            Some("450102")
        );
        assert_eq!(
            g(FieldName::IdNumber, "11010519491231002X").as_deref(),
            Some("110105")
        );
        assert_eq!(
            g(FieldName::IdNumber, "810000199003071241").as_deref(),
            Some("810000")
        );
        assert_eq!(g(FieldName::IdNumber, "911398199012310021"), None);
        for other in [
            "H12345678",
            "E12345678",
            "KAZ110090123105",
            "1101051949123100XX",
            "11010519491231002",
        ] {
            assert_eq!(g(FieldName::IdNumber, other), None, "{other}");
        }
        assert_eq!(
            g(FieldName::PostalCode, "530022").as_deref(),
            Some("530000")
        );
        assert_eq!(g(FieldName::PostalCode, "53002"), None);
        for f in [
            FieldName::Name,
            FieldName::Gender,
            FieldName::IdType,
            FieldName::Nationality,
            FieldName::Phone,
            FieldName::Email,
        ] {
            assert_eq!(g(f, "MALE"), None);
            assert!(!supports_generalize(f));
        }
        for f in [
            FieldName::DateOfBirth,
            FieldName::Address,
            FieldName::IdNumber,
            FieldName::PostalCode,
        ] {
            assert!(supports_generalize(f));
        }
    }

    proptest! {
        #[test]
        fn total_on_any_string(value in any::<String>(), field in proptest::sample::select(FieldName::ALL.to_vec())) {
            let masked = mask(field, &value);
            prop_assert_eq!(masked.is_some(), supports_mask(field));
            if let Some(masked) = masked {
                // A value with something to hide is never shown whole.
                if value.chars().count() >= 2 && !value.contains('*') {
                    prop_assert_ne!(masked, value.clone());
                }
            }
            if generalize(field, &value).is_some() {
                prop_assert!(supports_generalize(field));
            }
        }

        #[test]
        fn document_masks_keep_length_and_hide_at_least_half(number in "[0-9A-Z]{1,18}|\\PC{1,64}") {
            let masked = m(FieldName::IdNumber, &number);
            let len = number.chars().count();
            prop_assert_eq!(masked.chars().count(), len);
            let hidden = masked.chars().zip(number.chars()).filter(|(m, n)| m != n || *m == '*').count();
            prop_assert!(hidden * 2 >= len);
        }

        #[test]
        fn birth_digits_of_18_char_numbers_are_always_hidden(number in "[0-9]{17}[0-9X]") {
            let masked = m(FieldName::IdNumber, &number);
            prop_assert!(masked.chars().skip(6).take(8).all(|c| c == '*'));
            let expected = (!number.starts_with('9')).then(|| number[..6].to_owned());
            prop_assert_eq!(generalize(FieldName::IdNumber, &number), expected);
        }

        #[test]
        fn mobile_masks_show_three_and_four(national in "1[3-9][0-9]{9}") {
            let masked = m(FieldName::Phone, &format!("+86{national}"));
            prop_assert_eq!(masked, format!("{}****{}", &national[..3], &national[7..]));
        }

        #[test]
        fn address_masks_never_reveal_beyond_the_prefix(street in "[0-9A-Za-z路号楼栋室大道街]{0,20}") {
            let address = format!("广西壮族自治区南宁市青秀区{street}");
            prop_assert_eq!(address_mask(&address), "广西壮族自治区南宁市青秀区****");
        }
    }
}
