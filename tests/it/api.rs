//! End-to-end tests of `pdvault.v1.Vault`: the real server on an ephemeral port, driven
//! over gRPC, once per backend (SQLite and PostgreSQL).

use crate::support::fixtures::*;
use crate::support::{ANALYTICS, Backend, CLAIMS, COMPLIANCE, LOGIN, TestApp, authed};
use pdvault::proto::{
    self, CheckAccountRequest, CreateRecordRequest, DeleteRecordRequest, DocumentKey,
    FindRecordsRequest, GetRecordRequest, Identity, UpdateRecordRequest, find_records_request,
};
use tonic::Code;

async fn create_then_get_releases_plaintext_for_a_granted_purpose(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    assert!(record.record_id.starts_with("rec_"));
    assert!(!record.etag.is_empty());
    let response = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    let plain = proto::ReleaseLevel::Plain;
    assert_eq!(value(&response, "name"), ("张小三".into(), plain));
    assert_eq!(
        value(&response, "id_number"),
        (resident_id("45010219900307123"), plain)
    );
    assert_eq!(value(&response, "id_type"), ("RESIDENT_ID".into(), plain));
    // Derived from the ID number: born 1990-03-07, odd sequence => male.
    assert_eq!(
        value(&response, "date_of_birth"),
        ("1990-03-07".into(), plain)
    );
    assert_eq!(value(&response, "gender"), ("MALE".into(), plain));
    assert_eq!(value(&response, "phone"), ("+8613812345678".into(), plain));
    assert_eq!(value(&response, "postal_code"), ("530022".into(), plain));
    assert_eq!(response.etag, record.etag);
}

async fn customer_support_sees_masked_values(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let response = get(app, CLAIMS.token, &record.record_id, "customer-support", "")
        .await
        .unwrap();
    let masked = proto::ReleaseLevel::Masked;
    assert_eq!(value(&response, "name"), ("张*三".into(), masked));
    let id = resident_id("45010219900307123");
    assert_eq!(
        value(&response, "id_number"),
        (format!("450***********{}", &id[14..]), masked)
    );
    assert_eq!(value(&response, "phone"), ("138****5678".into(), masked));
    assert_eq!(
        value(&response, "email"),
        ("z***@example.com".into(), masked)
    );
    assert_eq!(
        value(&response, "address"),
        ("广西壮族自治区南宁市青秀区****".into(), masked)
    );
}

async fn analytics_gets_pseudonyms_stable_per_purpose_and_generalised_values(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let research = get(
        app,
        ANALYTICS.token,
        &record.record_id,
        "audit-research",
        "",
    )
    .await
    .unwrap();
    let again = get(
        app,
        ANALYTICS.token,
        &record.record_id,
        "audit-research",
        "",
    )
    .await
    .unwrap();
    let analytics = get(
        app,
        ANALYTICS.token,
        &record.record_id,
        "business-analytics",
        "",
    )
    .await
    .unwrap();
    let (research_token, level) = value(&research, "id_number");
    assert_eq!(level, proto::ReleaseLevel::Pseudonym);
    assert_eq!(
        research_token,
        value(&again, "id_number").0,
        "stable per purpose"
    );
    assert_ne!(
        research_token,
        value(&analytics, "id_number").0,
        "unlinkable across purposes"
    );
    assert_eq!(
        value(&analytics, "date_of_birth"),
        ("1990".into(), proto::ReleaseLevel::Generalized)
    );
    assert!(
        !analytics.fields.contains_key("name"),
        "analytics never sees names"
    );
    assert!(!analytics.fields.contains_key("phone"));
}

async fn requested_fields_narrow_the_release(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let response = app
        .client()
        .await
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: record.record_id,
                purpose: "service-delivery".into(),
                justification: String::new(),
                fields: vec!["name".into(), "phone".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = response.fields.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["name", "phone"]);
}

async fn purposes_must_be_granted_named_and_justified(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = &record.record_id;

    let status = get(app, CLAIMS.token, id, "legal-compliance", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");

    let status = get(app, CLAIMS.token, id, "marketing", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");

    let status = get(app, CLAIMS.token, id, "", "").await.unwrap_err();
    assert_eq!(bad_fields(&status), ["purpose"]);

    let status = get(app, COMPLIANCE.token, id, "legal-compliance", " ")
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["justification"]);

    let response = get(
        app,
        COMPLIANCE.token,
        id,
        "legal-compliance",
        "court order (2026)桂01民初123号",
    )
    .await
    .unwrap();
    assert_eq!(value(&response, "name").0, "张小三");
}

async fn rpcs_must_be_granted(app: &TestApp) {
    let status = app
        .client()
        .await
        .create_record(authed(LOGIN.token, create_request(zhang_san(), "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
}

async fn callers_must_authenticate(app: &TestApp) {
    let mut client = app.client().await;
    let request = || GetRecordRequest {
        record_id: "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        purpose: "service-delivery".into(),
        ..GetRecordRequest::default()
    };
    let status = client.get_record(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .get_record(authed("not-a-token", request()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

async fn invalid_identities_are_refused_field_by_field(app: &TestApp) {
    let mut client = app.client().await;
    let good = resident_id("45010219900307123");
    let wrong_check = format!(
        "{}{}",
        &good[..17],
        if good.ends_with('0') { '1' } else { '0' }
    );
    let impossible_date = resident_id("45010219900230123");
    let future_date = resident_id("45010220990101123");
    for id_number in [wrong_check, impossible_date, future_date] {
        let identity = Identity {
            id_number: id_number.clone(),
            ..zhang_san()
        };
        let status = client
            .create_record(authed(CLAIMS.token, create_request(identity, "")))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["id_number"]);
        assert!(
            !status.message().contains(&id_number),
            "errors never echo input"
        );
    }

    let identity = Identity {
        phone: "12345".into(),
        email: "not-an-email".into(),
        postal_code: "5300".into(),
        date_of_birth: "1991-01-01".into(),
        ..zhang_san()
    };
    let status = client
        .create_record(authed(CLAIMS.token, create_request(identity, "")))
        .await
        .unwrap_err();
    let mut fields = bad_fields(&status);
    fields.sort();
    assert_eq!(fields, ["date_of_birth", "email", "phone", "postal_code"]);
}

async fn old_guangxi_numbers_are_accepted(app: &TestApp) {
    // 452101 was the Nanning prefecture code until 2002; people born there still hold it.
    let old_prefecture = resident_id("45210119500101001");
    let record = create(
        app,
        Identity {
            id_type: proto::IdType::ResidentId as i32,
            id_number: old_prefecture.clone(),
            ..Identity::default()
        },
    )
    .await;
    let response = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&response, "id_number").0, old_prefecture);

    // The 15-digit first-generation card is upgraded to 18 characters.
    let record = create(
        app,
        Identity {
            id_type: proto::IdType::ResidentId as i32,
            id_number: "450102550101002".into(),
            ..Identity::default()
        },
    )
    .await;
    let response = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(
        value(&response, "id_number").0,
        resident_id("45010219550101002")
    );
    assert_eq!(value(&response, "date_of_birth").0, "1955-01-01");
    assert_eq!(value(&response, "gender").0, "FEMALE");
}

async fn duplicate_documents_are_refused_without_naming_the_other_record(app: &TestApp) {
    let first = create(app, zhang_san()).await;
    let status = app
        .client()
        .await
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "王五".into(),
                    ..zhang_san()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason(&status), "DUPLICATE_IDENTITY");
    assert!(!format!("{status:?}").contains(&first.record_id));
}

async fn retried_creates_are_idempotent(app: &TestApp) {
    let mut client = app.client().await;
    let request = |identity| authed(CLAIMS.token, create_request(identity, "req-42"));
    let first = client
        .create_record(request(zhang_san()))
        .await
        .unwrap()
        .into_inner();
    let retry = client
        .create_record(request(zhang_san()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.record_id, retry.record_id);
    let status = client.create_record(request(li_si())).await.unwrap_err();
    assert_eq!(bad_fields(&status), ["request_id"]);
}

async fn updates_need_the_current_etag_and_move_the_indexes(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let mut client = app.client().await;
    let update = |etag: &str| {
        authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: record.record_id.clone(),
                identity: Some(Identity {
                    phone: "13700001111".into(),
                    ..Identity::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["phone".into()],
                }),
                etag: etag.into(),
                ..Default::default()
            },
        )
    };
    let updated = client
        .update_record(update(&record.etag))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(updated.etag, record.etag);
    let status = client
        .update_record(update(&record.etag))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(reason(&status), "ETAG_MISMATCH");

    let response = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&response, "phone").0, "+8613700001111");
    assert_eq!(
        value(&response, "name").0,
        "张小三",
        "unmasked fields are kept"
    );
    assert_eq!(
        find_by_phone(app, "13700001111").await,
        std::slice::from_ref(&record.record_id)
    );
    assert!(find_by_phone(app, "13812345678").await.is_empty());
}

async fn find_by_phone(app: &TestApp, phone: &str) -> Vec<String> {
    app.client()
        .await
        .find_records(authed(
            CLAIMS.token,
            FindRecordsRequest {
                purpose: "service-delivery".into(),
                justification: String::new(),
                key: Some(find_records_request::Key::Phone(phone.into())),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_ids
}

async fn find_by_document(app: &TestApp, id_number: &str) -> Vec<String> {
    app.client()
        .await
        .find_records(authed(
            CLAIMS.token,
            FindRecordsRequest {
                purpose: "service-delivery".into(),
                justification: String::new(),
                key: Some(find_records_request::Key::Document(DocumentKey {
                    id_type: proto::IdType::ResidentId as i32,
                    id_number: id_number.into(),
                })),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_ids
}

async fn find_matches_exactly_by_blind_index(app: &TestApp) {
    let zhang = create(app, zhang_san()).await;
    let li = create(app, li_si()).await;
    assert_eq!(
        find_by_document(app, &resident_id("45010219900307123")).await,
        std::slice::from_ref(&zhang.record_id)
    );
    // Written differently, normalised the same.
    assert_eq!(
        find_by_phone(app, "0086 139 8765 4321").await,
        std::slice::from_ref(&li.record_id)
    );
    assert!(
        find_by_document(app, &resident_id("45010219900307133"))
            .await
            .is_empty()
    );
}

async fn deletion_shreds_the_record(app: &TestApp) {
    // A neighbour on each side, so the shredded row leaves a hole inside a page.
    create(app, li_si()).await;
    let record = create(app, zhang_san()).await;
    create(
        app,
        Identity {
            name: "王五".into(),
            ..Identity::default()
        },
    )
    .await;
    let wrapped_key = app
        .bytes(&format!(
            "SELECT wrapped_key FROM records WHERE record_id = '{}'",
            record.record_id
        ))
        .await;
    let mut client = app.client().await;
    client
        .delete_record(authed(
            CLAIMS.token,
            DeleteRecordRequest {
                record_id: record.record_id.clone(),
                reason: "user closed the account".into(),
            },
        ))
        .await
        .unwrap();
    let status = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let state = client
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: record.record_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.status(), proto::AccountStatus::Deleted);
    assert!(find_by_phone(app, "13812345678").await.is_empty());
    // The document is free again for a new record.
    create(app, zhang_san()).await;
    // Crypto-shredded: no wrapped key, no ciphertext; only the tombstone row is left.
    let id = &record.record_id;
    let leftovers = app
        .count(&format!(
            "SELECT (SELECT COUNT(*) FROM sealed_fields WHERE record_id = '{id}') \
                  + (SELECT COUNT(*) FROM records WHERE record_id = '{id}' \
                     AND (wrapped_key IS NOT NULL OR document_index IS NOT NULL \
                          OR phone_index IS NOT NULL))"
        ))
        .await;
    assert_eq!(leftovers, 0);
    let tombstones = app
        .count(&format!(
            "SELECT COUNT(*) FROM records WHERE record_id = '{id}' AND deleted_at IS NOT NULL"
        ))
        .await;
    assert_eq!(tombstones, 1);
    if app.backend == crate::support::Backend::Sqlite {
        // Not even in free pages of the file (PostgreSQL leaves dead row versions to VACUUM;
        // destroying the KEK versions is what reaches those, and backups).
        app.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").await;
        assert!(!contains(&app.raw_database_bytes().await, &wrapped_key));
    }
}

async fn ciphertext_moved_between_records_fails_closed(app: &TestApp) {
    let zhang = create(app, zhang_san()).await;
    let li = create(app, li_si()).await;
    // An attacker with database access copies 张's name ciphertext over 李's.
    let zhang_name = field_of(&app.sealed_fields(&zhang.record_id).await, "name");
    let mut li_fields = app.sealed_fields(&li.record_id).await;
    set_field(&mut li_fields, "name", zhang_name);
    app.set_sealed_fields(&li.record_id, &li_fields).await;
    let status = get(app, CLAIMS.token, &li.record_id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    assert!(!status.message().contains("张"));

    // Moving a ciphertext to another field of the same record fails the same way.
    let mut zhang_fields = app.sealed_fields(&zhang.record_id).await;
    let email = field_of(&zhang_fields, "email");
    set_field(&mut zhang_fields, "address", email);
    app.set_sealed_fields(&zhang.record_id, &zhang_fields).await;
    let status = get(app, CLAIMS.token, &zhang.record_id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
}

/// Migration 0012 moves a record's field rows into its one sealed-fields row, building the
/// documented format in SQL: here the table of field rows is put back as the migrations
/// before it left it, filled from a record the vault wrote, and the migration's own file
/// run over it must give back the same bytes, which the vault then reads as before.
async fn the_sealed_fields_migration_keeps_every_ciphertext(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = &record.record_id;
    let before = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap();
    let stored = app.sealed_fields(id).await;
    assert!(stored.len() >= 8, "{stored:?}");
    let (blob, migration) = match app.backend {
        Backend::Sqlite => (
            "BLOB",
            include_str!("../../migrations/sqlite/0012_sealed_fields.sql"),
        ),
        Backend::Postgres => (
            "BYTEA",
            include_str!("../../migrations/postgres/0012_sealed_fields.sql"),
        ),
    };
    let rows: Vec<String> = stored
        .iter()
        .map(|(field, ciphertext)| format!("('{id}', '{field}', {})", app.hex_literal(ciphertext)))
        .collect();
    app.execute_sql(&format!(
        "DROP TABLE sealed_fields; \
         CREATE TABLE record_fields (record_id TEXT NOT NULL REFERENCES records (record_id), \
             field TEXT NOT NULL, ciphertext {blob} NOT NULL, PRIMARY KEY (record_id, field)); \
         INSERT INTO record_fields (record_id, field, ciphertext) VALUES {};",
        rows.join(", ")
    ))
    .await;
    app.execute_sql(migration).await;
    assert_eq!(app.sealed_fields(id).await, stored);
    let after = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(after.fields, before.fields);
}

fn field_of(fields: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    let found = fields.iter().find(|(field, _)| field == name);
    found.expect("the record holds the field").1.clone()
}

fn set_field(fields: &mut [(String, Vec<u8>)], name: &str, ciphertext: Vec<u8>) {
    let found = fields.iter_mut().find(|(field, _)| field == name);
    found.expect("the record holds the field").1 = ciphertext;
}

async fn no_identity_value_reaches_the_database(app: &TestApp) {
    let identity = zhang_san();
    let record = create(app, identity.clone()).await;
    // Reads and a refused read put events in the audit trail too.
    get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    get(app, CLAIMS.token, &record.record_id, "customer-support", "")
        .await
        .unwrap();
    let _ = get(app, CLAIMS.token, &record.record_id, "legal-compliance", "").await;
    let raw = app.raw_database_bytes().await;
    let id = resident_id("45010219900307123");
    let secrets = [
        identity.name.as_str(),
        "小三",
        id.as_str(),
        &id[6..14],
        "+8613812345678",
        "13812345678",
        "zhangsan",
        "民族大道",
        "青秀区",
        "530022",
        "1990-03-07",
    ];
    for secret in secrets {
        assert!(
            !contains(&raw, secret.as_bytes()),
            "{secret:?} found in the raw {:?} database",
            app.backend
        );
    }
}

async fn check_account_reports_state_without_identity(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let mut client = app.client().await;
    let state = client
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: record.record_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.status(), proto::AccountStatus::Active);
    let status = client
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: "../etc/passwd".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["record_id"]);
}

/// The export's scan reads only the fields it is asked for, on both backends: exactly those
/// a record holds among them (ciphertexts as a single read gives them), none when asked for
/// none, and a record holding none of them is still in the page.
async fn export_scans_read_exactly_the_fields_asked_for(app: &TestApp) {
    let zhang = create(app, zhang_san()).await.record_id;
    let li = create(app, li_si()).await.record_id;
    let store = app.store().await;
    let scan = |fields: &'static [&'static str]| {
        let store = std::sync::Arc::clone(&store);
        async move {
            store
                .scan_live_records(None, i64::MAX, 10, fields)
                .await
                .unwrap()
        }
    };
    fn of<'p>(page: &'p [StoredRecord], id: &str) -> &'p StoredRecord {
        let stored = page
            .iter()
            .find(|stored| stored.meta.record_id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} is in the page"));
        assert_eq!(stored.meta.present_fields, names(stored));
        stored
    }
    fn names(stored: &StoredRecord) -> Vec<String> {
        stored.fields.iter().map(|f| f.field.clone()).collect()
    }
    use pdvault::store::StoredRecord;

    // Li Si has no email and no postal code; his gender comes from his ID number.
    let page = scan(&["email", "gender", "postal_code"]).await;
    assert_eq!(page.len(), 2);
    let zhang_scanned = of(&page, &zhang);
    assert_eq!(names(zhang_scanned), ["email", "gender", "postal_code"]);
    assert_eq!(names(of(&page, &li)), ["gender"]);
    let zhang_read = store
        .get_record(&pdvault::domain::ids::RecordId::parse("record_id", &zhang).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(zhang_read.fields.len() > 3);
    for sealed in &zhang_scanned.fields {
        let read = zhang_read
            .fields
            .iter()
            .find(|read| read.field == sealed.field)
            .unwrap();
        assert_eq!(read.ciphertext, sealed.ciphertext);
    }
    assert_eq!(zhang_scanned.wrapped_key, zhang_read.wrapped_key);

    // A field neither holds: both records, no fields.
    let page = scan(&["email"]).await;
    assert_eq!(names(of(&page, &zhang)), ["email"]);
    assert!(of(&page, &li).fields.is_empty());
    let page = scan(&[]).await;
    assert_eq!(page.len(), 2);
    assert!(page.iter().all(|stored| stored.fields.is_empty()));

    // Every field name: what a single read gives.
    let all: Vec<&str> = pdvault::domain::FieldName::ALL
        .iter()
        .map(|field| field.as_str())
        .collect();
    let all: &'static [&'static str] = Vec::leak(all);
    let page = scan(all).await;
    assert_eq!(names(of(&page, &zhang)), names(&zhang_read));
}

for_each_backend!(
    create_then_get_releases_plaintext_for_a_granted_purpose,
    export_scans_read_exactly_the_fields_asked_for,
    customer_support_sees_masked_values,
    analytics_gets_pseudonyms_stable_per_purpose_and_generalised_values,
    requested_fields_narrow_the_release,
    purposes_must_be_granted_named_and_justified,
    rpcs_must_be_granted,
    callers_must_authenticate,
    invalid_identities_are_refused_field_by_field,
    old_guangxi_numbers_are_accepted,
    duplicate_documents_are_refused_without_naming_the_other_record,
    retried_creates_are_idempotent,
    updates_need_the_current_etag_and_move_the_indexes,
    find_matches_exactly_by_blind_index,
    deletion_shreds_the_record,
    ciphertext_moved_between_records_fails_closed,
    the_sealed_fields_migration_keeps_every_ciphertext,
    no_identity_value_reaches_the_database,
    check_account_reports_state_without_identity,
);
