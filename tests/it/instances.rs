//! Several vault instances sharing one database, as production runs them on PostgreSQL:
//! every answer reflects every committed change made through any instance, and each
//! instance's audit chain verifies beside the others.

use crate::support::fixtures::*;
use crate::support::{CLAIMS, LOGIN, SECURITY, TestApp, authed};
use pdvault::proto::{self, CheckAccountRequest, SuspendAccountRequest};
use tonic::Code;

async fn instances_share_state_through_the_database_only(a: &TestApp) {
    let b = a.spawn_sibling().await;
    let record = create(a, zhang_san()).await;

    // Written through A, read through B.
    let read = get(&b, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&read, "name").0, "张小三");

    // The same document through B is a duplicate of A's record.
    let status = b
        .client()
        .await
        .create_record(authed(CLAIMS.token, create_request(zhang_san(), "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Suspended through B: A refuses at once.
    b.security_client()
        .await
        .suspend_account(authed(
            SECURITY.token,
            SuspendAccountRequest {
                record_id: record.record_id.clone(),
                reason: proto::SuspensionReason::UserRequest as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let status = get(a, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "ACCOUNT_SUSPENDED");
    let state = a
        .client()
        .await
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: record.record_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.status(), proto::AccountStatus::Suspended);

    // Concurrent reads through both instances; two chains, both intact.
    let mut tasks = Vec::new();
    for app in [a, &b] {
        for _ in 0..50 {
            let mut client = app.client().await;
            let record_id = record.record_id.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .get_record(authed(
                        CLAIMS.token,
                        proto::GetRecordRequest {
                            record_id,
                            purpose: "fraud-prevention".into(),
                            ..Default::default()
                        },
                    ))
                    .await
            }));
        }
    }
    for task in tasks {
        // CLAIMS lacks fraud-prevention: every read is a refusal, and every one is audited.
        assert_eq!(
            task.await.unwrap().unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    b.stop().await;
    // Both instances witness into one file, each as its own signer; the public key and
    // that file verify both.
    let report = a.verify_with_witness().await;
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.chains >= 2, "one chain per instance");
    // A's introduction, B's introduction and B's final checkpoint at least.
    assert!(report.witnessed >= 3, "{report:?}");
    let refused = a
        .count(
            "SELECT COUNT(*) FROM audit_events \
             WHERE rpc = 'GetRecord' AND reason = 'PURPOSE_NOT_GRANTED'",
        )
        .await;
    assert_eq!(refused, 100);
}

for_each_backend!(instances_share_state_through_the_database_only);
