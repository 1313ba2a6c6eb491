//! End-to-end tests of the many-records calls of `pdvault.v1.Vault`: `BatchGetRecords`,
//! `BatchCreateRecords` and `ExportRecords`, on both backends.

use std::collections::{BTreeMap, HashSet};

use crate::support::cli::{Ran, cli};
use crate::support::fixtures::*;
use crate::support::{ANALYTICS, Backend, CLAIMS, COMPLIANCE, SECURITY, TestApp, authed};
use pdvault::policy::{PurposeConfig, ReleaseLevel};
use pdvault::proto::{
    self, BatchCreateRecordsRequest, BatchGetRecordsRequest, CreateRecordRequest,
    ExportRecordsRequest, Identity, ListAuditEventsRequest, SuspendAccountRequest,
    batch_create_record_result, batch_get_record_result, export_records_response,
};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The export purpose of these tests: birth year and gender are the quasi-identifiers, the
/// name a pseudonym (not one), k = 3.
const OPEN_DATA: &str = "open-data";

async fn spawn(backend: Backend) -> Option<TestApp> {
    TestApp::spawn_with(backend, |config| {
        config.limits.max_batch_size = 8;
        config.purposes.insert(
            OPEN_DATA.into(),
            PurposeConfig {
                requires_justification: false,
                disclosure: false,
                fields: BTreeMap::from([
                    ("gender".into(), ReleaseLevel::Plain),
                    ("date_of_birth".into(), ReleaseLevel::Generalized),
                    ("name".into(), ReleaseLevel::Pseudonym),
                ]),
                export: true,
                k_anonymity: Some(3),
            },
        );
        for caller in &mut config.callers {
            if caller.name == ANALYTICS.name {
                caller.purposes.push(OPEN_DATA.into());
                caller.purposes.push("important-notice".into());
            }
        }
    })
    .await
}

/// A resident of Nanning born on `yyyymmdd`; an odd `sequence` is a man.
fn person(name: &str, yyyymmdd: &str, sequence: &str) -> Identity {
    Identity {
        name: name.into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: resident_id(&format!("450102{yyyymmdd}{sequence}")),
        nationality: "CHN".into(),
        ..Identity::default()
    }
}

async fn suspend(app: &TestApp, record_id: &str) {
    let changed = app
        .security_client()
        .await
        .suspend_account(authed(
            SECURITY.token,
            SuspendAccountRequest {
                record_id: record_id.into(),
                reason: proto::SuspensionReason::PolicyViolation as i32,
                note: String::new(),
                ticket: "SEC-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .changed;
    assert!(changed);
}

/// The events of a person's trail.
async fn trail(app: &TestApp, record_id: &str) -> Vec<proto::AuditEvent> {
    app.audit_client()
        .await
        .list_audit_events(authed(
            COMPLIANCE.token,
            ListAuditEventsRequest {
                record_id: record_id.into(),
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events
}

fn item_reason(status: &tonic_types::pb::Status) -> String {
    let status = tonic::Status::with_details(
        Code::from_i32(status.code),
        status.message.clone(),
        prost::Message::encode_to_vec(status).into(),
    );
    reason(&status)
}

fn item_bad_fields(status: &tonic_types::pb::Status) -> Vec<String> {
    let status = tonic::Status::with_details(
        Code::from_i32(status.code),
        status.message.clone(),
        prost::Message::encode_to_vec(status).into(),
    );
    let details: ErrorDetails = status.get_error_details();
    details
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect()
        })
        .unwrap_or_default()
}

async fn batch_get(
    app: &TestApp,
    token: &str,
    ids: &[&str],
    purpose: &str,
) -> Result<Vec<batch_get_record_result::Result>, tonic::Status> {
    app.client()
        .await
        .batch_get_records(authed(
            token,
            BatchGetRecordsRequest {
                record_ids: ids.iter().map(|s| s.to_string()).collect(),
                purpose: purpose.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|response| {
            response
                .into_inner()
                .results
                .into_iter()
                .map(|r| r.result.expect("every result is set"))
                .collect()
        })
}

async fn mixed_batch_reads_give_one_audited_result_per_id(app: &TestApp) {
    let adult = create(app, zhang_san()).await.record_id;
    let suspended = create(app, li_si()).await.record_id;
    suspend(app, &suspended).await;
    let minor = create(app, person("小明", "20120101", "456"))
        .await
        .record_id;
    let missing = "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa";
    let results = batch_get(
        app,
        CLAIMS.token,
        &[&minor, &adult, missing, &suspended, "../etc/passwd"],
        "service-delivery",
    )
    .await
    .unwrap();
    assert_eq!(results.len(), 5);
    use batch_get_record_result::Result as R;
    let reasons: Vec<String> = results
        .iter()
        .map(|result| match result {
            R::Record(record) => {
                assert_eq!(record.record_id, adult);
                assert_eq!(value(record, "name").0, "张小三");
                "OK".to_owned()
            }
            R::Error(status) => item_reason(status),
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "GUARDIAN_CONSENT_REQUIRED",
            "OK",
            "RECORD_NOT_FOUND",
            "ACCOUNT_SUSPENDED",
            "FIELD_INVALID"
        ]
    );
    let R::Error(bad) = &results[4] else {
        panic!("a malformed id is an error")
    };
    assert_eq!(bad.code, Code::InvalidArgument as i32);
    assert_eq!(item_bad_fields(bad), ["record_ids[4]"]);
    // Every release and every refusal is in the person's trail.
    for (record, outcome, reason) in [
        (&adult, "OK", ""),
        (&suspended, "DENIED", "ACCOUNT_SUSPENDED"),
        (&minor, "DENIED", "GUARDIAN_CONSENT_REQUIRED"),
    ] {
        let events: Vec<_> = trail(app, record)
            .await
            .into_iter()
            .filter(|event| event.rpc == "BatchGetRecords")
            .collect();
        assert_eq!(events.len(), 1, "{record}");
        assert_eq!(events[0].outcome, outcome);
        assert_eq!(events[0].reason, reason);
        assert_eq!(events[0].purpose, "service-delivery");
        assert!(events[0].record_ids.contains(record), "{record}");
        assert_eq!(events[0].caller, CLAIMS.name);
        if outcome == "OK" {
            assert!(events[0].released.iter().any(|r| r.field == "name"));
        }
    }
    // A requested field list narrows every release.
    let narrowed = app
        .client()
        .await
        .batch_get_records(authed(
            CLAIMS.token,
            BatchGetRecordsRequest {
                record_ids: vec![adult.clone()],
                purpose: "customer-support".into(),
                fields: vec!["phone".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(R::Record(record)) = &narrowed.results[0].result else {
        panic!("released")
    };
    assert_eq!(record.fields.len(), 1);
    assert_eq!(value(record, "phone").0, "138****5678");
}

async fn batch_reads_are_checked_once_for_the_whole_call(app: &TestApp) {
    let adult = create(app, zhang_san()).await.record_id;
    let status = batch_get(app, CLAIMS.token, &[&adult, &adult], "service-delivery")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["record_ids[1]"]);
    let status = batch_get(app, CLAIMS.token, &[], "service-delivery")
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["record_ids"]);
    let nine: Vec<String> = (0..9).map(|i| format!("rec_{i:0>26}")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    let status = batch_get(app, CLAIMS.token, &nine, "service-delivery")
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["record_ids"]);
    let status = batch_get(app, CLAIMS.token, &[&adult], "legal-compliance")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");
    let status = batch_get(app, COMPLIANCE.token, &[&adult], "legal-compliance")
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
    // The refused calls are audited, naming the records they asked for.
    let refused: Vec<_> = trail(app, &adult)
        .await
        .into_iter()
        .filter(|event| event.rpc == "BatchGetRecords")
        .map(|event| event.reason)
        .collect();
    assert!(
        refused.contains(&"PURPOSE_NOT_GRANTED".to_owned()),
        "{refused:?}"
    );
    assert!(
        refused.contains(&"OPERATION_NOT_GRANTED".to_owned()),
        "{refused:?}"
    );
}

async fn batch_create(
    app: &TestApp,
    requests: Vec<CreateRecordRequest>,
) -> Vec<batch_create_record_result::Result> {
    app.client()
        .await
        .batch_create_records(authed(CLAIMS.token, BatchCreateRecordsRequest { requests }))
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.result.expect("every result is set"))
        .collect()
}

async fn batch_creates_keep_items_independent(app: &TestApp) {
    use batch_create_record_result::Result as R;
    let mut bad = person("王五", "19900101", "123");
    bad.id_number = "450102199001011239".into(); // wrong check character
    let twin = person("赵六", "19800202", "111");
    let mut twin_again = twin.clone();
    twin_again.name = "赵六六".into();
    let retried = person("钱七", "19700303", "222");
    let results = batch_create(
        app,
        vec![
            create_request(zhang_san(), ""),
            create_request(bad, ""),
            create_request(twin, ""),
            create_request(twin_again, ""),
            create_request(retried.clone(), "import-7"),
            create_request(retried.clone(), "import-7"),
        ],
    )
    .await;
    assert_eq!(results.len(), 6);
    let id = |result: &R| match result {
        R::Record(record) => record.record_id.clone(),
        R::Error(status) => panic!("unexpected error {status:?}"),
    };
    let first = id(&results[0]);
    let R::Error(invalid) = &results[1] else {
        panic!("the bad item fails")
    };
    assert_eq!(invalid.code, Code::InvalidArgument as i32);
    assert_eq!(item_bad_fields(invalid), ["requests[1].identity.id_number"]);
    let twin_id = id(&results[2]);
    let R::Error(duplicate) = &results[3] else {
        panic!("the second of a pair fails")
    };
    assert_eq!(duplicate.code, Code::AlreadyExists as i32);
    assert_eq!(item_reason(duplicate), "DUPLICATE_IDENTITY");
    let retried_id = id(&results[4]);
    assert_eq!(
        id(&results[5]),
        retried_id,
        "a retry in the batch is a replay"
    );
    // Retried again in a later batch, the request id still answers with the same record.
    let again = batch_create(app, vec![create_request(retried, "import-7")]).await;
    assert_eq!(id(&again[0]), retried_id);
    // Every created record is real and readable, and its creation is in its trail.
    for record_id in [&first, &twin_id, &retried_id] {
        let response = get(app, CLAIMS.token, record_id, "service-delivery", "")
            .await
            .unwrap();
        assert!(!value(&response, "name").0.is_empty());
        let created: Vec<_> = trail(app, record_id)
            .await
            .into_iter()
            .filter(|e| e.rpc == "BatchCreateRecords" && e.outcome == "OK")
            .collect();
        assert_eq!(created.len(), 1, "{record_id}");
    }
    // Whole-call checks: no items, too many.
    let status = app
        .client()
        .await
        .batch_create_records(authed(
            CLAIMS.token,
            BatchCreateRecordsRequest { requests: vec![] },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["requests"]);
    let status = app
        .client()
        .await
        .batch_create_records(authed(
            ANALYTICS.token,
            BatchCreateRecordsRequest {
                requests: vec![create_request(li_si(), "")],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
}

/// Makes the commit (never a statement) of any transaction that inserts a record with
/// policy version `trip-at-commit` fail: a deferred check, run by the database at COMMIT.
async fn arm_commit_tripwire(app: &TestApp) {
    app.execute_sql(match app.backend {
        Backend::Sqlite => {
            "CREATE TABLE tripwire_parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE tripwire (parent INTEGER \
                 REFERENCES tripwire_parent (id) DEFERRABLE INITIALLY DEFERRED); \
             CREATE TRIGGER tripwire_arm AFTER INSERT ON records \
                 WHEN NEW.policy_version = 'trip-at-commit' \
                 BEGIN INSERT INTO tripwire (parent) VALUES (1); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION tripwire() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'tripped at commit'; END $$; \
             CREATE CONSTRAINT TRIGGER tripwire AFTER INSERT ON records \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
                 WHEN (NEW.policy_version = 'trip-at-commit') EXECUTE FUNCTION tripwire();"
        }
    })
    .await;
}

async fn disarm_commit_tripwire(app: &TestApp) {
    app.execute_sql(match app.backend {
        Backend::Sqlite => "DROP TRIGGER tripwire_arm;",
        Backend::Postgres => "DROP TRIGGER tripwire ON records;",
    })
    .await;
}

async fn batch_creates_commit_once(app: &TestApp) {
    use batch_create_record_result::Result as R;
    let records = || async { app.count("SELECT count(*) FROM records").await };
    let results = batch_create(
        app,
        vec![
            create_request(person("甲", "19810101", "011"), ""),
            create_request(person("乙", "19820202", "022"), "import-1"),
            create_request(person("丙", "19830303", "033"), ""),
        ],
    )
    .await;
    assert!(
        results.iter().all(|result| matches!(result, R::Record(_))),
        "{results:?}"
    );
    assert_eq!(records().await, 3);
    // A batch whose commit fails: no item is visible, not even those the failure was not
    // about, and each item says it failed.
    arm_commit_tripwire(app).await;
    let batch = || {
        let mut tripping = create_request(person("丁", "19840404", "044"), "");
        tripping.policy_version = "trip-at-commit".into();
        vec![
            create_request(person("戊", "19850505", "055"), "import-2"),
            tripping,
            create_request(person("己", "19860606", "066"), ""),
        ]
    };
    let failed = batch_create(app, batch()).await;
    assert_eq!(failed.len(), 3);
    for result in &failed {
        let R::Error(status) = result else {
            panic!("an item of a batch that did not commit was answered as created")
        };
        assert_eq!(status.code, Code::Unavailable as i32);
        assert_eq!(item_reason(status), "STORAGE_UNAVAILABLE");
    }
    assert_eq!(
        records().await,
        3,
        "nothing of the failed batch was written"
    );
    // The same batch again commits whole: none of its documents or request ids was taken.
    disarm_commit_tripwire(app).await;
    let again = batch_create(app, batch()).await;
    assert!(
        again.iter().all(|result| matches!(result, R::Record(_))),
        "{again:?}"
    );
    assert_eq!(records().await, 6);
}

/// A storage failure after an item's record row is written (here a trigger refusing its
/// sealed fields) never leaves a record without its fields, nor fields without their record.
/// On SQLite the items share the job's savepoint, so the whole batch fails and nothing of it
/// is written; on PostgreSQL each item has its own savepoint, so only that item fails.
async fn batch_create_failing_after_a_record_row_writes_no_half_record(app: &TestApp) {
    use batch_create_record_result::Result as R;
    app.execute_sql(match app.backend {
        Backend::Sqlite => {
            "CREATE TRIGGER fields_refused BEFORE INSERT ON sealed_fields \
                 WHEN (SELECT policy_version FROM records WHERE record_id = NEW.record_id) \
                     = 'refuse-fields' \
                 BEGIN SELECT RAISE(ABORT, 'fields refused'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION fields_refused() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN \
                     IF (SELECT policy_version FROM records WHERE record_id = NEW.record_id) \
                         = 'refuse-fields' THEN RAISE EXCEPTION 'fields refused'; END IF; \
                     RETURN NEW; \
                 END $$; \
             CREATE TRIGGER fields_refused BEFORE INSERT ON sealed_fields \
                 FOR EACH ROW EXECUTE FUNCTION fields_refused();"
        }
    })
    .await;
    let mut refused = create_request(person("庚", "19870707", "077"), "");
    refused.policy_version = "refuse-fields".into();
    let results = batch_create(
        app,
        vec![
            create_request(person("辛", "19880808", "088"), "import-3"),
            refused,
            create_request(person("壬", "19890909", "099"), ""),
        ],
    )
    .await;
    assert_eq!(results.len(), 3);
    let R::Error(status) = &results[1] else {
        panic!("an item whose fields could not be written was answered as created")
    };
    assert_eq!(status.code, Code::Unavailable as i32, "{status:?}");
    let created = results
        .iter()
        .filter(|result| matches!(result, R::Record(_)))
        .count();
    let expected = match app.backend {
        Backend::Sqlite => 0,
        Backend::Postgres => 2,
    };
    assert_eq!(created, expected, "{results:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM records").await,
        i64::try_from(expected).unwrap_or(i64::MAX)
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM records r WHERE NOT EXISTS \
             (SELECT 1 FROM sealed_fields f WHERE f.record_id = r.record_id)"
        )
        .await,
        0,
        "a record was left without its fields"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM sealed_fields f WHERE NOT EXISTS \
             (SELECT 1 FROM records r WHERE r.record_id = f.record_id)"
        )
        .await,
        0,
        "sealed fields were left without their record"
    );
}

/// An export as the client sees it: rows (row key, fields) with their cursors, and the
/// summary.
struct Exported {
    rows: Vec<(proto::ExportedRow, String)>,
    summary: Option<proto::ExportSummary>,
}

async fn export(
    app: &TestApp,
    cursor: &str,
    stop_after: Option<usize>,
) -> Result<Exported, tonic::Status> {
    let mut stream = app
        .client()
        .await
        .export_records(authed(
            ANALYTICS.token,
            ExportRecordsRequest {
                purpose: OPEN_DATA.into(),
                justification: String::new(),
                resume_cursor: cursor.into(),
            },
        ))
        .await?
        .into_inner();
    let mut exported = Exported {
        rows: Vec::new(),
        summary: None,
    };
    while let Some(message) = stream.message().await? {
        match message.item.expect("every message has an item") {
            export_records_response::Item::Row(row) => {
                assert!(!message.cursor.is_empty());
                exported.rows.push((row, message.cursor));
                if stop_after == Some(exported.rows.len()) {
                    // Dropping the stream breaks it, as a lost connection would.
                    return Ok(exported);
                }
            }
            export_records_response::Item::Summary(summary) => {
                exported.summary = Some(summary);
            }
        }
    }
    Ok(exported)
}

/// The fixture, by (birth year, gender) class, with k = 3:
/// - 1990 men: 4 records, one more suspended: 4 rows exported;
/// - 1990 women: 3 records: 3 rows exported;
/// - 1985 women: 2 records and one suspended: suppressed (2 rows);
/// - 2012 boys: 3 minors without consent: left out (a read would be refused);
/// - one 1970 man alone: suppressed (1 row).
///
/// Exported 7, suppressed 3. Returns the record ids by what should happen to them.
async fn export_fixture(app: &TestApp) -> (Vec<String>, Vec<String>, Vec<String>) {
    const EXPORTED: usize = 0;
    const SUPPRESSED: usize = 1;
    const LEFT_OUT: usize = 2;
    let mut buckets: [Vec<String>; 3] = Default::default();
    let people = [
        ("19900101", "011", EXPORTED, false),
        ("19900202", "013", EXPORTED, false),
        ("19900303", "015", EXPORTED, false),
        ("19900404", "017", EXPORTED, false),
        ("19900505", "019", LEFT_OUT, true),
        ("19900606", "022", EXPORTED, false),
        ("19900707", "024", EXPORTED, false),
        ("19900808", "026", EXPORTED, false),
        ("19850101", "032", SUPPRESSED, false),
        ("19850202", "034", SUPPRESSED, false),
        ("19850303", "036", LEFT_OUT, true),
        ("20120101", "041", LEFT_OUT, false),
        ("20120202", "043", LEFT_OUT, false),
        ("20120303", "045", LEFT_OUT, false),
        ("19700101", "051", SUPPRESSED, false),
    ];
    for (i, (birth, sequence, bucket, suspended)) in people.into_iter().enumerate() {
        const NAMES: &str = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉";
        let given = NAMES.chars().nth(i).unwrap_or('某');
        let record = create(app, person(&format!("居民{given}"), birth, sequence)).await;
        if suspended {
            suspend(app, &record.record_id).await;
        }
        buckets[bucket].push(record.record_id);
    }
    let [exported, suppressed, left_out] = buckets;
    (exported, suppressed, left_out)
}

fn class_of(row: &proto::ExportedRow) -> (String, String) {
    let field = |name: &str| {
        row.fields
            .get(name)
            .map(|f| f.value.clone())
            .unwrap_or_default()
    };
    (field("date_of_birth"), field("gender"))
}

async fn exports_suppress_small_classes_exactly(app: &TestApp) {
    let (exported, suppressed, left_out) = export_fixture(app).await;
    let all = export(app, "", None).await.unwrap();
    let summary = all.summary.expect("the stream ends with its summary");
    assert_eq!(summary.rows_exported, 7);
    assert_eq!(summary.rows_suppressed, 3);
    assert_eq!(summary.k_anonymity, 3);
    assert_eq!(all.rows.len(), 7);
    let mut classes = BTreeMap::new();
    for (row, _) in &all.rows {
        *classes.entry(class_of(row)).or_insert(0) += 1;
    }
    assert_eq!(
        classes,
        BTreeMap::from([
            (("1990".to_owned(), "FEMALE".to_owned()), 3),
            (("1990".to_owned(), "MALE".to_owned()), 4),
        ])
    );
    let every_id: Vec<&String> = exported
        .iter()
        .chain(&suppressed)
        .chain(&left_out)
        .collect();
    let mut keys = HashSet::new();
    for (row, cursor) in &all.rows {
        assert!(row.row_key.starts_with("psn_"), "{}", row.row_key);
        assert!(keys.insert(row.row_key.clone()), "row keys are unique");
        for id in &every_id {
            assert!(!row.row_key.contains(id.as_str()) && !cursor.contains(id.as_str()));
        }
        // Only the purpose's levels: a pseudonym, a generalised year, a plain gender.
        assert_eq!(row.fields.len(), 3);
        let name = &row.fields["name"];
        assert_eq!(name.level(), proto::ReleaseLevel::Pseudonym);
        assert!(name.value.starts_with("psn_") && !name.value.contains("居民"));
        assert_eq!(
            row.fields["date_of_birth"].level(),
            proto::ReleaseLevel::Generalized
        );
        assert_eq!(row.fields["gender"].level(), proto::ReleaseLevel::Plain);
        for released in row.fields.values() {
            assert!(!released.value.contains('*'), "nothing masked");
            for id in &every_id {
                assert!(!released.value.contains(id.as_str()));
            }
        }
    }
    // Each exported person's trail shows the export; nobody else's does.
    for record_id in &exported {
        let events: Vec<_> = trail(app, record_id)
            .await
            .into_iter()
            .filter(|e| e.rpc == "ExportRecords")
            .collect();
        assert_eq!(events.len(), 1, "{record_id}");
        let event = &events[0];
        assert_eq!(event.outcome, "OK");
        assert_eq!(event.purpose, OPEN_DATA);
        assert_eq!(event.caller, ANALYTICS.name);
        assert!(event.reason.contains("rows_exported=7"), "{}", event.reason);
        assert!(
            event.reason.contains("rows_suppressed=3"),
            "{}",
            event.reason
        );
        assert_eq!(event.record_ids.len(), 7, "one event for this small export");
    }
    for record_id in suppressed.iter().chain(&left_out) {
        assert!(
            trail(app, record_id)
                .await
                .iter()
                .all(|e| e.rpc != "ExportRecords"),
            "{record_id}"
        );
    }
}

async fn broken_exports_resume_without_duplicates_or_gaps(app: &TestApp) {
    export_fixture(app).await;
    let whole = export(app, "", None).await.unwrap();
    let whole_keys: Vec<String> = whole.rows.iter().map(|(r, _)| r.row_key.clone()).collect();
    let first = export(app, "", Some(3)).await.unwrap();
    assert_eq!(first.rows.len(), 3);
    assert!(first.summary.is_none());
    // A record created after the export began is not part of it.
    create(app, person("后来者", "19900909", "029")).await;
    let cursor = first.rows[2].1.clone();
    let rest = export(app, &cursor, None).await.unwrap();
    let mut keys: Vec<String> = first
        .rows
        .iter()
        .chain(&rest.rows)
        .map(|(r, _)| r.row_key.clone())
        .collect();
    assert_eq!(keys.len(), 7, "no duplicates, no gaps");
    keys.sort();
    let mut expected = whole_keys.clone();
    expected.sort();
    assert_eq!(keys, expected, "the same rows as an unbroken export");
    let summary = rest
        .summary
        .expect("the resumed stream ends with the summary");
    assert_eq!((summary.rows_exported, summary.rows_suppressed), (7, 3));
    // Resuming after the last row gives the summary alone.
    let last = rest.rows.last().unwrap().1.clone();
    let end = export(app, &last, None).await.unwrap();
    assert!(end.rows.is_empty());
    assert!(end.summary.is_some());
    // A cursor that was tampered with, or is another caller's, is refused.
    let mut tampered = cursor.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let status = export(app, &String::from_utf8(tampered).unwrap(), None)
        .await
        .err()
        .expect("a tampered cursor is refused");
    assert_eq!(bad_fields(&status), ["resume_cursor"]);
}

/// Runs `pdvault export` (the real binary) against `app` as the analytics caller.
async fn export_command(app: &TestApp, args: &[&str]) -> Ran {
    cli("export")
        .args(args)
        .env("PDVAULT_ADDR", format!("http://{}", app.addr))
        .env("PDVAULT_TOKEN", ANALYTICS.token)
        .run()
        .await
}

async fn the_export_command_writes_a_resumable_csv(app: &TestApp) {
    let (exported, suppressed, left_out) = export_fixture(app).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("open-data.csv");
    let out_arg = out.to_str().unwrap();
    let ran = export_command(app, &["--purpose", OPEN_DATA, "--out", out_arg]).await;
    assert!(ran.ok, "{}", ran.stderr);
    assert!(
        ran.stdout.contains("7 rows exported, 3 suppressed"),
        "{}",
        ran.stdout
    );
    let whole = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    assert_eq!(
        lines[0],
        "row_key,name,gender,id_type,id_number,date_of_birth,nationality,phone,email,address,postal_code"
    );
    // One row per exported record, keyed as the stream keys them, in the stream's order.
    let streamed = export(app, "", None).await.unwrap();
    let keys: Vec<&str> = lines[1..]
        .iter()
        .map(|line| line.split(',').next().unwrap())
        .collect();
    let streamed_keys: Vec<&str> = streamed
        .rows
        .iter()
        .map(|(r, _)| r.row_key.as_str())
        .collect();
    assert_eq!(keys, streamed_keys);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 7);
    for (line, (row, _)) in lines[1..].iter().zip(&streamed.rows) {
        let columns: Vec<&str> = line.split(',').collect();
        assert_eq!(columns.len(), 11, "{line}");
        assert_eq!(columns[2], row.fields["gender"].value);
        assert_eq!(columns[5], row.fields["date_of_birth"].value);
        assert_eq!(columns[1], row.fields["name"].value);
    }
    for record_id in exported.iter().chain(&suppressed).chain(&left_out) {
        assert!(
            !whole.contains(record_id.as_str()),
            "a record id in the CSV"
        );
    }
    assert!(!whole.contains("居民"), "a plain name in the CSV");
    assert!(!std::path::Path::new(&format!("{out_arg}.cursor")).exists());
    // An interrupted export: the file holds the header, three rows and half of a fourth,
    // and its state names the third row's cursor and the length up to that row.
    let three = lines[..4].iter().map(|line| line.len() + 1).sum::<usize>();
    let first = export(app, "", Some(3)).await.unwrap();
    assert_eq!(first.rows[2].0.row_key, keys[2]);
    std::fs::write(&out, format!("{}{}", &whole[..three], &lines[4][..5])).unwrap();
    std::fs::write(
        format!("{out_arg}.cursor"),
        format!("{three}\n{}\n", first.rows[2].1),
    )
    .unwrap();
    // Without --resume the command will not overwrite it.
    let refused = export_command(app, &["--purpose", OPEN_DATA, "--out", out_arg]).await;
    assert!(!refused.ok);
    assert!(refused.stderr.contains("--resume"));
    let resumed =
        export_command(app, &["--purpose", OPEN_DATA, "--out", out_arg, "--resume"]).await;
    assert!(resumed.ok, "{}", resumed.stderr);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        whole,
        "the resumed file is the whole export: no duplicate, no gap, no torn row"
    );
    assert!(!std::path::Path::new(&format!("{out_arg}.cursor")).exists());
}

async fn exports_refuse_changes_non_export_purposes_and_other_callers(app: &TestApp) {
    let (exported, _, _) = export_fixture(app).await;
    let first = export(app, "", Some(2)).await.unwrap();
    let cursor = first.rows[1].1.clone();
    suspend(app, &exported[6]).await;
    let status = export(app, &cursor, None)
        .await
        .err()
        .expect("a changed data set cannot be resumed");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "EXPORT_CHANGED");
    // A purpose granted to the caller that is not an export purpose.
    let status = app
        .client()
        .await
        .export_records(authed(
            ANALYTICS.token,
            ExportRecordsRequest {
                purpose: "important-notice".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "EXPORT_NOT_ALLOWED");
    let status = app
        .client()
        .await
        .export_records(authed(
            CLAIMS.token,
            ExportRecordsRequest {
                purpose: "service-delivery".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
    let status = app
        .client()
        .await
        .export_records(authed(
            ANALYTICS.token,
            ExportRecordsRequest {
                purpose: "service-delivery".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");
}

/// A batch create is audited by ONE event naming every record it created, in request order,
/// and no other: each created person's trail shows that event (and a refused item's
/// would-be record is in no event).
async fn batch_creates_are_audited_by_one_event_naming_each_created_record(app: &TestApp) {
    use batch_create_record_result::Result as R;
    let twin = person("孙八", "19750505", "131");
    let results = batch_create(
        app,
        vec![
            create_request(person("周九", "19760606", "141"), ""),
            create_request(twin.clone(), ""),
            create_request(twin, ""),
            create_request(person("吴十", "19770707", "151"), ""),
        ],
    )
    .await;
    assert!(
        matches!(&results[2], R::Error(status) if item_reason(status) == "DUPLICATE_IDENTITY"),
        "{results:?}"
    );
    let created: Vec<String> = results
        .iter()
        .filter_map(|result| match result {
            R::Record(record) => Some(record.record_id.clone()),
            R::Error(_) => None,
        })
        .collect();
    assert_eq!(created.len(), 3, "{results:?}");
    let mut event_ids = HashSet::new();
    for record_id in &created {
        let events: Vec<_> = trail(app, record_id)
            .await
            .into_iter()
            .filter(|e| e.rpc == "BatchCreateRecords")
            .collect();
        assert_eq!(events.len(), 1, "{record_id}");
        assert_eq!(events[0].outcome, "OK");
        assert_eq!(events[0].caller, CLAIMS.name);
        assert_eq!(
            events[0].record_ids, created,
            "names exactly the created records"
        );
        event_ids.insert(events[0].event_id.clone());
    }
    assert_eq!(event_ids.len(), 1, "one event for the whole batch");
}

for_each_backend_with!(
    spawn,
    mixed_batch_reads_give_one_audited_result_per_id,
    batch_reads_are_checked_once_for_the_whole_call,
    batch_creates_keep_items_independent,
    batch_creates_commit_once,
    batch_create_failing_after_a_record_row_writes_no_half_record,
    batch_creates_are_audited_by_one_event_naming_each_created_record,
    exports_suppress_small_classes_exactly,
    broken_exports_resume_without_duplicates_or_gaps,
    the_export_command_writes_a_resumable_csv,
    exports_refuse_changes_non_export_purposes_and_other_callers,
);
