//! End-to-end tests of the audit trail: durable before release, exactly once under
//! concurrency, tamper-evident, queryable, and expiring without breaking verification.
//! Every scenario runs on SQLite and on PostgreSQL.

use crate::support::fixtures::*;
use crate::support::{Backend, CLAIMS, COMPLIANCE, TestApp, authed, join_all};
use pdvault::audit::{AuditEvent, Problem};
use pdvault::proto::{
    DeleteRecordRequest, Identity, ListAuditEventsRequest, ListDisclosuresRequest,
    VerifyAuditChainRequest,
};
use tonic::Code;

async fn verify(app: &TestApp) -> pdvault::audit::VerifyReport {
    app.verify_with_witness().await
}

async fn checkpoint(app: &TestApp) {
    app.checkpoint().await.unwrap();
}

/// Makes every insert into the audit table fail, as an unwritable audit store would.
async fn block_audit_writes(app: &TestApp) {
    let sql = match app.backend {
        Backend::Sqlite => {
            "CREATE TRIGGER block_audit BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit store unwritable'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION block_audit() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN RAISE EXCEPTION 'audit store unwritable'; END $$; \
             CREATE TRIGGER block_audit BEFORE INSERT ON audit_events \
               FOR EACH ROW EXECUTE FUNCTION block_audit();"
        }
    };
    app.execute_sql(sql).await;
}

async fn unblock_audit_writes(app: &TestApp) {
    let sql = match app.backend {
        Backend::Sqlite => "DROP TRIGGER block_audit;",
        Backend::Postgres => {
            "DROP TRIGGER block_audit ON audit_events; DROP FUNCTION block_audit();"
        }
    };
    app.execute_sql(sql).await;
}

async fn nothing_is_released_when_the_audit_store_is_unwritable(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    block_audit_writes(app).await;
    let status = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "AUDIT_UNAVAILABLE");
    assert!(!status.message().contains("张"));
    unblock_audit_writes(app).await;
    let response = get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    assert_eq!(value(&response, "name").0, "张小三");
}

/// `reads` concurrent granted-purpose reads of one new record by one caller, each with its
/// own `x-request-id` (`load-<i>`); their answers in order.
async fn concurrent_reads(app: &TestApp, reads: usize) -> Vec<Result<(), tonic::Status>> {
    let record = create(app, zhang_san()).await;
    let client = app.client().await;
    let mut tasks = Vec::new();
    for i in 0..reads {
        let mut client = client.clone();
        let record_id = record.record_id.clone();
        tasks.push(tokio::spawn(async move {
            let mut request = authed(
                CLAIMS.token,
                pdvault::proto::GetRecordRequest {
                    record_id,
                    purpose: "service-delivery".into(),
                    ..Default::default()
                },
            );
            request
                .metadata_mut()
                .insert("x-request-id", format!("load-{i}").parse().unwrap());
            client.get_record(request).await.map(drop)
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// The events of [`concurrent_reads`]: granted ones, and distinct request ids of any outcome.
async fn load_events(app: &TestApp) -> (i64, i64) {
    let granted = app
        .count(
            "SELECT COUNT(*) FROM audit_events \
             WHERE rpc = 'GetRecord' AND outcome = 'OK' AND request_id LIKE 'load-%'",
        )
        .await;
    let distinct = app
        .count(
            "SELECT COUNT(DISTINCT request_id) FROM audit_events \
             WHERE rpc = 'GetRecord' AND request_id LIKE 'load-%'",
        )
        .await;
    (granted, distinct)
}

async fn reads_beyond_the_callers_in_flight_cap_are_shed_without_events(app: &TestApp) {
    // Below the default concurrency cap (256), but one caller above its default in-flight
    // cap (`limits.max_in_flight_per_caller`, 64): some calls may be shed, and a shed call
    // must leave no event, as a granted one leaves exactly one.
    let mut granted = 0;
    for answer in concurrent_reads(app, 200).await {
        match answer {
            Ok(()) => granted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "RATE_LIMITED");
            }
        }
    }
    assert!(
        granted >= 64,
        "at least the caller's cap is served: {granted}"
    );
    let (events, distinct) = load_events(app).await;
    assert_eq!(events, granted as i64);
    assert_eq!(
        distinct, granted as i64,
        "one event per granted read, none twice"
    );
    let report = verify(app).await;
    assert!(report.ok(), "{:?}", report.problems);
}

async fn every_granted_read_has_exactly_one_event_under_load(app: &TestApp) {
    // Below the default concurrency cap (256), with the per-caller in-flight cap off (see
    // the two tests below), so no call is shed.
    let reads = 200;
    let granted = concurrent_reads(app, reads)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    assert_eq!(granted, reads);
    let (events, distinct) = load_events(app).await;
    assert_eq!(events, reads as i64);
    assert_eq!(distinct, reads as i64, "one event per read, none twice");
    let report = verify(app).await;
    assert!(report.ok(), "{:?}", report.problems);
}

/// A trail with a few events and a checkpoint, verified intact.
async fn trail(app: &TestApp) -> String {
    let record = create(app, zhang_san()).await;
    for _ in 0..4 {
        get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
            .await
            .unwrap();
    }
    checkpoint(app).await;
    let report = verify(app).await;
    assert!(report.ok(), "{:?}", report.problems);
    // The one introducing the chain at start, and this one.
    assert!(report.events >= 5 && report.checkpoints == 2);
    assert_eq!(report.witnessed, 2);
    // The process's own chain: the reads' events are there on every backend.
    app.vault.audit().chain_id().to_string()
}

async fn an_edited_event_is_detected(app: &TestApp) {
    let chain = trail(app).await;
    app.execute_sql(&format!(
        "UPDATE audit_events SET caller = 'nobody' WHERE chain_id = '{chain}' AND seq = 3"
    ))
    .await;
    assert_eq!(
        verify(app).await.problems,
        [Problem::Altered {
            chain_id: chain,
            seq: 3
        }]
    );
}

async fn a_deleted_event_is_detected(app: &TestApp) {
    let chain = trail(app).await;
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE chain_id = '{chain}' AND seq = 2"
    ))
    .await;
    assert_eq!(
        verify(app).await.problems,
        [Problem::Missing {
            chain_id: chain,
            expected_seq: 2,
            found_seq: 3
        }]
    );
}

async fn reordered_events_are_detected(app: &TestApp) {
    let chain = trail(app).await;
    app.execute_sql(&format!(
        "UPDATE audit_events SET seq = -1 WHERE chain_id = '{chain}' AND seq = 2; \
         UPDATE audit_events SET seq = 2 WHERE chain_id = '{chain}' AND seq = 3; \
         UPDATE audit_events SET seq = 3 WHERE chain_id = '{chain}' AND seq = -1;"
    ))
    .await;
    assert_eq!(
        verify(app).await.problems,
        [Problem::BrokenLink {
            chain_id: chain,
            seq: 2
        }]
    );
}

async fn a_truncated_tail_is_detected(app: &TestApp) {
    let chain = trail(app).await;
    // Cut the tail and move the head back, as someone covering their tracks would.
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE chain_id = '{chain}' AND seq > 3; \
         UPDATE audit_chains SET head_seq = 3, \
           head_hash = (SELECT hash FROM audit_events WHERE chain_id = '{chain}' AND seq = 3) \
         WHERE chain_id = '{chain}';"
    ))
    .await;
    let problems = verify(app).await.problems;
    assert!(
        matches!(
            problems.as_slice(),
            [Problem::Truncated { chain_id, last_seq: 3, .. }] if *chain_id == chain
        ),
        "{problems:?}"
    );
}

async fn a_forged_checkpoint_is_detected(app: &TestApp) {
    trail(app).await;
    app.execute_sql("UPDATE audit_checkpoints SET created_at = created_at + 1 WHERE id = (SELECT MAX(id) FROM audit_checkpoints)")
        .await;
    let problems = verify(app).await.problems;
    assert!(
        matches!(problems.first(), Some(Problem::BadSignature { .. })),
        "{problems:?}"
    );
}

async fn verification_is_served_over_grpc_to_audit_readers_only(app: &TestApp) {
    trail(app).await;
    let mut client = app.audit_client().await;
    let report = client
        .verify_audit_chain(authed(COMPLIANCE.token, VerifyAuditChainRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{:?}", report.problems);
    assert!(report.events >= 5);
    let status = client
        .verify_audit_chain(authed(CLAIMS.token, VerifyAuditChainRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "OPERATION_NOT_GRANTED");
}

async fn disclosures_list_lawful_releases_and_survive_deletion(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    let basis = "(2026)桂0102刑初88号 协助查询通知书";
    get(
        app,
        COMPLIANCE.token,
        &record.record_id,
        "legal-compliance",
        basis,
    )
    .await
    .unwrap();
    app.client()
        .await
        .delete_record(authed(
            CLAIMS.token,
            DeleteRecordRequest {
                record_id: record.record_id.clone(),
                reason: "closed".into(),
            },
        ))
        .await
        .unwrap();
    let mut client = app.audit_client().await;
    let disclosures = client
        .list_disclosures(authed(
            COMPLIANCE.token,
            ListDisclosuresRequest {
                record_id: record.record_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .disclosures;
    assert_eq!(
        disclosures.len(),
        1,
        "only the legal-compliance read is a disclosure"
    );
    let disclosure = &disclosures[0];
    assert_eq!(disclosure.caller, "compliance");
    assert_eq!(disclosure.purpose, "legal-compliance");
    assert_eq!(disclosure.basis, basis);
    assert_eq!(disclosure.fields.len(), 10);

    // The person's whole trail outlives the record, newest first.
    let events = client
        .list_audit_events(authed(
            COMPLIANCE.token,
            ListAuditEventsRequest {
                record_id: record.record_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let rpcs: Vec<&str> = events.iter().map(|e| e.rpc.as_str()).collect();
    assert_eq!(
        rpcs,
        [
            "ListDisclosures",
            "DeleteRecord",
            "GetRecord",
            "GetRecord",
            "CreateRecord"
        ]
    );
    assert!(
        events.iter().all(|e| !e.peer.is_empty()),
        "network address kept"
    );
}

async fn listing_pages_through_the_trail(app: &TestApp) {
    let record = create(app, zhang_san()).await;
    for _ in 0..7 {
        get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
            .await
            .unwrap();
    }
    let mut client = app.audit_client().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_events(authed(
                COMPLIANCE.token,
                ListAuditEventsRequest {
                    caller: "claims".into(),
                    purpose: "service-delivery".into(),
                    page_size: 3,
                    page_token: page_token.clone(),
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
        page_token = page.next_page_token;
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (7, 7));

    let status = client
        .list_audit_events(authed(
            COMPLIANCE.token,
            ListAuditEventsRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["page_token"]);
}

fn synthetic_event(chain_id: &str, i: usize, caller: &str, occurred_at: i64) -> AuditEvent {
    AuditEvent {
        event_id: format!("evt_synthetic_{i}"),
        occurred_at,
        chain_id: chain_id.to_owned(),
        caller: caller.to_owned(),
        peer: Some("10.0.0.1:5000".into()),
        rpc: "GetRecord".into(),
        record_ids: vec![format!("rec_{i:026}")],
        purpose: Some("service-delivery".into()),
        justification: None,
        released: vec![("name".into(), "PLAIN".into())],
        outcome: "OK".into(),
        reason: None,
        request_id: None,
        trace_id: None,
    }
}

async fn the_breach_question_is_answered_from_an_index(app: &TestApp) {
    // A large trail: 30 000 releases by 30 callers over 30 000 seconds.
    let store = app.store().await;
    let chain = "chn_breachtestaaaaaa";
    store
        .register_chain(
            &pdvault::domain::ids::ChainId::parse("chain_id", chain).unwrap(),
            0,
            &pdvault::audit::genesis(chain),
        )
        .await
        .unwrap();
    let second = 1_000_000i64;
    for batch in 0..30 {
        let events: Vec<AuditEvent> = (batch * 1000..(batch + 1) * 1000)
            .map(|i| synthetic_event(chain, i, &format!("svc-{}", i % 30), i as i64 * second))
            .collect();
        store.append_audit(&events).await.unwrap();
    }
    let analyze = match app.backend {
        Backend::Sqlite => "ANALYZE",
        Backend::Postgres => "ANALYZE audit_events",
    };
    app.execute_sql(analyze).await;

    // svc-7 between t=1000s and t=2000s: i in [1000, 2000) with i % 30 == 7.
    let query = pdvault::store::AuditQuery {
        caller: Some("svc-7".into()),
        plaintext_only: true,
        from: Some(1000 * second),
        to: Some(2000 * second),
        limit: 1000,
        ..Default::default()
    };
    let found = store.list_audit_events(&query).await.unwrap();
    let expected = (1000..2000).filter(|i| i % 30 == 7).count();
    assert_eq!(found.len(), expected);
    assert!(found.iter().all(|e| e.event.caller == "svc-7"));

    let plan = app
        .query_plan(&format!(
            "SELECT event_id FROM audit_events WHERE caller = 'svc-7' AND plaintext = 1 \
             AND occurred_at >= {} AND occurred_at < {} \
             AND (occurred_at < {} OR (occurred_at = {} AND event_id < '')) \
             ORDER BY occurred_at DESC, event_id DESC LIMIT 1000",
            1000 * second,
            2000 * second,
            i64::MAX,
            i64::MAX
        ))
        .await;
    // PostgreSQL has a partial index for it; SQLite reads the range of its one time index
    // (migration 0010).
    let index = match app.backend {
        Backend::Sqlite => "USING INDEX audit_events_time",
        Backend::Postgres => "audit_events_plaintext_releases",
    };
    assert!(
        plan.contains(index),
        "the breach query must use its index, not scan:\n{plan}"
    );
}

async fn retention_removes_old_segments_and_verification_still_passes(app: &TestApp) {
    let chain = trail(app).await;
    let store = app.store().await;
    let keys = app.keyring();
    let before = app.count("SELECT COUNT(*) FROM audit_events").await;
    // Everything checkpointed so far is older than a cut-off in the future.
    let far_future = chrono::Utc::now().timestamp_micros() * 2;
    let removed = pdvault::audit::expire(store.as_ref(), keys.audit_signing(), far_future, 1)
        .await
        .unwrap();
    assert!(removed >= 5, "removed {removed}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM audit_events").await,
        before - removed as i64
    );
    // New events continue the chain after the marker.
    let record = create(
        app,
        pdvault::proto::Identity {
            name: "王五".into(),
            ..Default::default()
        },
    )
    .await;
    get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
        .await
        .unwrap();
    let report = verify(app).await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_expiry_markers WHERE chain_id = '{chain}'"
        ))
        .await,
        1
    );
    // A forged marker (moved further along) is caught.
    app.execute_sql("UPDATE audit_expiry_markers SET up_to_seq = up_to_seq + 1")
        .await;
    assert!(!verify(app).await.ok());
}

/// A batch whose size is no power of two is written in several multi-row statements; the
/// chain must link across the statement boundaries exactly as one row at a time would.
async fn a_large_batch_links_across_statement_chunks(app: &TestApp) {
    let store = app.store().await;
    let chain = "chn_batchchunksaaaaa";
    store
        .register_chain(
            &pdvault::domain::ids::ChainId::parse("chain_id", chain).unwrap(),
            0,
            &pdvault::audit::genesis(chain),
        )
        .await
        .unwrap();
    let event = |i: usize| AuditEvent {
        event_id: format!("evt_chunk_{i}"),
        occurred_at: i as i64,
        chain_id: chain.to_owned(),
        caller: "test".into(),
        peer: None,
        rpc: "GetRecord".into(),
        record_ids: vec![format!("rec_{i}")],
        purpose: Some("service-delivery".into()),
        justification: None,
        released: vec![("name".into(), "PLAIN".into())],
        outcome: "OK".into(),
        reason: None,
        request_id: None,
        trace_id: None,
    };
    // 301 = 128 + 128 + 32 + 8 + 4 + 1, then a second batch continuing the chain.
    let first: Vec<AuditEvent> = (0..301).map(event).collect();
    store.append_audit(&first).await.unwrap();
    let second: Vec<AuditEvent> = (301..304).map(event).collect();
    store.append_audit(&second).await.unwrap();
    let stored = store.chain_events(chain, 0, 1000).await.unwrap();
    let seqs: Vec<i64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=304).collect::<Vec<i64>>());
    let ids: Vec<&str> = stored.iter().map(|e| e.event.event_id.as_str()).collect();
    assert_eq!(
        ids[127..130],
        ["evt_chunk_127", "evt_chunk_128", "evt_chunk_129"]
    );
    // The chain links and hashes throughout; the one thing verification holds against it
    // is that no vault's checkpoint vouches for it (this test wrote it, not a vault).
    let report = verify(app).await;
    assert_eq!(
        report.problems,
        [Problem::Unvouched {
            chain_id: chain.into()
        }]
    );
}

/// Creates arriving together share one group commit on SQLite, each under its own
/// savepoint: a duplicate among them fails alone, every other create and every audit event
/// commits, and the chain they were linked into still verifies.
async fn concurrent_creates_commit_together_and_a_duplicate_fails_alone(app: &TestApp) {
    let distinct = (0..24).map(|i| Identity {
        id_number: resident_id(&format!("45010219800101{i:03}")),
        ..li_si()
    });
    // Four creates of one document under different names: exactly one may win.
    let same_document = (0..4).map(|i| Identity {
        name: format!("张{}", ["一", "二", "三", "四"][i]),
        ..zhang_san()
    });
    let calls = distinct.chain(same_document).map(|identity| async move {
        let mut client = app.client().await;
        client
            .create_record(authed(CLAIMS.token, create_request(identity, "")))
            .await
    });
    let outcomes = join_all(calls.map(Box::pin).collect()).await;
    let (created, refused): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    assert_eq!(
        created.len(),
        25,
        "24 distinct identities and one of the four duplicates"
    );
    assert_eq!(refused.len(), 3);
    for status in refused.iter().map(|r| r.as_ref().unwrap_err()) {
        assert_eq!(reason(status), "DUPLICATE_IDENTITY", "{status:?}");
    }
    for record in created.into_iter().map(|r| r.unwrap().into_inner()) {
        get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
            .await
            .expect("every acknowledged create is readable");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM records").await, 25);
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'CreateRecord' AND outcome = 'OK'"
        )
        .await,
        25
    );
    let problems = verify(app).await.problems;
    assert!(problems.is_empty(), "{problems:?}");
}

for_each_backend!(
    a_large_batch_links_across_statement_chunks,
    concurrent_creates_commit_together_and_a_duplicate_fails_alone,
    nothing_is_released_when_the_audit_store_is_unwritable,
    reads_beyond_the_callers_in_flight_cap_are_shed_without_events,
    an_edited_event_is_detected,
    a_deleted_event_is_detected,
    reordered_events_are_detected,
    a_truncated_tail_is_detected,
    a_forged_checkpoint_is_detected,
    verification_is_served_over_grpc_to_audit_readers_only,
    disclosures_list_lawful_releases_and_survive_deletion,
    listing_pages_through_the_trail,
    the_breach_question_is_answered_from_an_index,
    retention_removes_old_segments_and_verification_still_passes,
);

/// 200 concurrent reads of one caller, every one served: the in-flight cap
/// (`limits.max_in_flight_per_caller`) is off so that load, not the cap, is what is tested.
async fn uncapped(backend: Backend) -> Option<TestApp> {
    TestApp::spawn_with(backend, |config| config.limits.max_in_flight_per_caller = 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_granted_read_has_exactly_one_event_under_load_sqlite() {
    if let Some(app) = uncapped(Backend::Sqlite).await {
        every_granted_read_has_exactly_one_event_under_load(&app).await;
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_granted_read_has_exactly_one_event_under_load_postgres() {
    if let Some(app) = uncapped(Backend::Postgres).await {
        every_granted_read_has_exactly_one_event_under_load(&app).await;
        app.stop().await;
    }
}
