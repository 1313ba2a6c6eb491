//! Synthetic identities for load: valid enough that the vault accepts them (GB 11643 resident
//! IDs with their ISO 7064 MOD 11-2 check character, adult birth dates, mainland mobile
//! numbers), distinct per index, and reproducible from a run's salt so the load generator can
//! look a seeded person up again without keeping their data.
//!
//! They are not real people, but they are still identities to every layer that sees them, so
//! nothing here implements `Display` or `Debug` for them and the harness never prints them.

use chrono::{Days, NaiveDate};

use pdvault::proto;

/// County-level division codes whose provinces exist; the vault checks only the province.
const DIVISIONS: [&str; 16] = [
    "110101", "110105", "310101", "310104", "440103", "440305", "450102", "510104", "330106",
    "320102", "420102", "610103", "370102", "210102", "350102", "430102",
];
/// Birth dates run over 1950-01-01 ..= 1999-12-31: adults, so no release needs a guardian.
const BIRTH_DAYS: u64 = 18_262;
const SEQUENCES: u64 = 1_000;
const SPACE: u64 = DIVISIONS.len() as u64 * BIRTH_DAYS * SEQUENCES;
/// A prime that divides none of `SPACE`'s factors, so `i * STRIDE mod SPACE` never repeats
/// for `i < SPACE`: indexes map to distinct documents.
const STRIDE: u64 = 1_000_003;
const MOBILE_PREFIXES: [&str; 8] = ["138", "139", "150", "151", "158", "186", "187", "188"];
const SURNAMES: [&str; 12] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙",
];
const GIVEN: [&str; 16] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
];

/// Makes the `index`-th identity of a run. Different salts give (almost surely) disjoint
/// sets, so runs against a long-lived vault rarely collide with earlier runs' records.
#[derive(Clone, Copy)]
pub struct IdentityGenerator {
    salt: u64,
}

impl IdentityGenerator {
    pub fn new(salt: u64) -> IdentityGenerator {
        IdentityGenerator { salt }
    }

    fn slot(&self, index: u64) -> u64 {
        (self.salt % SPACE + (index % SPACE) * STRIDE % SPACE) % SPACE
    }

    /// The resident ID number of the `index`-th identity.
    pub fn id_number(&self, index: u64) -> String {
        let slot = self.slot(index);
        let division = DIVISIONS[(slot % DIVISIONS.len() as u64) as usize];
        let rest = slot / DIVISIONS.len() as u64;
        let day = rest % BIRTH_DAYS;
        let sequence = rest / BIRTH_DAYS;
        let birth = NaiveDate::from_ymd_opt(1950, 1, 1)
            .and_then(|d| d.checked_add_days(Days::new(day)))
            .expect("birth dates stay within 1950..2000");
        let first17 = format!("{division}{}{sequence:03}", birth.format("%Y%m%d"));
        let check = check_character(&first17);
        format!("{first17}{check}")
    }

    /// The mainland mobile number of the `index`-th identity.
    pub fn phone(&self, index: u64) -> String {
        let slot = self.slot(index);
        let prefix = MOBILE_PREFIXES[(slot % MOBILE_PREFIXES.len() as u64) as usize];
        format!("{prefix}{:08}", (slot / 7) % 100_000_000)
    }

    /// All ten fields (gender and date of birth as the ID number implies them).
    pub fn identity(&self, index: u64) -> proto::Identity {
        let slot = self.slot(index);
        let surname = SURNAMES[(slot % SURNAMES.len() as u64) as usize];
        let given = GIVEN[((slot / 12) % GIVEN.len() as u64) as usize];
        let given2 = GIVEN[((slot / 192) % GIVEN.len() as u64) as usize];
        let id_number = self.id_number(index);
        let gender = if id_number.as_bytes()[16] % 2 == 1 {
            proto::Gender::Male
        } else {
            proto::Gender::Female
        };
        let date_of_birth = format!(
            "{}-{}-{}",
            &id_number[6..10],
            &id_number[10..12],
            &id_number[12..14]
        );
        proto::Identity {
            name: format!("{surname}{given}{given2}"),
            gender: gender as i32,
            id_type: proto::IdType::ResidentId as i32,
            id_number,
            date_of_birth,
            nationality: "CHN".into(),
            phone: self.phone(index),
            email: format!("user{slot}@example.com"),
            address: format!("北京市东城区东长安街{}号", slot % 999 + 1),
            postal_code: "100010".into(),
        }
    }
}

/// ISO 7064 MOD 11-2 check character over the first 17 digits.
fn check_character(first17: &str) -> char {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17
        .bytes()
        .zip(WEIGHTS)
        .map(|(digit, weight)| u32::from(digit - b'0') * weight)
        .sum();
    char::from(b"10X98765432"[(sum % 11) as usize])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use pdvault::domain::{IdDocument, IdType, PhoneNumber};

    #[test]
    fn check_character_matches_the_standards_example() {
        // GB 11643-1999's worked example.
        assert_eq!(check_character("11010519491231002"), 'X');
    }

    #[test]
    fn generated_identities_pass_the_vaults_validation_and_are_distinct() {
        let today = NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
        let generator = IdentityGenerator::new(0x5eed_1234_abcd);
        let mut documents = HashSet::new();
        for index in (0..20_000).chain([SPACE - 1, 123_456_789]) {
            let identity = generator.identity(index);
            let input = pdvault::domain::IdentityInput {
                name: Some(identity.name.clone()),
                gender: pdvault::domain::Gender::parse(if identity.gender == 1 {
                    "MALE"
                } else {
                    "FEMALE"
                }),
                id_type: Some(IdType::ResidentId),
                id_number: Some(identity.id_number.clone()),
                date_of_birth: Some(identity.date_of_birth.clone()),
                nationality: Some(identity.nationality.clone()),
                phone: Some(identity.phone.clone()),
                email: Some(identity.email.clone()),
                address: Some(identity.address.clone()),
                postal_code: Some(identity.postal_code.clone()),
            };
            let parsed = pdvault::domain::Identity::parse(input, today);
            assert!(parsed.is_ok(), "identity {index} is rejected");
            assert!(IdDocument::parse(IdType::ResidentId, &identity.id_number, today).is_ok());
            assert!(PhoneNumber::parse(&identity.phone).is_ok());
            assert!(
                documents.insert(identity.id_number),
                "index {index} repeats"
            );
        }
    }
}
