//! Identities and calls the integration tests share.

use pdvault::proto::{self, CreateRecordRequest, GetRecordRequest, Identity};
use tonic::Code;
use tonic_types::StatusExt;

use super::{CLAIMS, TestApp, authed};

/// A resident ID with the correct ISO 7064 MOD 11-2 check character appended.
pub fn resident_id(first17: &str) -> String {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17
        .chars()
        .zip(WEIGHTS)
        .map(|(c, w)| c.to_digit(10).unwrap() * w)
        .sum();
    let check = b"10X98765432"[(sum % 11) as usize] as char;
    format!("{first17}{check}")
}

pub fn zhang_san() -> Identity {
    Identity {
        name: "张小三".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: resident_id("45010219900307123"),
        nationality: "CHN".into(),
        phone: "+86 138 1234 5678".into(),
        email: "zhangsan@example.com".into(),
        address: "广西壮族自治区南宁市青秀区民族大道100号".into(),
        postal_code: "530022".into(),
        ..Identity::default()
    }
}

pub fn li_si() -> Identity {
    Identity {
        name: "李四".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: resident_id("45030519851120002"),
        phone: "13987654321".into(),
        ..Identity::default()
    }
}

/// A create of `identity`; an empty `request_id` is a create that is never retried.
pub fn create_request(identity: Identity, request_id: impl Into<String>) -> CreateRecordRequest {
    CreateRecordRequest {
        identity: Some(identity),
        request_id: request_id.into(),
        ..Default::default()
    }
}

pub async fn create(app: &TestApp, identity: Identity) -> proto::Record {
    app.client()
        .await
        .create_record(authed(CLAIMS.token, create_request(identity, "")))
        .await
        .expect("create succeeds")
        .into_inner()
}

pub async fn get(
    app: &TestApp,
    token: &str,
    record_id: &str,
    purpose: &str,
    justification: &str,
) -> Result<proto::GetRecordResponse, tonic::Status> {
    app.client()
        .await
        .get_record(authed(
            token,
            GetRecordRequest {
                record_id: record_id.into(),
                purpose: purpose.into(),
                justification: justification.into(),
                fields: vec![],
            },
        ))
        .await
        .map(|r| r.into_inner())
}

pub fn value(response: &proto::GetRecordResponse, field: &str) -> (String, proto::ReleaseLevel) {
    let released = response
        .fields
        .get(field)
        .unwrap_or_else(|| panic!("{field} released"));
    (released.value.clone(), released.level())
}

pub fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| {
            assert_eq!(info.domain, "pdvault");
            info.reason
        })
        .unwrap_or_default()
}

pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("a BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Whether `needle` occurs anywhere in `haystack`: for scanning raw database bytes.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
