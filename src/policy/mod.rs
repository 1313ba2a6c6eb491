//! Who may call what, and what each purpose releases.
//!
//! A [`Policy`] is built once from validated configuration and then only read, so request
//! handling takes no locks to consult it. Callers authenticate with a bearer token; the
//! policy holds only SHA-256 hashes of tokens and compares them in constant time against
//! every caller, so timing says nothing about which caller (if any) nearly matched.
//! Over mutual TLS a caller can instead be named by its client certificate (a SAN URI such
//! as a SPIFFE id, or the subject CN); the TLS handshake has already proven possession.
//! Purposes are configuration; the shipped defaults mirror clause 1.3 of the privacy policy.

pub mod retention;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{FieldName, supports_generalize, supports_mask};

/// The RPCs a caller can be granted, by their gRPC method names, and grants that cover a
/// whole family of RPCs (`keys.rotate`, `records.purge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rpc {
    CreateRecord,
    GetRecord,
    UpdateRecord,
    DeleteRecord,
    FindRecords,
    CheckAccount,
    RecordGuardianConsent,
    RevokeGuardianConsent,
    ReloadPolicy,
    BatchGetRecords,
    BatchCreateRecords,
    ExportRecords,
}

impl Rpc {
    pub const ALL: [Rpc; 12] = [
        Rpc::CreateRecord,
        Rpc::GetRecord,
        Rpc::UpdateRecord,
        Rpc::DeleteRecord,
        Rpc::FindRecords,
        Rpc::CheckAccount,
        Rpc::RecordGuardianConsent,
        Rpc::RevokeGuardianConsent,
        Rpc::ReloadPolicy,
        Rpc::BatchGetRecords,
        Rpc::BatchCreateRecords,
        Rpc::ExportRecords,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::CreateRecord => "CreateRecord",
            Rpc::GetRecord => "GetRecord",
            Rpc::UpdateRecord => "UpdateRecord",
            Rpc::DeleteRecord => "DeleteRecord",
            Rpc::FindRecords => "FindRecords",
            Rpc::CheckAccount => "CheckAccount",
            Rpc::RecordGuardianConsent => "RecordGuardianConsent",
            Rpc::RevokeGuardianConsent => "RevokeGuardianConsent",
            Rpc::ReloadPolicy => "ReloadPolicy",
            Rpc::BatchGetRecords => "BatchGetRecords",
            Rpc::BatchCreateRecords => "BatchCreateRecords",
            Rpc::ExportRecords => "ExportRecords",
        }
    }

    pub fn parse(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|rpc| rpc.as_str() == name)
    }
}

/// Grants beyond the Vault RPCs, each guarding a whole service or command family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grant {
    /// `pdvault.v1.Audit`: read the trail, list disclosures, verify chains.
    AuditRead,
    /// `pdvault.v1.AccountSecurity`: suspend and reinstate accounts.
    AccountsSuspend,
    /// `pdvault.v1.KeyManagement`: rotate, rewrap, retire and destroy keys, re-key records.
    KeysRotate,
    /// Crypto-shred records past their retention deadline (`pdvault purge`).
    RecordsPurge,
}

impl Grant {
    pub const ALL: [Grant; 4] = [
        Grant::AuditRead,
        Grant::AccountsSuspend,
        Grant::KeysRotate,
        Grant::RecordsPurge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Grant::AuditRead => "audit.read",
            Grant::AccountsSuspend => "accounts.suspend",
            Grant::KeysRotate => "keys.rotate",
            Grant::RecordsPurge => "records.purge",
        }
    }

    pub fn parse(name: &str) -> Option<Grant> {
        Grant::ALL.into_iter().find(|grant| grant.as_str() == name)
    }
}

/// How much of a field a purpose may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseLevel {
    Plain,
    Masked,
    Pseudonym,
    Generalized,
    None,
}

impl ReleaseLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseLevel::Plain => "PLAIN",
            ReleaseLevel::Masked => "MASKED",
            ReleaseLevel::Pseudonym => "PSEUDONYM",
            ReleaseLevel::Generalized => "GENERALIZED",
            ReleaseLevel::None => "NONE",
        }
    }
}

/// A purpose as written in configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeConfig {
    /// Reads under this purpose must state a justification (e.g. a legal document reference).
    #[serde(default)]
    pub requires_justification: bool,
    /// Releases under this purpose are disclosures the person can later be told about.
    #[serde(default)]
    pub disclosure: bool,
    /// Level per field; a field not listed is not released.
    #[serde(default)]
    pub fields: BTreeMap<String, ReleaseLevel>,
    /// `ExportRecords` may stream whole data sets under this purpose. Such a purpose may
    /// release only pseudonyms and generalised values, and plain values only of the coarse
    /// fields ([`EXPORT_PLAIN_FIELDS`]); anything else is refused at load.
    #[serde(default)]
    pub export: bool,
    /// Rows an export must find in each combination of released quasi-identifiers before it
    /// releases any of them; only for export purposes. Unset: [`DEFAULT_K_ANONYMITY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k_anonymity: Option<u32>,
}

/// The fields an export purpose may release in plain: coarse enough that each value is
/// shared by large groups (and all three are quasi-identifiers the suppression counts, or
/// nearly constant).
pub const EXPORT_PLAIN_FIELDS: [FieldName; 3] =
    [FieldName::Gender, FieldName::IdType, FieldName::Nationality];

/// The k of an export purpose that does not set `k_anonymity`.
pub const DEFAULT_K_ANONYMITY: u32 = 5;

/// A caller as written in configuration. It needs a token hash, a certificate identity, or
/// both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    /// Hex SHA-256 of the caller's bearer token; the token itself is never configured.
    /// Empty: the caller cannot use a token.
    #[serde(default)]
    pub token_sha256: String,
    /// A URI subject alternative name of the caller's client certificate, such as
    /// `spiffe://example.org/ns/claims/sa/api`.
    #[serde(default)]
    pub certificate_uri: Option<String>,
    /// The subject common name of the caller's client certificate, when it has no URI.
    #[serde(default)]
    pub certificate_cn: Option<String>,
    #[serde(default)]
    pub rpcs: Vec<String>,
    #[serde(default)]
    pub purposes: Vec<String>,
    /// Grants such as `audit.read`, `accounts.suspend`, `keys.rotate`.
    #[serde(default)]
    pub grants: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Configuration that cannot become a policy; `key` is the config path at fault.
    #[error("{key}: {reason}")]
    InvalidConfig { key: String, reason: String },
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateIdentity {
    pub uris: Vec<String>,
    pub common_name: Option<String>,
}

/// Whom a client certificate names.
#[derive(Debug)]
pub enum CertificateMatch {
    Caller(Arc<Caller>),
    /// No configured caller claims the certificate.
    Unmapped,
    /// Its URI and its CN name different callers: trusting either would be a guess.
    Ambiguous,
}

/// An authenticated caller and its grants.
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    token_hash: Option<[u8; 32]>,
    certificate_uri: Option<String>,
    certificate_cn: Option<String>,
    rpcs: BTreeSet<Rpc>,
    purposes: BTreeSet<String>,
    grants: BTreeSet<Grant>,
}

impl Caller {
    pub fn may_call(&self, rpc: Rpc) -> bool {
        self.rpcs.contains(&rpc)
    }

    pub fn has_grant(&self, grant: Grant) -> bool {
        self.grants.contains(&grant)
    }

    pub fn has_purpose(&self, purpose: &str) -> bool {
        self.purposes.contains(purpose)
    }
}

#[derive(Debug)]
pub struct Purpose {
    pub name: String,
    pub requires_justification: bool,
    pub disclosure: bool,
    /// `Some(k)` for an export purpose: its exports suppress classes of fewer than k rows.
    pub export_k: Option<u32>,
    levels: BTreeMap<FieldName, ReleaseLevel>,
}

impl Purpose {
    /// The level this purpose releases `field` at; `None` level when not listed.
    pub fn level(&self, field: FieldName) -> ReleaseLevel {
        self.levels
            .get(&field)
            .copied()
            .unwrap_or(ReleaseLevel::None)
    }
}

#[derive(Debug)]
pub struct Policy {
    callers: Vec<Arc<Caller>>,
    purposes: HashMap<String, Purpose>,
}

impl Policy {
    /// Validates configuration in full and builds the policy. `extra_callers` are callers
    /// the vault creates itself (the initial administrator).
    pub fn build(
        purposes: &BTreeMap<String, PurposeConfig>,
        callers: &[CallerConfig],
    ) -> Result<Policy, PolicyError> {
        let purposes = purposes
            .iter()
            .map(|(name, config)| Ok((name.clone(), build_purpose(name, config)?)))
            .collect::<Result<HashMap<_, _>, PolicyError>>()?;
        let mut names = BTreeSet::new();
        // Who already holds each credential, by (kind, value): a second caller with the same
        // token hash or certificate identity would silently shadow the first (authentication
        // takes the last match), so the configuration is refused naming both.
        let mut credentials: HashMap<(&'static str, String), (usize, String)> = HashMap::new();
        let mut built = Vec::with_capacity(callers.len());
        for (i, config) in callers.iter().enumerate() {
            let caller = build_caller(i, config, &purposes)?;
            if !names.insert(caller.name.clone()) {
                return Err(invalid(
                    format!("callers[{i}].name"),
                    "duplicate caller name",
                ));
            }
            let held = [
                (
                    "token_sha256",
                    caller
                        .token_hash
                        .map(|hash| data_encoding::HEXLOWER.encode(&hash)),
                ),
                ("certificate_uri", caller.certificate_uri.clone()),
                ("certificate_cn", caller.certificate_cn.clone()),
            ];
            for (key, value) in held {
                let Some(value) = value else { continue };
                if let Some((first, first_name)) = credentials.get(&(key, value.clone())) {
                    return Err(invalid(
                        format!("callers[{i}].{key}"),
                        format!(
                            "caller {:?} and caller {first_name:?} (callers[{first}]) have the \
                             same {}; each caller needs its own",
                            caller.name,
                            credential_label(key)
                        ),
                    ));
                }
                credentials.insert((key, value), (i, caller.name.clone()));
            }
            built.push(Arc::new(caller));
        }
        Ok(Policy {
            callers: built,
            purposes,
        })
    }

    /// The caller whose token hashes to a configured hash. Every caller is compared, in
    /// constant time, whatever matches first.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Caller>> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for caller in &self.callers {
            let matches = caller
                .token_hash
                .as_ref()
                .is_some_and(|hash| bool::from(hash.ct_eq(&presented)));
            if matches {
                found = Some(Arc::clone(caller));
            }
        }
        found
    }

    /// The caller a verified client certificate names, by any of its URI SANs or its CN.
    pub fn authenticate_certificate(&self, identity: &CertificateIdentity) -> CertificateMatch {
        let mut matched: Option<&Arc<Caller>> = None;
        for caller in &self.callers {
            let by_uri = caller
                .certificate_uri
                .as_ref()
                .is_some_and(|uri| identity.uris.iter().any(|u| u == uri));
            let by_cn =
                caller.certificate_cn.is_some() && caller.certificate_cn == identity.common_name;
            if by_uri || by_cn {
                if matched.is_some_and(|m| m.name != caller.name) {
                    return CertificateMatch::Ambiguous;
                }
                matched = Some(caller);
            }
        }
        match matched {
            Some(caller) => CertificateMatch::Caller(Arc::clone(caller)),
            None => CertificateMatch::Unmapped,
        }
    }

    pub fn caller_names(&self) -> impl Iterator<Item = &str> {
        self.callers.iter().map(|caller| caller.name.as_str())
    }

    pub fn purpose(&self, name: &str) -> Option<&Purpose> {
        self.purposes.get(name)
    }

    /// Purposes whose releases are disclosures the person can be told about.
    pub fn disclosure_purposes(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .purposes
            .values()
            .filter(|p| p.disclosure)
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names
    }

    pub fn purpose_names(&self) -> impl Iterator<Item = &str> {
        self.purposes.keys().map(String::as_str)
    }
}

/// Hex SHA-256 of a token, as `token_sha256` in configuration expects.
pub fn token_sha256_hex(token: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(token.as_bytes()))
}

fn credential_label(key: &str) -> &'static str {
    match key {
        "token_sha256" => "token hash",
        "certificate_uri" => "certificate URI",
        _ => "certificate common name",
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::InvalidConfig {
        key: key.into(),
        reason: reason.into(),
    }
}

fn build_purpose(name: &str, config: &PurposeConfig) -> Result<Purpose, PolicyError> {
    if name.is_empty()
        || name.len() > crate::domain::edge::MAX_PURPOSE_BYTES
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            format!("purposes.{name}"),
            "purpose names use at most 64 ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    let mut levels = BTreeMap::new();
    for (field_name, level) in &config.fields {
        let key = format!("purposes.{name}.fields.{field_name}");
        let field = FieldName::parse(field_name).ok_or_else(|| invalid(&key, "unknown field"))?;
        let supported = match level {
            ReleaseLevel::Masked => supports_mask(field),
            ReleaseLevel::Generalized => supports_generalize(field),
            _ => true,
        };
        if !supported {
            return Err(invalid(
                key,
                format!("field has no {} form", level.as_str().to_lowercase()),
            ));
        }
        if config.export {
            let allowed = match level {
                ReleaseLevel::Pseudonym | ReleaseLevel::Generalized | ReleaseLevel::None => true,
                ReleaseLevel::Plain => EXPORT_PLAIN_FIELDS.contains(&field),
                ReleaseLevel::Masked => false,
            };
            if !allowed {
                return Err(invalid(
                    key,
                    "an export purpose releases only pseudonym, generalized or none \
                     (plain only for gender, id_type and nationality)",
                ));
            }
        }
        levels.insert(field, *level);
    }
    let export_k = match (config.export, config.k_anonymity) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(invalid(
                format!("purposes.{name}.k_anonymity"),
                "applies only to a purpose with export = true",
            ));
        }
        (true, Some(0)) => {
            return Err(invalid(
                format!("purposes.{name}.k_anonymity"),
                "must be at least 1 (1 suppresses nothing; an export cannot be \"off\")",
            ));
        }
        (true, k) => Some(k.unwrap_or(DEFAULT_K_ANONYMITY)),
    };
    Ok(Purpose {
        name: name.to_owned(),
        requires_justification: config.requires_justification,
        disclosure: config.disclosure,
        export_k,
        levels,
    })
}

fn build_caller(
    index: usize,
    config: &CallerConfig,
    purposes: &HashMap<String, Purpose>,
) -> Result<Caller, PolicyError> {
    let key = |suffix: &str| format!("callers[{index}].{suffix}");
    if config.name.trim().is_empty() {
        return Err(invalid(key("name"), "must not be empty"));
    }
    // Caller names are written into every audit event and log line of their calls.
    if let Err(refused) =
        crate::domain::edge::check_text("name", &config.name, crate::domain::edge::MAX_FILTER_BYTES)
    {
        return Err(invalid(key("name"), refused.reason));
    }
    let hash = if config.token_sha256.is_empty() {
        None
    } else {
        Some(
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(config.token_sha256.as_bytes())
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    invalid(key("token_sha256"), "must be 64 hex characters (SHA-256)")
                })?,
        )
    };
    let certificate_uri = non_blank(&config.certificate_uri, || key("certificate_uri"))?;
    let certificate_cn = non_blank(&config.certificate_cn, || key("certificate_cn"))?;
    if hash.is_none() && certificate_uri.is_none() && certificate_cn.is_none() {
        return Err(invalid(
            key("token_sha256"),
            "a caller needs a token hash or a certificate identity",
        ));
    }
    let rpcs = config
        .rpcs
        .iter()
        .map(|name| {
            Rpc::parse(name).ok_or_else(|| invalid(key("rpcs"), format!("unknown RPC {name:?}")))
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    let granted = config
        .purposes
        .iter()
        .map(|name| {
            if purposes.contains_key(name) {
                Ok(name.clone())
            } else {
                Err(invalid(
                    key("purposes"),
                    format!("unknown purpose {name:?}"),
                ))
            }
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    let grants = config
        .grants
        .iter()
        .map(|name| {
            Grant::parse(name)
                .ok_or_else(|| invalid(key("grants"), format!("unknown grant {name:?}")))
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(Caller {
        name: config.name.clone(),
        token_hash: hash,
        certificate_uri,
        certificate_cn,
        rpcs,
        purposes: granted,
        grants,
    })
}

fn non_blank(
    value: &Option<String>,
    key: impl FnOnce() -> String,
) -> Result<Option<String>, PolicyError> {
    match value {
        Some(v) if v.trim().is_empty() => Err(invalid(key(), "must not be empty when set")),
        other => Ok(other.clone()),
    }
}

/// The shipped default purposes, one per use named in clause 1.3 of the privacy policy.
/// Analytics and research see pseudonyms and generalised values, never identities.
pub fn default_purposes() -> BTreeMap<String, PurposeConfig> {
    use ReleaseLevel::*;
    let purpose =
        |justification: bool, disclosure: bool, levels: [ReleaseLevel; 10]| PurposeConfig {
            requires_justification: justification,
            disclosure,
            fields: FieldName::ALL
                .iter()
                .zip(levels)
                .filter(|(_, level)| *level != None)
                .map(|(field, level)| (field.as_str().to_owned(), level))
                .collect(),
            export: false,
            k_anonymity: Option::None,
        };
    // Research and analytics (clause 1.3 (3)-(4)) see no identity, so they may export.
    let export = |config: PurposeConfig| PurposeConfig {
        export: true,
        ..config
    };
    // Column order: name, gender, id_type, id_number, date_of_birth, nationality, phone,
    // email, address, postal_code (FieldName::ALL).
    [
        ("service-delivery", purpose(false, false, [Plain; 10])),
        (
            "important-notice",
            purpose(
                false,
                false,
                [
                    Plain, None, None, None, None, None, Plain, Plain, Plain, Plain,
                ],
            ),
        ),
        (
            "audit-research",
            export(purpose(
                false,
                false,
                [
                    Pseudonym,
                    Plain,
                    Plain,
                    Pseudonym,
                    Generalized,
                    Plain,
                    Pseudonym,
                    Pseudonym,
                    Generalized,
                    Generalized,
                ],
            )),
        ),
        (
            "business-analytics",
            export(purpose(
                false,
                false,
                [
                    None,
                    Plain,
                    None,
                    Pseudonym,
                    Generalized,
                    Plain,
                    None,
                    None,
                    Generalized,
                    Generalized,
                ],
            )),
        ),
        (
            "fraud-prevention",
            purpose(
                false,
                false,
                [
                    Plain, Plain, Plain, Plain, Plain, Plain, Plain, Plain, Masked, Plain,
                ],
            ),
        ),
        ("legal-compliance", purpose(true, true, [Plain; 10])),
        (
            "customer-support",
            purpose(
                false,
                false,
                [
                    Masked, Plain, Plain, Masked, Masked, Plain, Masked, Masked, Masked, Masked,
                ],
            ),
        ),
    ]
    .into_iter()
    .map(|(name, config)| (name.to_owned(), config))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, token: &str, purposes: &[&str]) -> CallerConfig {
        CallerConfig {
            name: name.into(),
            token_sha256: token_sha256_hex(token),
            rpcs: vec!["GetRecord".into()],
            purposes: purposes.iter().map(|p| p.to_string()).collect(),
            ..CallerConfig::default()
        }
    }

    #[test]
    fn default_policy_is_valid_and_mirrors_clause_1_3() {
        let policy = Policy::build(&default_purposes(), &[]).unwrap();
        let mut names: Vec<_> = policy.purpose_names().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "audit-research",
                "business-analytics",
                "customer-support",
                "fraud-prevention",
                "important-notice",
                "legal-compliance",
                "service-delivery"
            ]
        );
        let legal = policy.purpose("legal-compliance").unwrap();
        assert!(legal.requires_justification && legal.disclosure);
        let analytics = policy.purpose("business-analytics").unwrap();
        for field in [FieldName::Name, FieldName::Phone, FieldName::Email] {
            assert_eq!(analytics.level(field), ReleaseLevel::None);
        }
        // Clause 1.2: analytics never receives an identity, only pseudonyms or generalised values.
        for field in [
            FieldName::Name,
            FieldName::IdNumber,
            FieldName::DateOfBirth,
            FieldName::Phone,
            FieldName::Email,
            FieldName::Address,
            FieldName::PostalCode,
        ] {
            assert_ne!(analytics.level(field), ReleaseLevel::Plain, "{field:?}");
        }
    }

    #[test]
    fn export_purposes_release_nothing_identifying() {
        let policy = Policy::build(&default_purposes(), &[]).unwrap();
        assert_eq!(
            policy.purpose("business-analytics").unwrap().export_k,
            Some(5)
        );
        assert_eq!(policy.purpose("service-delivery").unwrap().export_k, None);
        let export = |fields: &[(&str, ReleaseLevel)], k: Option<u32>| {
            let mut purposes = default_purposes();
            purposes.insert(
                "open-data".into(),
                PurposeConfig {
                    requires_justification: false,
                    disclosure: false,
                    fields: fields.iter().map(|(f, l)| (f.to_string(), *l)).collect(),
                    export: true,
                    k_anonymity: k,
                },
            );
            Policy::build(&purposes, &[]).map_err(|e| e.to_string())
        };
        let err = export(&[("name", ReleaseLevel::Masked)], None).unwrap_err();
        assert!(err.starts_with("purposes.open-data.fields.name:"), "{err}");
        let err = export(&[("date_of_birth", ReleaseLevel::Plain)], None).unwrap_err();
        assert!(
            err.starts_with("purposes.open-data.fields.date_of_birth:"),
            "{err}"
        );
        let err = export(&[("gender", ReleaseLevel::Plain)], Some(0)).unwrap_err();
        assert!(err.starts_with("purposes.open-data.k_anonymity:"), "{err}");
        let policy = export(
            &[
                ("gender", ReleaseLevel::Plain),
                ("id_type", ReleaseLevel::Plain),
                ("nationality", ReleaseLevel::Plain),
                ("name", ReleaseLevel::Pseudonym),
                ("address", ReleaseLevel::Generalized),
            ],
            Some(3),
        )
        .unwrap();
        assert_eq!(policy.purpose("open-data").unwrap().export_k, Some(3));
        let mut purposes = default_purposes();
        purposes.get_mut("service-delivery").unwrap().k_anonymity = Some(5);
        let err = Policy::build(&purposes, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("purposes.service-delivery.k_anonymity:"),
            "{err}"
        );
    }

    #[test]
    fn authenticates_by_token_hash_only() {
        let policy = Policy::build(
            &default_purposes(),
            &[caller("a", "token-a", &[]), caller("b", "token-b", &[])],
        )
        .unwrap();
        assert_eq!(policy.authenticate("token-b").unwrap().name, "b");
        assert!(policy.authenticate("token-c").is_none());
        assert!(policy.authenticate("").is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut purposes = default_purposes();
        purposes
            .get_mut("customer-support")
            .unwrap()
            .fields
            .insert("nickname".into(), ReleaseLevel::Plain);
        let err = Policy::build(&purposes, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "purposes.customer-support.fields.nickname: unknown field"
        );

        let mut purposes = default_purposes();
        purposes
            .get_mut("customer-support")
            .unwrap()
            .fields
            .insert("gender".into(), ReleaseLevel::Generalized);
        let err = Policy::build(&purposes, &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("purposes.customer-support.fields.gender:")
        );

        let err =
            Policy::build(&default_purposes(), &[caller("a", "t", &["marketing"])]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("callers[0].purposes: unknown purpose")
        );

        let mut bad_grant = caller("a", "t", &[]);
        bad_grant.grants = vec!["audit.write".into()];
        let err = Policy::build(&default_purposes(), &[bad_grant]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("callers[0].grants: unknown grant")
        );

        let mut bad_hash = caller("a", "t", &[]);
        bad_hash.token_sha256 = "abc".into();
        let err = Policy::build(&default_purposes(), &[bad_hash]).unwrap_err();
        assert!(err.to_string().starts_with("callers[0].token_sha256:"));

        let err = Policy::build(
            &default_purposes(),
            &[caller("a", "t", &[]), caller("a", "u", &[])],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "callers[1].name: duplicate caller name");
    }

    #[test]
    fn certificates_name_callers_by_uri_or_cn() {
        let mut by_uri = caller("claims", "t1", &[]);
        by_uri.certificate_uri = Some("spiffe://test/claims".into());
        let mut by_cn = caller("analytics", "", &[]);
        by_cn.token_sha256 = String::new();
        by_cn.certificate_cn = Some("analytics".into());
        let policy = Policy::build(&default_purposes(), &[by_uri, by_cn]).unwrap();
        let name = |identity: CertificateIdentity| match policy.authenticate_certificate(&identity)
        {
            CertificateMatch::Caller(caller) => caller.name.clone(),
            CertificateMatch::Unmapped => "<unmapped>".into(),
            CertificateMatch::Ambiguous => "<ambiguous>".into(),
        };
        let identity = |uris: &[&str], cn: Option<&str>| CertificateIdentity {
            uris: uris.iter().map(|u| u.to_string()).collect(),
            common_name: cn.map(str::to_owned),
        };
        assert_eq!(name(identity(&["spiffe://test/claims"], None)), "claims");
        assert_eq!(name(identity(&[], Some("analytics"))), "analytics");
        assert_eq!(
            name(identity(&["spiffe://test/claims"], Some("claims"))),
            "claims"
        );
        assert_eq!(
            name(identity(&["spiffe://test/claims"], Some("analytics"))),
            "<ambiguous>"
        );
        assert_eq!(name(identity(&["spiffe://test/other"], None)), "<unmapped>");
        // A certificate-only caller has no token to guess.
        assert!(policy.authenticate("").is_none());
    }

    #[test]
    fn callers_need_a_credential_and_unique_certificates() {
        let mut none = caller("a", "t", &[]);
        none.token_sha256 = String::new();
        let err = Policy::build(&default_purposes(), &[none]).unwrap_err();
        assert!(
            err.to_string().starts_with("callers[0].token_sha256:"),
            "{err}"
        );

        let mut a = caller("a", "t", &[]);
        a.certificate_uri = Some("spiffe://test/a".into());
        let mut b = caller("b", "u", &[]);
        b.certificate_uri = Some("spiffe://test/a".into());
        let err = Policy::build(&default_purposes(), &[a, b]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "callers[1].certificate_uri: caller \"b\" and caller \"a\" (callers[0]) have the \
             same certificate URI; each caller needs its own"
        );
    }

    /// Issue 11 D16: two callers with one credential used to be accepted, the last one
    /// silently winning every authentication.
    #[test]
    fn two_callers_with_one_credential_are_refused_naming_both() {
        // The same token, even with its hash spelt in upper case.
        let a = caller("claims", "shared-token", &[]);
        let mut b = caller("analytics", "shared-token", &[]);
        b.token_sha256 = b.token_sha256.to_uppercase();
        let err = Policy::build(&default_purposes(), &[caller("x", "t", &[]), a, b]).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("callers[2].token_sha256:"), "{message}");
        assert!(
            message.contains("\"analytics\"")
                && message.contains("\"claims\" (callers[1])")
                && message.contains("same token hash"),
            "{message}"
        );

        let mut a = caller("claims", "t1", &[]);
        a.certificate_cn = Some("svc".into());
        let mut b = caller("analytics", "", &[]);
        b.token_sha256 = String::new();
        b.certificate_cn = Some("svc".into());
        let message = Policy::build(&default_purposes(), &[a, b])
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("callers[1].certificate_cn:")
                && message.contains("\"analytics\"")
                && message.contains("\"claims\" (callers[0])"),
            "{message}"
        );
        // A URI that equals another caller's CN is a different identity.
        let mut a = caller("claims", "t1", &[]);
        a.certificate_cn = Some("spiffe://x".into());
        let mut b = caller("analytics", "t2", &[]);
        b.certificate_uri = Some("spiffe://x".into());
        assert!(Policy::build(&default_purposes(), &[a, b]).is_ok());
    }
}
