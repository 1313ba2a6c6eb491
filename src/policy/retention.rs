//! Retention deadlines: how long a record may be kept, from configuration per document type
//! or from the caller within a configured limit.
//!
//! A deadline is fixed when the record is created and stored with it (`retain_until`), so a
//! later configuration change does not silently shorten or extend what was promised for
//! records already held. `pdvault purge` crypto-shreds records past their deadline.
//!
//! The `retention` configuration section ([`RetentionConfig`]) is declared here, beside the
//! rules it configures, and re-exported by `config`, which sits above `policy`.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::domain::IdType;
use crate::store::Micros;

/// How long records are kept before `pdvault purge` crypto-shreds them. Days count from
/// creation; 0 means no deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Deadline for records whose document type has no entry in `id_types`.
    pub default_days: u32,
    /// Per document type (`RESIDENT_ID`, `PASSPORT`, ...): overrides `default_days`.
    pub id_types: BTreeMap<String, u32>,
    /// The longest retention a caller may ask for on create; 0 means callers may not.
    pub max_days: u32,
    /// How long a create's `request_id` answers retries (its key holds an HMAC of the
    /// identity, so it is not kept longer than retries need); 0: until the record is deleted.
    pub request_id_ttl_hours: u32,
}

impl Default for RetentionConfig {
    fn default() -> RetentionConfig {
        RetentionConfig {
            default_days: 0,
            id_types: BTreeMap::new(),
            max_days: 0,
            request_id_ttl_hours: 24,
        }
    }
}

impl RetentionConfig {
    /// `request_id_ttl_hours` as a duration; `None` when request ids do not expire.
    pub fn request_id_ttl(&self) -> Option<std::time::Duration> {
        (self.request_id_ttl_hours != 0)
            .then(|| std::time::Duration::from_secs(u64::from(self.request_id_ttl_hours) * 3600))
    }
}

const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("retention.id_types: unknown document type {0:?}")]
    UnknownIdType(String),
    #[error("retention_days: callers may not set a retention period here")]
    CallerRetentionDisabled,
    #[error("retention_days: must be between 1 and {max}")]
    OutOfRange { max: u32 },
}

/// Validated retention rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    default_days: u32,
    by_id_type: HashMap<IdType, u32>,
    max_days: u32,
}

impl Retention {
    pub fn build(config: &RetentionConfig) -> Result<Retention, RetentionError> {
        let by_id_type = config
            .id_types
            .iter()
            .map(|(name, days)| {
                IdType::parse(name)
                    .map(|id_type| (id_type, *days))
                    .ok_or_else(|| RetentionError::UnknownIdType(name.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Retention {
            default_days: config.default_days,
            by_id_type,
            max_days: config.max_days,
        })
    }

    /// The deadline of a record created at `created_at`: the caller's period when given
    /// (within `max_days`), else the configured one for its document type; `None` when no
    /// rule applies.
    pub fn deadline(
        &self,
        created_at: Micros,
        id_type: Option<IdType>,
        requested_days: Option<u32>,
    ) -> Result<Option<Micros>, RetentionError> {
        let days = match requested_days {
            Some(_) if self.max_days == 0 => return Err(RetentionError::CallerRetentionDisabled),
            Some(days) if days == 0 || days > self.max_days => {
                return Err(RetentionError::OutOfRange { max: self.max_days });
            }
            Some(days) => days,
            None => id_type
                .and_then(|t| self.by_id_type.get(&t).copied())
                .unwrap_or(self.default_days),
        };
        Ok((days > 0).then(|| created_at.saturating_add(i64::from(days) * MICROS_PER_DAY)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Retention {
        Retention::build(&RetentionConfig {
            default_days: 30,
            id_types: [("PASSPORT".to_owned(), 10)].into(),
            max_days: 365,
            ..RetentionConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn document_type_overrides_the_default_and_callers_stay_within_the_limit() {
        let rules = rules();
        assert_eq!(rules.deadline(0, None, None), Ok(Some(30 * MICROS_PER_DAY)));
        assert_eq!(
            rules.deadline(0, Some(IdType::Passport), None),
            Ok(Some(10 * MICROS_PER_DAY))
        );
        assert_eq!(
            rules.deadline(5, Some(IdType::Passport), Some(365)),
            Ok(Some(5 + 365 * MICROS_PER_DAY))
        );
        assert_eq!(
            rules.deadline(0, None, Some(366)),
            Err(RetentionError::OutOfRange { max: 365 })
        );
        assert_eq!(
            rules.deadline(0, None, Some(0)),
            Err(RetentionError::OutOfRange { max: 365 })
        );
    }

    #[test]
    fn no_rule_means_no_deadline_and_no_caller_periods() {
        let none = Retention::default();
        assert_eq!(none.deadline(0, Some(IdType::ResidentId), None), Ok(None));
        assert_eq!(
            none.deadline(0, None, Some(1)),
            Err(RetentionError::CallerRetentionDisabled)
        );
    }

    #[test]
    fn unknown_document_types_are_refused() {
        let config = RetentionConfig {
            id_types: [("DRIVING_LICENCE".to_owned(), 1)].into(),
            ..RetentionConfig::default()
        };
        assert_eq!(
            Retention::build(&config),
            Err(RetentionError::UnknownIdType("DRIVING_LICENCE".into()))
        );
    }
}
