//! End-to-end tests of suspension, guardian consent for minors, and policy-version
//! acceptance, on both backends. Birthdays are crossed with the test clock, never the wall
//! clock.

use crate::support::cli::cli;
use crate::support::fixtures::*;
use crate::support::{CLAIMS, COMPLIANCE, LOGIN, SECURITY, TestApp, authed};
use chrono::{DateTime, TimeZone, Utc};
use pdvault::proto::{
    self, CheckAccountRequest, CheckAccountResponse, FindRecordsRequest, GuardianIdentity,
    Identity, ListAccountEventsRequest, RecordGuardianConsentRequest, ReinstateAccountRequest,
    RevokeGuardianConsentRequest, SuspendAccountRequest, UpdateRecordRequest, find_records_request,
    record_guardian_consent_request,
};
use tonic::Code;

async fn check(app: &TestApp, record_id: &str) -> CheckAccountResponse {
    app.client()
        .await
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: record_id.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn suspend(app: &TestApp, token: &str, record_id: &str) -> Result<bool, tonic::Status> {
    app.security_client()
        .await
        .suspend_account(authed(
            token,
            SuspendAccountRequest {
                record_id: record_id.into(),
                reason: proto::SuspensionReason::CredentialCompromise as i32,
                note: "用户来电称账号被盗".into(),
                ticket: "SEC-1024".into(),
            },
        ))
        .await
        .map(|r| r.into_inner().changed)
}

/// Beijing wall-clock time as a UTC instant.
fn beijing(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    chrono::FixedOffset::east_opt(8 * 3600)
        .unwrap()
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

fn child(birth_yyyymmdd: &str, sequence: &str) -> Identity {
    Identity {
        name: "小明".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: resident_id(&format!("450102{birth_yyyymmdd}{sequence}")),
        ..Identity::default()
    }
}

async fn suspension_blocks_service_reads_but_not_fraud_prevention(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = &record.record_id;
    assert!(suspend(app, SECURITY.token, id).await.unwrap());
    assert_eq!(
        check(app, id).await.status(),
        proto::AccountStatus::Suspended
    );

    let status = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "ACCOUNT_SUSPENDED");
    let fraud = get(app, COMPLIANCE.token, id, "fraud-prevention", "")
        .await
        .unwrap();
    assert_eq!(value(&fraud, "name").0, "张小三");

    // Lookups that would match the suspended account are refused the same way.
    let status = app
        .client()
        .await
        .find_records(authed(
            CLAIMS.token,
            FindRecordsRequest {
                purpose: "service-delivery".into(),
                justification: String::new(),
                key: Some(find_records_request::Key::Phone("13812345678".into())),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ACCOUNT_SUSPENDED");

    // Suspending again changes nothing and says so.
    assert!(!suspend(app, SECURITY.token, id).await.unwrap());

    let reinstated = app
        .security_client()
        .await
        .reinstate_account(authed(
            SECURITY.token,
            ReinstateAccountRequest {
                record_id: id.clone(),
                note: "已核实本人".into(),
                ticket: "SEC-1024".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reinstated.changed);
    get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(check(app, id).await.status(), proto::AccountStatus::Active);

    let history = app
        .security_client()
        .await
        .list_account_events(authed(
            SECURITY.token,
            ListAccountEventsRequest {
                record_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(history.len(), 2, "the repeated suspension wrote no history");
    assert_eq!(history[0].kind(), proto::AccountEventKind::Suspended);
    assert_eq!(history[0].actor, "security");
    assert_eq!(
        history[0].reason(),
        proto::SuspensionReason::CredentialCompromise
    );
    assert_eq!(history[0].note, "用户来电称账号被盗");
    assert_eq!(history[0].ticket, "SEC-1024");
    assert_eq!(history[1].kind(), proto::AccountEventKind::Reinstated);
    // The staff note is sealed under the record's key, never stored in the clear.
    assert!(!contains(
        &app.raw_database_bytes().await,
        "账号被盗".as_bytes()
    ));
}

async fn ordinary_callers_cannot_suspend(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let status = suspend(app, CLAIMS.token, &record.record_id)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
    assert_eq!(
        check(app, &record.record_id).await.status(),
        proto::AccountStatus::Active
    );
}

async fn writes_to_a_suspended_record_need_the_security_role(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    suspend(app, SECURITY.token, &record.record_id)
        .await
        .unwrap();
    let update = |token: &str| {
        authed(
            token,
            UpdateRecordRequest {
                record_id: record.record_id.clone(),
                identity: Some(Identity {
                    phone: "13700001111".into(),
                    ..Identity::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["phone".into()],
                }),
                etag: record.etag.clone(),
                ..Default::default()
            },
        )
    };
    let mut client = app.client().await;
    let status = client
        .update_record(update(CLAIMS.token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ACCOUNT_SUSPENDED");
    client.update_record(update(SECURITY.token)).await.unwrap();
}

async fn a_minor_needs_a_guardians_consent(app: &TestApp) {
    // Ten years old on 2026-06-01.
    let minor = create(app, child("20160315", "123")).await;
    let id = &minor.record_id;
    let flags = check(app, id).await;
    assert!(flags.minor && flags.under_14 && flags.guardian_consent_required);
    // The gate is sealed under the record's own state key (format 2), with the index suite.
    let gate = app
        .bytes(&format!(
            "SELECT age_gate FROM records WHERE record_id = '{id}'"
        ))
        .await;
    let sm4 = std::env::var("PDVAULT_TEST_SUITE").is_ok_and(|s| s == "sm4gcm-hmacsm3");
    assert_eq!(gate[..2], [2, if sm4 { 2 } else { 1 }]);

    let status = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "GUARDIAN_CONSENT_REQUIRED");
    // Lawful disclosure does not wait for a guardian.
    get(
        app,
        COMPLIANCE.token,
        id,
        "legal-compliance",
        "court order 1",
    )
    .await
    .unwrap();

    let parent = create(app, zhang_san()).await;
    let consent = app
        .client()
        .await
        .record_guardian_consent(authed(
            CLAIMS.token,
            RecordGuardianConsentRequest {
                record_id: id.clone(),
                guardian: Some(record_guardian_consent_request::Guardian::GuardianRecordId(
                    parent.record_id.clone(),
                )),
                relationship: proto::GuardianRelationship::Parent as i32,
                evidence_ref: "DOC-2026-0001".into(),
                policy_version: "2025-01".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(consent.consent_id.starts_with("con_"));
    get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap();
    assert!(!check(app, id).await.guardian_consent_required);

    let revoked = app
        .client()
        .await
        .revoke_guardian_consent(authed(
            CLAIMS.token,
            RevokeGuardianConsentRequest {
                record_id: id.clone(),
                consent_id: String::new(),
                note: "监护人撤回".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revoked.revoked_consent_ids,
        std::slice::from_ref(&consent.consent_id)
    );
    let status = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDIAN_CONSENT_REQUIRED");

    let kinds: Vec<_> = app
        .security_client()
        .await
        .list_account_events(authed(
            SECURITY.token,
            ListAccountEventsRequest {
                record_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events
        .iter()
        .map(|e| e.kind())
        .collect();
    assert_eq!(
        kinds,
        [
            proto::AccountEventKind::ConsentRecorded,
            proto::AccountEventKind::ConsentRevoked
        ]
    );
}

async fn guardians_must_be_other_adults(app: &TestApp) {
    let minor = create(app, child("20160315", "123")).await;
    let sibling = create(app, child("20120101", "456")).await;
    let adult = create(app, zhang_san()).await;
    let consent = |guardian| RecordGuardianConsentRequest {
        record_id: minor.record_id.clone(),
        guardian: Some(guardian),
        relationship: proto::GuardianRelationship::LegalGuardian as i32,
        evidence_ref: "DOC-1".into(),
        policy_version: "2025-01".into(),
    };
    use record_guardian_consent_request::Guardian;
    let mut client = app.client().await;

    let status = client
        .record_guardian_consent(authed(
            CLAIMS.token,
            consent(Guardian::GuardianRecordId(minor.record_id.clone())),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["guardian_record_id"]);

    let status = client
        .record_guardian_consent(authed(
            CLAIMS.token,
            consent(Guardian::GuardianRecordId(sibling.record_id.clone())),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDIAN_NOT_ADULT");

    // An adult cannot be given a guardian.
    let status = client
        .record_guardian_consent(authed(
            CLAIMS.token,
            RecordGuardianConsentRequest {
                record_id: adult.record_id.clone(),
                ..consent(Guardian::GuardianRecordId(minor.record_id.clone()))
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "NOT_A_MINOR");

    // A guardian without a record of their own, stored under the minor's key.
    let guardian = GuardianIdentity {
        name: "王芳".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: resident_id("45010219800101002"),
        phone: "13900001111".into(),
    };
    client
        .record_guardian_consent(authed(
            CLAIMS.token,
            consent(Guardian::GuardianIdentity(guardian.clone())),
        ))
        .await
        .unwrap();
    get(app, CLAIMS.token, &minor.record_id, "service-delivery", "")
        .await
        .unwrap();
    let raw = app.raw_database_bytes().await;
    assert!(!contains(&raw, "王芳".as_bytes()));
    assert!(!contains(&raw, guardian.id_number.as_bytes()));

    // A passport carries no birth date: the guardian's age cannot be established.
    let status = client
        .record_guardian_consent(authed(
            CLAIMS.token,
            consent(Guardian::GuardianIdentity(GuardianIdentity {
                id_type: proto::IdType::Passport as i32,
                id_number: "E12345678".into(),
                ..guardian
            })),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "GUARDIAN_NOT_ADULT");
}

async fn coming_of_age_is_decided_at_request_time(app: &TestApp) {
    // 18th birthday on 2026-06-01; 14th birthday of the other on the same day.
    let turning_18 = create(app, child("20080601", "123")).await;
    let turning_14 = create(app, child("20120601", "124")).await;
    let leap = create(app, child("20080229", "125")).await;

    for (instant, adult_18, over_14) in [
        (beijing(2026, 5, 31, 12, 0), false, false),
        (beijing(2026, 6, 1, 23, 59), false, false),
        (beijing(2026, 6, 2, 0, 0), true, true),
        (beijing(2026, 6, 3, 9, 0), true, true),
    ] {
        app.clock.set(instant);
        let f = check(app, &turning_18.record_id).await;
        assert_eq!(
            (f.minor, f.guardian_consent_required),
            (!adult_18, !adult_18),
            "{instant}"
        );
        let f = check(app, &turning_14.record_id).await;
        assert_eq!((f.minor, f.under_14), (true, !over_14), "{instant}");
        let read = get(
            app,
            CLAIMS.token,
            &turning_18.record_id,
            "service-delivery",
            "",
        )
        .await;
        assert_eq!(read.is_ok(), adult_18, "{instant}");
    }
    // Born on 29 February: the birthday falls on 1 March in 2026.
    app.clock.set(beijing(2026, 3, 1, 12, 0));
    assert!(check(app, &leap.record_id).await.minor);
    app.clock.set(beijing(2026, 3, 2, 0, 0));
    assert!(!check(app, &leap.record_id).await.minor);
}

async fn policy_version_acceptance_is_tracked(app: &TestApp) {
    let record = app
        .client()
        .await
        .create_record(authed(
            CLAIMS.token,
            proto::CreateRecordRequest {
                identity: Some(zhang_san()),
                policy_version: "2023-07".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        check(app, &record.record_id)
            .await
            .policy_reconsent_required
    );
    app.client()
        .await
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: record.record_id.clone(),
                identity: None,
                update_mask: None,
                etag: record.etag.clone(),
                policy_version: "2025-01".into(),
            },
        ))
        .await
        .unwrap();
    assert!(
        !check(app, &record.record_id)
            .await
            .policy_reconsent_required
    );
}

async fn check_account_carries_no_identity(app: &TestApp) {
    let minor = create(app, child("20160315", "123")).await;
    let response = check(app, &minor.record_id).await;
    let printed = format!("{response:?}");
    for secret in ["小明", "2016", "450102"] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
}

async fn the_command_line_drives_a_running_vault(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let run = |args: &[&str], token: &str| {
        cli("accounts")
            .args(args)
            .env("PDVAULT_ADDR", format!("http://{}", app.addr))
            .env("PDVAULT_TOKEN", token)
            .run()
    };
    let out = run(
        &[
            "suspend",
            &record.record_id,
            "--reason",
            "user-request",
            "--ticket",
            "SEC-7",
        ],
        SECURITY.token,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("is now SUSPENDED"));
    let out = run(&["status", &record.record_id], SECURITY.token).await;
    assert!(out.stdout.contains("SUSPENDED"));
    let out = run(&["reinstate", &record.record_id], SECURITY.token).await;
    assert!(out.ok);
    let out = run(&["history", &record.record_id], SECURITY.token).await;
    let history = out.stdout;
    assert!(
        history.contains("SUSPENDED by security reason=USER_REQUEST ticket=SEC-7"),
        "{history}"
    );
    assert!(history.contains("REINSTATED by security"), "{history}");
    // A caller without the grant is refused, and the command says so with a failing exit.
    let out = run(
        &["suspend", &record.record_id, "--reason", "other"],
        CLAIMS.token,
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("PermissionDenied"), "{}", out.stderr);
}

for_each_backend!(
    suspension_blocks_service_reads_but_not_fraud_prevention,
    ordinary_callers_cannot_suspend,
    writes_to_a_suspended_record_need_the_security_role,
    a_minor_needs_a_guardians_consent,
    guardians_must_be_other_adults,
    coming_of_age_is_decided_at_request_time,
    policy_version_acceptance_is_tracked,
    check_account_carries_no_identity,
    the_command_line_drives_a_running_vault,
);
