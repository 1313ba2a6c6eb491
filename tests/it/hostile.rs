//! Issue 11, "hostile callers": what a caller with no grants, a caller with write RPCs but no
//! purposes, or a caller that sends hostile strings can do to other callers, to the trail and
//! to the answers it gets. One scenario per item, on both backends.
//!
//! Loops are bounded in count and time and talk to the test's own server on loopback.

use std::time::{Duration, Instant};

use crate::support::fixtures::*;
use crate::support::{
    ANALYTICS, Backend, CLAIMS, COMPLIANCE, LOGIN, SECURITY, TestApp, authed, join_all,
};
use pdvault::audit::{AuditEvent, AuditLog, Problem};
use pdvault::config::Config;
use pdvault::policy::{CallerConfig, token_sha256_hex};
use pdvault::proto::account_security_client::AccountSecurityClient;
use pdvault::proto::audit_client::AuditClient;
use pdvault::proto::key_management_client::KeyManagementClient;
use pdvault::proto::vault_client::VaultClient;
use pdvault::proto::{
    self, CheckAccountRequest, CreateRecordRequest, DeleteRecordRequest, FindRecordsRequest,
    GetRecordRequest, GuardianIdentity, Identity, ListAccountEventsRequest, ListAuditEventsRequest,
    ListDisclosuresRequest, RecordGuardianConsentRequest, RekeyRecordRequest,
    RevokeGuardianConsentRequest, RotateKeyEncryptionKeyRequest, SuspendAccountRequest,
    UpdateRecordRequest, find_records_request, record_guardian_consent_request,
};
use tonic::Code;
use tonic_types::StatusExt;

/// Authenticated, and granted nothing at all.
const STRANGER: &str = "stranger-token-0123456789";
/// May call the write RPCs, and may read for no purpose.
const SCRIBE: &str = "scribe-token-0123456789";

fn hostile_callers(config: &mut Config) {
    config.callers.push(CallerConfig {
        name: "stranger".into(),
        token_sha256: token_sha256_hex(STRANGER),
        ..CallerConfig::default()
    });
    config.callers.push(CallerConfig {
        name: "scribe".into(),
        token_sha256: token_sha256_hex(SCRIBE),
        rpcs: [
            "CreateRecord",
            "UpdateRecord",
            "DeleteRecord",
            "RecordGuardianConsent",
            "RevokeGuardianConsent",
        ]
        .map(String::from)
        .to_vec(),
        ..CallerConfig::default()
    });
}

/// One `#[tokio::test]` per backend for each scenario, on an app with the hostile callers.
macro_rules! hostile_scenarios {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let backend = $crate::support::Backend::Sqlite;
                    if let Some(app) = $crate::support::TestApp::spawn_with(backend, super::hostile_callers).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let backend = $crate::support::Backend::Postgres;
                    if let Some(app) = $crate::support::TestApp::spawn_with(backend, super::hostile_callers).await {
                        super::$scenario(&app).await;
                        app.stop().await;
                    }
                }
            )*
        }
    };
}

fn read(
    token: &str,
    record_id: &str,
    purpose: &str,
    justification: &str,
) -> tonic::Request<GetRecordRequest> {
    authed(
        token,
        GetRecordRequest {
            record_id: record_id.into(),
            purpose: purpose.into(),
            justification: justification.into(),
            fields: vec![],
        },
    )
}

fn error_reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("an ErrorInfo on {status:?}"))
        .reason
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.count(sql).await
}

// --- A1. One caller can never hurt another caller's requests or the trail ---------------

/// A poison loop (a NUL in a record id from a caller with no grants, a NUL in a granted
/// read's justification) beside a read loop: no good read fails, every poison is refused as
/// bad input, and nothing of it reached the trail.
async fn a1_poison_requests_never_fail_other_callers_reads(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.clone();
    let channel = app.channel().await;
    let deadline = Instant::now() + Duration::from_secs(4);
    let poison = {
        let (channel, id) = (channel.clone(), id.clone());
        tokio::spawn(async move {
            let mut client = VaultClient::new(channel);
            let mut answers = Vec::new();
            while Instant::now() < deadline && answers.len() < 1_000 {
                let refused = client
                    .get_record(read(STRANGER, "rec_\0", "x", ""))
                    .await
                    .map(|_| ());
                answers.push(refused.map_err(|status| status.code()));
                let refused = client
                    .get_record(read(CLAIMS.token, &id, "service-delivery", "ticket\0 1"))
                    .await
                    .map(|_| ());
                answers.push(refused.map_err(|status| status.code()));
            }
            answers
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (channel, id) = (channel.clone(), id.clone());
            tokio::spawn(async move {
                let mut client = VaultClient::new(channel);
                let (mut ok, mut failed) = (0, Vec::new());
                while Instant::now() < deadline && ok + failed.len() < 1_000 {
                    match client
                        .get_record(read(COMPLIANCE.token, &id, "fraud-prevention", ""))
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(status) => failed.push((status.code(), error_reason(&status))),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let poison = poison.await.unwrap();
    let mut good = 0;
    for reader in readers {
        let (ok, failed) = reader.await.unwrap();
        assert!(failed.is_empty(), "good reads failed: {failed:?}");
        good += ok;
    }
    let sent = poison.len();
    assert!(
        poison
            .iter()
            .all(|answer| *answer == Err(Code::InvalidArgument)),
        "poison is bad input"
    );
    assert!(sent > 0 && good > 0, "poison {sent}, good reads {good}");
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'GetRecord' AND outcome = 'OK'"
        )
        .await,
        good as i64
    );
    assert!(
        count(
            app,
            "SELECT COUNT(*) FROM audit_events WHERE caller = 'stranger' \
             AND record_ids = '[\"(malformed record id, 5 bytes)\"]' \
             AND purpose = '(unknown purpose, 1 bytes)' AND reason = 'record_id'"
        )
        .await
            > 0,
        "the poison is on record, with placeholders"
    );
}

fn event(chain_id: &str, id: &str, caller: &str) -> AuditEvent {
    AuditEvent {
        event_id: id.to_owned(),
        occurred_at: 1_780_000_000_000_000,
        chain_id: chain_id.to_owned(),
        caller: caller.to_owned(),
        peer: None,
        rpc: "GetRecord".into(),
        record_ids: vec![],
        purpose: None,
        justification: None,
        released: vec![],
        outcome: "OK".into(),
        reason: None,
        request_id: None,
        trace_id: None,
    }
}

/// The second wall, below the edge: events the store refuses (an event id already taken; on
/// PostgreSQL also a NUL byte, which it cannot store as text) fail alone, the events that
/// shared their group commit are written, and the chain still verifies.
async fn a1_the_audit_writer_fails_only_the_events_the_store_refuses(app: &TestApp) {
    let store = app.store().await;
    let (log, writer) = AuditLog::start(store.clone(), 1_780_000_000_000_000)
        .await
        .unwrap();
    let chain = log.chain_id().to_string();
    log.record(event(&chain, "evt_taken", "writer"))
        .await
        .unwrap();
    for round in 0..5 {
        let mut batch = Vec::new();
        for i in 0..40 {
            batch.push((
                true,
                event(&chain, &format!("evt_good_{round}_{i}"), "writer"),
            ));
            if i % 13 == 6 {
                batch.push((false, event(&chain, "evt_taken", "writer")));
            }
            if i % 13 == 9 && app.backend == Backend::Postgres {
                batch.push((
                    false,
                    event(&chain, &format!("evt_nul_{round}_{i}"), "wri\0ter"),
                ));
            }
        }
        let outcomes = join_all(
            batch
                .iter()
                .map(|(_, e)| Box::pin(log.record(e.clone())))
                .collect(),
        )
        .await;
        for ((good, e), outcome) in batch.iter().zip(outcomes) {
            assert_eq!(
                outcome.is_ok(),
                *good,
                "{} in round {round}: {outcome:?}",
                e.event_id
            );
        }
    }
    log.close();
    writer.await.unwrap();
    let report = pdvault::audit::verify(store.as_ref(), app.keyring().audit_signing())
        .await
        .unwrap();
    // Every event links to the one before; no vault signed a checkpoint of this test's own
    // chain, so it is only unvouched.
    let unexpected: Vec<_> = report
        .problems
        .iter()
        .filter(|problem| !matches!(problem, Problem::Unvouched { chain_id } if *chain_id == chain))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert_eq!(
        count(
            app,
            &format!("SELECT COUNT(*) FROM audit_events WHERE chain_id = '{chain}'")
        )
        .await,
        1 + 5 * 40
    );
}

/// Every request string that can reach an audit event is checked at the edge: a NUL, a
/// control character, a bidi override, a zero-width space or an oversized value in any of
/// them is `INVALID_ARGUMENT` naming the field (with ErrorInfo `FIELD_INVALID`), and the
/// refusal is audited without the value.
async fn a1_every_request_string_is_checked_at_the_edge(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.as_str();
    let channel = app.channel().await;
    let mut vault = VaultClient::new(channel.clone());
    let mut accounts = AccountSecurityClient::new(channel.clone());
    let mut audit = AuditClient::new(channel.clone());
    let mut keys = KeyManagementClient::new(channel.clone());
    let hostile = [
        "poison\0value".to_owned(),
        "line\nbreak-marker".to_owned(),
        "\u{202e}fdp.exe-marker".to_owned(),
        "zero\u{200b}width-marker".to_owned(),
        "x".repeat(60_000),
    ];
    for bad in &hostile {
        let mut refusals: Vec<(tonic::Status, &str)> = Vec::new();
        let mut check = |status: tonic::Status, field: &'static str| refusals.push((status, field));
        check(
            vault
                .get_record(read(COMPLIANCE.token, bad, "fraud-prevention", ""))
                .await
                .unwrap_err(),
            "record_id",
        );
        check(
            vault
                .get_record(read(COMPLIANCE.token, id, bad, ""))
                .await
                .unwrap_err(),
            "purpose",
        );
        check(
            vault
                .get_record(read(COMPLIANCE.token, id, "legal-compliance", bad))
                .await
                .unwrap_err(),
            "justification",
        );
        check(
            vault
                .find_records(authed(
                    COMPLIANCE.token,
                    FindRecordsRequest {
                        purpose: "fraud-prevention".into(),
                        justification: bad.clone(),
                        key: Some(find_records_request::Key::Phone("13812345678".into())),
                    },
                ))
                .await
                .unwrap_err(),
            "justification",
        );
        check(
            vault
                .delete_record(authed(
                    CLAIMS.token,
                    DeleteRecordRequest {
                        record_id: id.into(),
                        reason: bad.clone(),
                    },
                ))
                .await
                .unwrap_err(),
            "reason",
        );
        check(
            vault
                .create_record(authed(CLAIMS.token, create_request(li_si(), bad.clone())))
                .await
                .unwrap_err(),
            "request_id",
        );
        check(
            vault
                .create_record(authed(
                    CLAIMS.token,
                    CreateRecordRequest {
                        identity: Some(li_si()),
                        policy_version: bad.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap_err(),
            "policy_version",
        );
        check(
            vault
                .check_account(authed(
                    LOGIN.token,
                    CheckAccountRequest {
                        record_id: bad.clone(),
                    },
                ))
                .await
                .unwrap_err(),
            "record_id",
        );
        check(
            vault
                .record_guardian_consent(authed(
                    CLAIMS.token,
                    RecordGuardianConsentRequest {
                        record_id: id.into(),
                        guardian: Some(
                            record_guardian_consent_request::Guardian::GuardianRecordId(id.into()),
                        ),
                        relationship: proto::GuardianRelationship::Parent as i32,
                        evidence_ref: bad.clone(),
                        policy_version: "2025-01".into(),
                    },
                ))
                .await
                .unwrap_err(),
            "evidence_ref",
        );
        check(
            vault
                .revoke_guardian_consent(authed(
                    CLAIMS.token,
                    RevokeGuardianConsentRequest {
                        record_id: id.into(),
                        consent_id: bad.clone(),
                        note: String::new(),
                    },
                ))
                .await
                .unwrap_err(),
            "consent_id",
        );
        for (note, ticket, field) in [
            (bad.as_str(), "SEC-1", "note"),
            ("", bad.as_str(), "ticket"),
        ] {
            check(
                accounts
                    .suspend_account(authed(
                        SECURITY.token,
                        SuspendAccountRequest {
                            record_id: id.into(),
                            reason: proto::SuspensionReason::Other as i32,
                            note: note.into(),
                            ticket: ticket.into(),
                        },
                    ))
                    .await
                    .unwrap_err(),
                field,
            );
        }
        check(
            audit
                .list_audit_events(authed(
                    COMPLIANCE.token,
                    ListAuditEventsRequest {
                        outcome: bad.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap_err(),
            "outcome",
        );
        check(
            keys.rekey_record(authed(
                &app.admin_token,
                RekeyRecordRequest {
                    record_id: id.into(),
                    reason: bad.clone(),
                },
            ))
            .await
            .unwrap_err(),
            "reason",
        );
        for (status, field) in refusals {
            assert_eq!(bad_fields(&status), [field], "{bad:?}: {status:?}");
            assert_eq!(error_reason(&status), "FIELD_INVALID");
            assert!(!status.message().contains(bad.as_str()));
        }
    }
    // The correlation headers too.
    for (header, value) in [("x-request-id", "a b"), ("traceparent", "00-zz-00-01")] {
        let mut request = read(COMPLIANCE.token, id, "fraud-prevention", "");
        request
            .metadata_mut()
            .insert(header, value.parse().unwrap());
        let status = vault.get_record(request).await.unwrap_err();
        assert_eq!(bad_fields(&status), [header]);
    }
    // No refused string is in the trail, whole or in part.
    let raw = app.raw_database_bytes().await;
    for needle in [
        "poison\0value",
        "line\nbreak-marker",
        "\u{202e}fdp.exe-marker",
        "zero\u{200b}width-marker",
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ] {
        assert!(
            !contains(&raw, needle.as_bytes()),
            "{needle:?} reached the database"
        );
    }
    assert!(
        count(
            app,
            "SELECT COUNT(*) FROM audit_events WHERE outcome = 'INVALID_ARGUMENT'"
        )
        .await
            >= 5 * 14
    );
}

// --- A2. No identity through the side door ---------------------------------------------

/// Identity values of a record sent in every request field by callers who may not read them
/// (no grants; write RPCs but no purposes) reach neither the database nor any answer.
async fn a2_identity_in_any_field_reaches_neither_the_trail_nor_an_answer(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.as_str();
    let person = zhang_san();
    let values = [
        person.id_number.clone(),
        "+8613812345678".to_owned(),
        "13812345678".to_owned(),
        person.name.clone(),
        person.email.clone(),
    ];
    let channel = app.channel().await;
    let mut vault = VaultClient::new(channel.clone());
    let mut accounts = AccountSecurityClient::new(channel.clone());
    let mut audit = AuditClient::new(channel.clone());
    let mut answers: Vec<tonic::Status> = Vec::new();
    for value in &values {
        let v = value.clone();
        for token in [STRANGER, SCRIBE] {
            answers.push(
                vault
                    .get_record(read(token, &v, "customer-support", ""))
                    .await
                    .unwrap_err(),
            );
            answers.push(vault.get_record(read(token, id, &v, "")).await.unwrap_err());
            answers.push(
                vault
                    .get_record(read(token, id, "legal-compliance", &v))
                    .await
                    .unwrap_err(),
            );
            answers.push(vault.get_record(read(token, &v, &v, &v)).await.unwrap_err());
            answers.push(
                vault
                    .get_record(authed(
                        token,
                        GetRecordRequest {
                            record_id: id.into(),
                            purpose: "customer-support".into(),
                            justification: String::new(),
                            fields: vec![v.clone()],
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .find_records(authed(
                        token,
                        FindRecordsRequest {
                            purpose: v.clone(),
                            justification: v.clone(),
                            key: Some(find_records_request::Key::Phone(v.clone())),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .update_record(authed(
                        token,
                        UpdateRecordRequest {
                            record_id: v.clone(),
                            etag: v.clone(),
                            policy_version: v.clone(),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec![v.clone()],
                            }),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .update_record(authed(
                        token,
                        UpdateRecordRequest {
                            record_id: id.into(),
                            etag: v.clone(),
                            identity: Some(Identity {
                                name: "王五".into(),
                                ..Identity::default()
                            }),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .delete_record(authed(
                        token,
                        DeleteRecordRequest {
                            record_id: v.clone(),
                            reason: v.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .check_account(authed(
                        token,
                        CheckAccountRequest {
                            record_id: v.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .record_guardian_consent(authed(
                        token,
                        RecordGuardianConsentRequest {
                            record_id: v.clone(),
                            guardian: Some(
                                record_guardian_consent_request::Guardian::GuardianRecordId(
                                    v.clone(),
                                ),
                            ),
                            relationship: proto::GuardianRelationship::Parent as i32,
                            evidence_ref: v.clone(),
                            policy_version: v.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                vault
                    .revoke_guardian_consent(authed(
                        token,
                        RevokeGuardianConsentRequest {
                            record_id: v.clone(),
                            consent_id: v.clone(),
                            note: v.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                accounts
                    .suspend_account(authed(
                        token,
                        SuspendAccountRequest {
                            record_id: v.clone(),
                            reason: proto::SuspensionReason::Other as i32,
                            note: v.clone(),
                            ticket: v.clone(),
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                accounts
                    .list_account_events(authed(
                        token,
                        ListAccountEventsRequest {
                            record_id: v.clone(),
                            page_token: v.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                audit
                    .list_audit_events(authed(
                        token,
                        ListAuditEventsRequest {
                            record_id: v.clone(),
                            caller: v.clone(),
                            purpose: v.clone(),
                            outcome: v.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
            answers.push(
                audit
                    .list_disclosures(authed(
                        token,
                        ListDisclosuresRequest {
                            record_id: v.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap_err(),
            );
        }
    }
    // A caller that may read, for other purposes.
    for value in &values {
        answers.push(
            vault
                .get_record(read(ANALYTICS.token, id, value, ""))
                .await
                .unwrap_err(),
        );
        answers.push(
            vault
                .get_record(read(ANALYTICS.token, id, "legal-compliance", value))
                .await
                .unwrap_err(),
        );
    }
    for status in &answers {
        let said = format!("{} {:?}", status.message(), status.details());
        for value in &values {
            assert!(
                !said.contains(value.as_str()),
                "{value:?} in the answer {status:?}"
            );
        }
    }
    let denied = answers
        .iter()
        .find(|status| {
            status.code() == Code::PermissionDenied && error_reason(status) == "PURPOSE_NOT_GRANTED"
        })
        .expect("a purpose refusal");
    assert_eq!(
        denied.message(),
        "the purpose is unknown or not granted to this caller"
    );
    let raw = app.raw_database_bytes().await;
    for value in &values {
        assert!(
            !contains(&raw, value.as_bytes()),
            "{value:?} found in the raw database"
        );
    }
    // Every refusal is on record all the same.
    assert!(
        count(
            app,
            "SELECT COUNT(*) FROM audit_events \
             WHERE caller IN ('stranger', 'scribe', 'analytics')"
        )
        .await
            >= answers.len() as i64
    );
}

// --- A3. Bounded trail -------------------------------------------------------------------

/// Refused calls with 60 000-byte strings leave events of bounded size; free text is
/// bounded in bytes (a justification of 200 CJK characters is 600 bytes: refused).
async fn a3_every_stored_string_has_a_byte_limit(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let mut client = app.client().await;
    // Within the 64 KiB message limit.
    let (huge, long) = ("9".repeat(60_000), "9".repeat(2_000));
    for _ in 0..50 {
        let status = client
            .get_record(read(STRANGER, &huge, &long, &long))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let widest = count(
        app,
        "SELECT CAST(MAX(LENGTH(record_ids) + LENGTH(COALESCE(purpose, '')) \
         + LENGTH(COALESCE(justification, '')) + LENGTH(COALESCE(reason, ''))) AS BIGINT) \
         FROM audit_events",
    )
    .await;
    assert!(widest < 512, "an event of {widest} characters");
    let long_basis = "依".repeat(200);
    let status = client
        .get_record(read(
            COMPLIANCE.token,
            &record.record_id,
            "legal-compliance",
            &long_basis,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["justification"]);
    assert!(status.message().contains("512 bytes"));
    let fits = "依".repeat(170);
    client
        .get_record(read(
            COMPLIANCE.token,
            &record.record_id,
            "legal-compliance",
            &fits,
        ))
        .await
        .unwrap();
}

// --- A4. A justification is a justification -----------------------------------------------

/// A purpose that requires a justification needs visible text of at least four characters,
/// without hidden characters; what passes is the basis the person is later shown.
async fn a4_a_required_justification_is_visible_text(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.as_str();
    let mut client = app.client().await;
    for hollow in [
        "\u{200b}",
        "\u{200b}\u{200b}\u{200b}\u{200b}",
        "   ",
        "a.b",
        "\u{202e}ref-2026-1",
        "\u{2066}R-1\u{2069}",
    ] {
        let status = client
            .get_record(read(COMPLIANCE.token, id, "legal-compliance", hollow))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["justification"], "{hollow:?}");
    }
    let basis = "(2026)京0105刑初123号";
    client
        .get_record(read(COMPLIANCE.token, id, "legal-compliance", basis))
        .await
        .unwrap();
    let disclosures = app
        .audit_client()
        .await
        .list_disclosures(authed(
            COMPLIANCE.token,
            ListDisclosuresRequest {
                record_id: id.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .disclosures;
    let bases: Vec<&str> = disclosures.iter().map(|d| d.basis.as_str()).collect();
    assert_eq!(bases, [basis]);
}

// --- B6. Refused writes are audited ------------------------------------------------------

/// Every refused write leaves an event (caller, RPC, record ids, reason) in a write of its
/// own: a duplicate create, a stale update, an ungranted delete, a consent for an adult, a
/// suspension by a caller without the grant, an ungranted key rotation.
async fn b6_refused_writes_are_audited(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.clone();
    let channel = app.channel().await;
    let mut vault = VaultClient::new(channel.clone());
    let duplicate = vault
        .create_record(authed(CLAIMS.token, create_request(zhang_san(), "")))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&duplicate), "DUPLICATE_IDENTITY");
    vault
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: id.clone(),
                identity: Some(Identity {
                    name: "王五".into(),
                    ..Identity::default()
                }),
                etag: record.etag.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let stale = vault
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: id.clone(),
                identity: Some(Identity {
                    name: "赵六".into(),
                    ..Identity::default()
                }),
                etag: record.etag.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&stale), "ETAG_MISMATCH");
    let ungranted = vault
        .delete_record(authed(
            COMPLIANCE.token,
            DeleteRecordRequest {
                record_id: id.clone(),
                reason: "cleanup".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&ungranted), "OPERATION_NOT_GRANTED");
    let adult = vault
        .record_guardian_consent(authed(
            CLAIMS.token,
            RecordGuardianConsentRequest {
                record_id: id.clone(),
                guardian: Some(record_guardian_consent_request::Guardian::GuardianIdentity(
                    GuardianIdentity {
                        name: "李四".into(),
                        id_type: proto::IdType::ResidentId as i32,
                        id_number: resident_id("45030519851120002"),
                        phone: String::new(),
                    },
                )),
                relationship: proto::GuardianRelationship::Parent as i32,
                evidence_ref: "DOC-2026-0002".into(),
                policy_version: "2025-01".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&adult), "NOT_A_MINOR");
    let suspension = AccountSecurityClient::new(channel.clone())
        .suspend_account(authed(
            CLAIMS.token,
            SuspendAccountRequest {
                record_id: id.clone(),
                reason: proto::SuspensionReason::Other as i32,
                note: String::new(),
                ticket: "SEC-9".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&suspension), "OPERATION_NOT_GRANTED");
    let rotation = KeyManagementClient::new(channel.clone())
        .rotate_key_encryption_key(authed(
            CLAIMS.token,
            RotateKeyEncryptionKeyRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&rotation), "OPERATION_NOT_GRANTED");
    let on_record = |rpc: &str, caller: &str, reason: &str, record: Option<&str>| {
        let record = record.map_or("IS NULL".to_owned(), |id| format!("= '{id}'"));
        format!(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = '{rpc}' AND caller = '{caller}' \
             AND outcome <> 'OK' AND reason = '{reason}' AND record_id {record}"
        )
    };
    for (rpc, caller, reason, record) in [
        ("CreateRecord", "claims", "DUPLICATE_IDENTITY", None),
        ("UpdateRecord", "claims", "ETAG_MISMATCH", Some(id.as_str())),
        (
            "DeleteRecord",
            "compliance",
            "OPERATION_NOT_GRANTED",
            Some(id.as_str()),
        ),
        (
            "RecordGuardianConsent",
            "claims",
            "NOT_A_MINOR",
            Some(id.as_str()),
        ),
        (
            "SuspendAccount",
            "claims",
            "OPERATION_NOT_GRANTED",
            Some(id.as_str()),
        ),
        (
            "RotateKeyEncryptionKey",
            "claims",
            "OPERATION_NOT_GRANTED",
            None,
        ),
    ] {
        assert_eq!(
            count(app, &on_record(rpc, caller, reason, record)).await,
            1,
            "{rpc}"
        );
    }
    // The refused writes changed nothing.
    let current = get(app, CLAIMS.token, &id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&current, "name").0, "王五");
}

// --- B7. CheckAccount is audited --------------------------------------------------------

/// CheckAccount is audited like a read: the flags it released are the event's fields (and
/// so it answers the breach question), and a refused CheckAccount is on record too.
async fn b7_check_account_is_audited_like_a_read(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let mut client = app.client().await;
    for _ in 0..3 {
        client
            .check_account(authed(
                LOGIN.token,
                CheckAccountRequest {
                    record_id: record.record_id.clone(),
                },
            ))
            .await
            .unwrap();
    }
    let refused = client
        .check_account(authed(
            STRANGER,
            CheckAccountRequest {
                record_id: record.record_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(error_reason(&refused), "OPERATION_NOT_GRANTED");
    let events = app
        .audit_client()
        .await
        .list_audit_events(authed(
            COMPLIANCE.token,
            ListAuditEventsRequest {
                caller: "login".into(),
                plaintext_only: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 3);
    for event in &events {
        assert_eq!(event.rpc, "CheckAccount");
        assert_eq!(event.record_ids, std::slice::from_ref(&record.record_id));
        let fields: Vec<&str> = event.released.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "status",
                "minor",
                "under_14",
                "guardian_consent_required",
                "policy_reconsent_required"
            ]
        );
    }
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'CheckAccount' AND caller = 'stranger' \
             AND reason = 'OPERATION_NOT_GRANTED'"
        )
        .await,
        1
    );
}

// --- B8. No oracle in UpdateRecord --------------------------------------------------------

/// A writer that may read nothing cannot learn the birth date or the gender by guessing:
/// the right and the wrong guess get the same answer, which never compares with the stored
/// value; replacing the document derives them from the new one.
async fn b8_update_answers_nothing_about_stored_values(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    let id = record.record_id.as_str();
    let mut client = app.client().await;
    let update = |identity: Identity, paths: &[&str], etag: &str| {
        authed(
            SCRIBE,
            UpdateRecordRequest {
                record_id: id.into(),
                identity: Some(identity),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
                etag: etag.into(),
                ..Default::default()
            },
        )
    };
    let mut answers = Vec::new();
    for guess in ["1990-03-07", "1990-03-08", ""] {
        let identity = Identity {
            date_of_birth: guess.into(),
            ..Identity::default()
        };
        let status = client
            .update_record(update(identity, &["date_of_birth"], &record.etag))
            .await
            .unwrap_err();
        answers.push((
            status.code(),
            status.message().to_owned(),
            bad_fields(&status),
        ));
    }
    for gender in [proto::Gender::Male, proto::Gender::Female] {
        let identity = Identity {
            gender: gender as i32,
            ..Identity::default()
        };
        let status = client
            .update_record(update(identity, &["gender"], &record.etag))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["gender"]);
        assert!(status.message().contains("derived from id_number"));
        answers.push((
            status.code(),
            status.message().replace("gender", "date_of_birth"),
            vec!["date_of_birth".to_owned()],
        ));
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "{answers:?}"
    );
    assert!(answers[0].1.contains("derived from id_number"));

    // Replacing the document derives the birth date and gender from the new number, rather
    // than checking it against the stored ones.
    let replaced = client
        .update_record(update(
            Identity {
                id_type: proto::IdType::ResidentId as i32,
                id_number: resident_id("45010219851120002"),
                ..Identity::default()
            },
            &["id_type", "id_number"],
            &record.etag,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(replaced.etag, record.etag);
    let released = get(app, CLAIMS.token, id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&released, "date_of_birth").0, "1985-11-20");
    assert_eq!(value(&released, "gender").0, "FEMALE");
}

// --- B9. Opaque etags ---------------------------------------------------------------------

/// Etags are opaque MACs: a counter is malformed, a well-formed guess or an old etag is
/// stale, only the current one writes.
async fn b9_etags_are_opaque(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    assert!(
        record.etag.starts_with("etg_") && record.etag.len() == 30,
        "{}",
        record.etag
    );
    let read_etag = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap()
        .etag;
    assert_eq!(read_etag, record.etag);
    let mut client = app.client().await;
    let rename = |etag: &str, name: &str| {
        authed(
            SCRIBE,
            UpdateRecordRequest {
                record_id: record.record_id.clone(),
                identity: Some(Identity {
                    name: name.into(),
                    ..Identity::default()
                }),
                etag: etag.into(),
                ..Default::default()
            },
        )
    };
    for counter in ["1", "2", "", "etg_1"] {
        let status = client
            .update_record(rename(counter, "王五"))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), ["etag"], "{counter:?}");
    }
    let guess = format!("etg_{}", "a".repeat(26));
    let status = client
        .update_record(rename(&guess, "王五"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_reason(&status).as_str()),
        (Code::Aborted, "ETAG_MISMATCH")
    );
    let updated = client
        .update_record(rename(&record.etag, "王五"))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .update_record(rename(&record.etag, "赵六"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_reason(&status).as_str()),
        (Code::Aborted, "ETAG_MISMATCH")
    );
    client
        .update_record(rename(&updated.etag, "赵六"))
        .await
        .unwrap();
    // Another record's etag is no etag of this one.
    let other = create(app, li_si()).await;
    let status = client
        .update_record(rename(&other.etag, "孙七"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
}

// --- D13. RekeyRecord moves every ciphertext bound to a record -------------------------

/// A minor with an inline guardian and staff notes is re-keyed; then the notes list, the
/// guardian's sealed identity opens under the new key, and nothing opens under the old.
async fn d13_rekey_moves_notes_and_inline_guardians(app: &TestApp) {
    let minor = create(
        app,
        Identity {
            name: "小明".into(),
            id_type: proto::IdType::ResidentId as i32,
            id_number: resident_id("45010220160315123"),
            ..Identity::default()
        },
    )
    .await;
    let id = minor.record_id.clone();
    let channel = app.channel().await;
    let consent = VaultClient::new(channel.clone())
        .record_guardian_consent(authed(
            CLAIMS.token,
            RecordGuardianConsentRequest {
                record_id: id.clone(),
                guardian: Some(record_guardian_consent_request::Guardian::GuardianIdentity(
                    GuardianIdentity {
                        name: "李四".into(),
                        id_type: proto::IdType::ResidentId as i32,
                        id_number: resident_id("45030519851120002"),
                        phone: "13987654321".into(),
                    },
                )),
                relationship: proto::GuardianRelationship::Parent as i32,
                evidence_ref: "DOC-2026-0003".into(),
                policy_version: "2025-01".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut accounts = AccountSecurityClient::new(channel.clone());
    accounts
        .suspend_account(authed(
            SECURITY.token,
            SuspendAccountRequest {
                record_id: id.clone(),
                reason: proto::SuspensionReason::CredentialCompromise as i32,
                note: "家长来电称账号被盗".into(),
                ticket: "SEC-2048".into(),
            },
        ))
        .await
        .unwrap();
    let store = app.store().await;
    let stored_id = pdvault::domain::ids::RecordId::parse("record_id", &id).unwrap();
    let before = store.get_record(&stored_id).await.unwrap().unwrap();
    let bound_before = store.bound_ciphertexts(&stored_id).await.unwrap();
    assert_eq!(
        (bound_before.notes.len(), bound_before.guardians.len()),
        (1, 1)
    );

    KeyManagementClient::new(channel.clone())
        .rekey_record(authed(
            &app.admin_token,
            RekeyRecordRequest {
                record_id: id.clone(),
                reason: "INC-7 exposure".into(),
            },
        ))
        .await
        .unwrap();

    let notes: Vec<String> = accounts
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
        .into_iter()
        .map(|event| event.note)
        .collect();
    assert_eq!(notes, ["", "家长来电称账号被盗"]);
    let after = store.get_record(&stored_id).await.unwrap().unwrap();
    let bound = store.bound_ciphertexts(&stored_id).await.unwrap();
    let (consent_id, guardian) = &bound.guardians[0];
    assert_eq!(consent_id, &consent.consent_id);
    assert_ne!(guardian, &bound_before.guardians[0].1);
    assert_ne!(bound.notes[0].1, bound_before.notes[0].1);
    if app.config.keys.provider != "local" {
        // The KEKs are in the hardware module: the keyring file cannot open the data keys.
        return;
    }
    let old_key = app.keyring().unwrap(&before.wrapped_key, &id).unwrap();
    let new_key = app.keyring().unwrap(&after.wrapped_key, &id).unwrap();
    let field = format!("guardian.{consent_id}");
    let opened = new_key.open_field(&id, &field, guardian).unwrap();
    assert!(String::from_utf8(opened.to_vec()).unwrap().contains("李四"));
    assert!(old_key.open_field(&id, &field, guardian).is_err());
    assert!(
        old_key
            .open_field(&id, "account.note", &bound.notes[0].1)
            .is_err()
    );
}

// --- D14. A retried create never revives a deleted record --------------------------------

/// A retry with the request id of a deleted record is `FAILED_PRECONDITION` /
/// `RECORD_DELETED`; the key keeps no fingerprint of the identity once its record is gone,
/// and request ids expire after 24 hours.
async fn d14_a_retried_create_never_revives_a_deleted_record(app: &TestApp) {
    let mut client = app.client().await;
    let create = |identity: Identity, request_id: &str| {
        authed(CLAIMS.token, create_request(identity, request_id))
    };
    let first = client
        .create_record(create(zhang_san(), "req-7"))
        .await
        .unwrap()
        .into_inner();
    client
        .delete_record(authed(
            CLAIMS.token,
            DeleteRecordRequest {
                record_id: first.record_id.clone(),
                reason: "closed".into(),
            },
        ))
        .await
        .unwrap();
    let retry = client
        .create_record(create(zhang_san(), "req-7"))
        .await
        .unwrap_err();
    assert_eq!(
        (retry.code(), error_reason(&retry).as_str()),
        (Code::FailedPrecondition, "RECORD_DELETED")
    );
    assert!(!retry.message().contains(&first.record_id));
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM create_requests WHERE fingerprint IS NOT NULL"
        )
        .await,
        0,
        "the fingerprint (an HMAC of the identity) went with the record"
    );

    // Keys expire: 23 hours on, a retry still answers with the same record; 25 hours on, the
    // request id is free again.
    let no_document = || Identity {
        name: "王五".into(),
        phone: "13700000000".into(),
        ..Identity::default()
    };
    let made = client
        .create_record(create(no_document(), "req-8"))
        .await
        .unwrap()
        .into_inner();
    let created = chrono::DateTime::from_timestamp_micros(
        made.create_time.as_ref().unwrap().seconds * 1_000_000,
    )
    .unwrap();
    app.clock.set(created + chrono::Duration::hours(23));
    let replayed = client
        .create_record(create(no_document(), "req-8"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.record_id, made.record_id);
    app.clock.set(created + chrono::Duration::hours(25));
    let fresh = client
        .create_record(create(no_document(), "req-8"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fresh.record_id, made.record_id);
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM create_requests WHERE request_id = 'req-8'"
        )
        .await,
        1,
        "the expired key was replaced"
    );
    // The sweep removes expired keys; "req-7" (deleted) and the old keys are past their time.
    app.clock.set(created + chrono::Duration::hours(50));
    let store = app.store().await;
    let cutoff = (created + chrono::Duration::hours(24)).timestamp_micros();
    assert_eq!(store.expire_create_requests(cutoff).await.unwrap(), 1);
    assert_eq!(count(app, "SELECT COUNT(*) FROM create_requests").await, 1);
}

// --- D15. Every person's trail is complete -------------------------------------------------

/// An event naming several records (a lookup with two matches, a consent naming minor and
/// guardian) is in each person's listing.
async fn d15_events_naming_several_records_are_in_each_persons_trail(app: &TestApp) {
    let shared_phone = "13911112222";
    let a = create(
        app,
        Identity {
            name: "甲".into(),
            phone: shared_phone.into(),
            ..Identity::default()
        },
    )
    .await;
    let b = create(
        app,
        Identity {
            name: "乙".into(),
            phone: shared_phone.into(),
            ..Identity::default()
        },
    )
    .await;
    let channel = app.channel().await;
    let found = VaultClient::new(channel.clone())
        .find_records(authed(
            COMPLIANCE.token,
            FindRecordsRequest {
                purpose: "fraud-prevention".into(),
                justification: String::new(),
                key: Some(find_records_request::Key::Phone(shared_phone.into())),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_ids;
    assert_eq!(found.len(), 2);
    let minor = create(
        app,
        Identity {
            name: "小明".into(),
            id_type: proto::IdType::ResidentId as i32,
            id_number: resident_id("45010220160315123"),
            ..Identity::default()
        },
    )
    .await;
    let parent = create(app, zhang_san()).await;
    VaultClient::new(channel.clone())
        .record_guardian_consent(authed(
            CLAIMS.token,
            RecordGuardianConsentRequest {
                record_id: minor.record_id.clone(),
                guardian: Some(record_guardian_consent_request::Guardian::GuardianRecordId(
                    parent.record_id.clone(),
                )),
                relationship: proto::GuardianRelationship::Parent as i32,
                evidence_ref: "DOC-2026-0004".into(),
                policy_version: "2025-01".into(),
            },
        ))
        .await
        .unwrap();
    let mut audit = AuditClient::new(channel);
    let mut rpcs_of = async |record_id: &str| -> Vec<String> {
        audit
            .list_audit_events(authed(
                COMPLIANCE.token,
                ListAuditEventsRequest {
                    record_id: record_id.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .events
            .into_iter()
            .map(|event| event.rpc)
            .collect()
    };
    for person in [&a.record_id, &b.record_id] {
        let rpcs = rpcs_of(person).await;
        assert!(rpcs.contains(&"FindRecords".to_owned()), "{rpcs:?}");
        assert!(rpcs.contains(&"CreateRecord".to_owned()), "{rpcs:?}");
    }
    for person in [&minor.record_id, &parent.record_id] {
        let rpcs = rpcs_of(person).await;
        assert!(
            rpcs.contains(&"RecordGuardianConsent".to_owned()),
            "{rpcs:?}"
        );
    }
    // Paging still walks one person's whole trail, newest first, without repeats.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit
            .list_audit_events(authed(
                COMPLIANCE.token,
                ListAuditEventsRequest {
                    record_id: a.record_id.clone(),
                    page_size: 1,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.events.into_iter().map(|e| e.event_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(seen, unique);
    assert!(seen.len() >= 3, "{seen:?}");
}

// --- D18. Time filters are real instants ----------------------------------------------------

async fn d18_time_filters_out_of_range_are_invalid(app: &TestApp) {
    let mut audit = app.audit_client().await;
    let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    for (start, end, field) in [
        (at(253_402_300_800, 0), None, "start_time"),
        (None, at(i64::MAX, 0), "end_time"),
        (at(-62_135_596_801, 0), None, "start_time"),
        (at(0, -1), None, "start_time"),
        (None, at(0, 1_000_000_000), "end_time"),
    ] {
        let status = audit
            .list_audit_events(authed(
                COMPLIANCE.token,
                ListAuditEventsRequest {
                    start_time: start,
                    end_time: end,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(bad_fields(&status), [field]);
    }
    audit
        .list_audit_events(authed(
            COMPLIANCE.token,
            ListAuditEventsRequest {
                start_time: at(-62_135_596_800, 0),
                end_time: at(253_402_300_799, 999_999_999),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

// --- D19. ErrorInfo on every error ----------------------------------------------------------

/// Every error the service answers carries an ErrorInfo reason in domain `pdvault`, and the
/// README's error table lists every reason the code can give.
async fn d19_every_error_has_an_error_info_reason_listed_in_the_readme(app: &TestApp) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let listed = |reason: &str| readme.contains(&format!("| `{reason}` |"));
    let record = create(app, zhang_san()).await;
    let mut client = app.client().await;
    let mut statuses = vec![
        client
            .get_record(read(COMPLIANCE.token, "bad", "fraud-prevention", ""))
            .await
            .unwrap_err(),
        client
            .get_record(read(STRANGER, &record.record_id, "x", ""))
            .await
            .unwrap_err(),
        client
            .get_record(read(
                CLAIMS.token,
                "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa",
                "service-delivery",
                "",
            ))
            .await
            .unwrap_err(),
        client
            .get_record(read("no-such-token", &record.record_id, "x", ""))
            .await
            .unwrap_err(),
    ];
    statuses.push(
        client
            .get_record(tonic::Request::new(GetRecordRequest::default()))
            .await
            .unwrap_err(),
    );
    for status in &statuses {
        let reason = error_reason(status);
        assert!(
            listed(&reason),
            "{reason} is not in the README's error table"
        );
    }
    // Every reason string the error paths use is in the table. The gRPC layer (its limits
    // included) and the Admin service (`src/app/admin.rs`) are where statuses are made;
    // account states and event kinds are not reasons.
    let not_reasons = [
        "ACTIVE",
        "SUSPENDED",
        "REINSTATED",
        "CONSENT_RECORDED",
        "CONSENT_REVOKED",
    ];
    let mut sources = String::new();
    for dir in ["src/grpc", "src/app"] {
        for entry in
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_owned() + dir).unwrap()
        {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if dir == "src/app" && name != "admin.rs" {
                continue;
            }
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut reasons: Vec<&str> = sources
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.len() > 2
                && s.bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
        })
        .filter(|s| s.as_bytes()[0].is_ascii_uppercase() && !not_reasons.contains(s))
        .collect();
    reasons.sort();
    reasons.dedup();
    assert!(reasons.len() > 20, "{reasons:?}");
    let missing: Vec<_> = reasons.iter().filter(|r| !listed(r)).collect();
    assert!(
        missing.is_empty(),
        "not in the README's error table: {missing:?}"
    );
}

hostile_scenarios!(
    a1_poison_requests_never_fail_other_callers_reads,
    a1_the_audit_writer_fails_only_the_events_the_store_refuses,
    a1_every_request_string_is_checked_at_the_edge,
    a2_identity_in_any_field_reaches_neither_the_trail_nor_an_answer,
    a3_every_stored_string_has_a_byte_limit,
    a4_a_required_justification_is_visible_text,
    b6_refused_writes_are_audited,
    b7_check_account_is_audited_like_a_read,
    b8_update_answers_nothing_about_stored_values,
    b9_etags_are_opaque,
    d13_rekey_moves_notes_and_inline_guardians,
    d14_a_retried_create_never_revives_a_deleted_record,
    d15_events_naming_several_records_are_in_each_persons_trail,
    d18_time_filters_out_of_range_are_invalid,
    d19_every_error_has_an_error_info_reason_listed_in_the_readme,
);
