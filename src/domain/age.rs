//! Age as Chinese law counts it (周岁): a person of age N has completed N full years, and
//! reaches age N at 00:00 on the day after the Nth birthday, in the configured time zone.
//! A 29 February birthday falls on 1 March in common years.
//!
//! Pure: the caller supplies "today" in the right time zone, so every boundary is testable.

use chrono::{Datelike, Days, NaiveDate};

/// The first day on which a person born on `birth` has reached `years` years of age.
pub fn reaches_age_on(birth: NaiveDate, years: u32) -> Option<NaiveDate> {
    let year = birth.year().checked_add(i32::try_from(years).ok()?)?;
    let birthday = NaiveDate::from_ymd_opt(year, birth.month(), birth.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, 3, 1))?;
    birthday.checked_add_days(Days::new(1))
}

/// Whether a person born on `birth` is at least `years` old on `today`.
pub fn has_reached(birth: NaiveDate, years: u32, today: NaiveDate) -> bool {
    reaches_age_on(birth, years).is_some_and(|day| today >= day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn age_is_reached_the_day_after_the_birthday() {
        let birth = date(2008, 6, 1);
        assert!(!has_reached(birth, 18, date(2026, 5, 31)), "day before");
        assert!(
            !has_reached(birth, 18, date(2026, 6, 1)),
            "the 18th birthday itself"
        );
        assert!(has_reached(birth, 18, date(2026, 6, 2)), "day after");
        assert!(!has_reached(birth, 14, date(2022, 6, 1)));
        assert!(has_reached(birth, 14, date(2022, 6, 2)));
    }

    #[test]
    fn leap_day_birthdays_fall_on_the_first_of_march_in_common_years() {
        let birth = date(2008, 2, 29);
        assert_eq!(reaches_age_on(birth, 18), Some(date(2026, 3, 2)));
        assert!(!has_reached(birth, 18, date(2026, 3, 1)));
        assert!(has_reached(birth, 18, date(2026, 3, 2)));
        // In a leap year the birthday is the 29th itself.
        assert_eq!(reaches_age_on(birth, 16), Some(date(2024, 3, 1)));
        assert!(!has_reached(birth, 16, date(2024, 2, 29)));
    }

    #[test]
    fn years_beyond_the_calendar_are_never_reached() {
        assert_eq!(reaches_age_on(NaiveDate::MAX, 1), None);
        assert!(!has_reached(date(2000, 1, 1), u32::MAX, NaiveDate::MAX));
    }
}
