//! End-to-end tests of a graceful shutdown: a rewrap job is interrupted between batches and
//! resumes after a restart, the audit events of calls in flight are all committed, the trail
//! verifies afterwards, and the vault is down within its grace period. On both backends.

use std::time::{Duration, Instant};

use crate::support::fixtures::reason;
use crate::support::{Backend, CLAIMS, TestApp, authed};
use pdvault::proto::{
    self, BatchCreateRecordsRequest, CreateRecordRequest, GetRecordRequest, Identity,
    RewrapRecordsRequest, RotateKeyEncryptionKeyRequest,
};
use tonic::Code;

const RECORDS: usize = 200;

fn person(i: usize) -> Identity {
    Identity {
        name: "张三".into(),
        email: format!("person{i}@example.com"),
        ..Identity::default()
    }
}

/// `RECORDS` records, in batches of a hundred; their ids.
async fn create_records(app: &TestApp) -> Vec<String> {
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for start in (0..RECORDS).step_by(100) {
        let requests = (start..(start + 100).min(RECORDS))
            .map(|i| CreateRecordRequest {
                identity: Some(person(i)),
                ..Default::default()
            })
            .collect();
        let results = client
            .batch_create_records(authed(CLAIMS.token, BatchCreateRecordsRequest { requests }))
            .await
            .expect("the batch is accepted")
            .into_inner()
            .results;
        for result in results {
            match result.result {
                Some(proto::batch_create_record_result::Result::Record(record)) => {
                    ids.push(record.record_id)
                }
                other => panic!("an item failed: {other:?}"),
            }
        }
    }
    ids
}

async fn rotate(app: &TestApp) {
    let rotated = app
        .keys_client()
        .await
        .rotate_key_encryption_key(authed(
            &app.admin_token,
            RotateKeyEncryptionKeyRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.created);
}

async fn rewrap_stream(app: &TestApp, batch_size: u32) -> tonic::Streaming<proto::RewrapProgress> {
    app.keys_client()
        .await
        .rewrap_records(authed(
            &app.admin_token,
            RewrapRecordsRequest { batch_size },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn email_of(app: &TestApp, record_id: &str) -> String {
    let response = app
        .client()
        .await
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: record_id.into(),
                purpose: "service-delivery".into(),
                justification: String::new(),
                fields: vec!["email".into()],
            },
        ))
        .await
        .expect("the record reads")
        .into_inner();
    response.fields["email"].value.clone()
}

/// Stops the vault and says how long it took.
async fn halt_timed(app: &mut TestApp) -> Duration {
    let started = Instant::now();
    app.halt().await;
    started.elapsed()
}

fn grace(app: &TestApp) -> Duration {
    Duration::from_millis(app.config.shutdown.grace_period_ms)
}

/// A rewrap job under way when the vault stops is not dropped mid-batch: it stops before its
/// next batch, its row says INTERRUPTED and its counter matches the records it moved, its
/// client is told to run it again, and after a restart the next job moves exactly the rest.
async fn a_shutdown_interrupts_a_rewrap_between_batches(backend: Backend) {
    let Some(mut app) = TestApp::spawn(backend).await else {
        return;
    };
    let ids = create_records(&app).await;
    rotate(&app).await;
    let mut stream = rewrap_stream(&app, 1).await;
    let job_id = loop {
        let progress = stream.message().await.unwrap().expect("the job reports");
        if progress.rewrapped > 0 {
            break progress.job_id;
        }
    };
    // The rest of the stream, read while the vault stops.
    let rest = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(progress)) => assert!(!progress.done, "stopped before the end"),
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    });
    let took = halt_timed(&mut app).await;
    assert!(took < grace(&app), "stopped in {took:?}");
    let ended = rest.await.unwrap().expect("the stream ends with why");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(reason(&ended), "REWRAP_INCOMPLETE");

    let job = format!("job_id = '{job_id}'");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM rewrap_jobs WHERE {job} AND state = 'INTERRUPTED'"
        ))
        .await,
        1,
        "the job's row says it was interrupted"
    );
    let moved = app
        .count("SELECT COUNT(*) FROM records WHERE kek_version = 2")
        .await;
    assert!(0 < moved && moved < RECORDS as i64, "{moved} records moved");
    assert_eq!(
        app.count(&format!("SELECT rewrapped FROM rewrap_jobs WHERE {job}"))
            .await,
        moved,
        "every batch committed with its counter, or not at all"
    );
    // Its summary event was committed before the writer stopped.
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'RewrapRecords' \
             AND reason LIKE '%{job_id}%outcome=ERROR%'"
        ))
        .await,
        1
    );

    let app = app.restart().await;
    let report = app.verify_with_witness().await;
    assert!(report.ok(), "{:?}", report.problems);
    let mut stream = rewrap_stream(&app, 0).await;
    let mut last = None;
    while let Some(progress) = stream.message().await.unwrap() {
        last = Some(progress);
    }
    let last = last.expect("the second job reports");
    assert!(last.done);
    assert_eq!(
        (last.total, last.rewrapped, last.remaining),
        (RECORDS as i64 - moved, RECORDS as i64 - moved, 0),
        "the second job resumed where the records said"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM records WHERE kek_version = 1")
            .await,
        0
    );
    assert_eq!(email_of(&app, &ids[0]).await, "person0@example.com");
    assert_eq!(
        email_of(&app, &ids[RECORDS - 1]).await,
        format!("person{}@example.com", RECORDS - 1)
    );
    app.stop().await;
}

/// Reads in flight when the vault stops: every one that was answered has its event in the
/// trail, every event handed to the writer is committed (none is left queued), the process's
/// chain is closed by the shutdown checkpoint, and the trail verifies after a restart.
async fn audit_events_accepted_before_shutdown_are_committed(backend: Backend) {
    let Some(mut app) = TestApp::spawn(backend).await else {
        return;
    };
    let ids = create_records(&app).await;
    let client = app.client().await;
    let reads: Vec<_> = (0..RECORDS)
        .map(|i| {
            let mut client = client.clone();
            let record_id = ids[i].clone();
            tokio::spawn(async move {
                let mut request = authed(
                    CLAIMS.token,
                    GetRecordRequest {
                        record_id,
                        purpose: "service-delivery".into(),
                        ..Default::default()
                    },
                );
                request
                    .metadata_mut()
                    .insert("x-request-id", format!("drain-{i}").parse().unwrap());
                client.get_record(request).await.map(drop)
            })
        })
        .collect();
    // Straight to the writer too, as a job's events go: accepted, not yet committed.
    let audit = app.vault.audit().clone();
    let chain = audit.chain_id().to_string();
    let direct: Vec<_> = (0..RECORDS)
        .map(|i| {
            let audit = audit.clone();
            let event = operator_event(&app, &chain, i);
            tokio::spawn(async move { audit.record(event).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let took = halt_timed(&mut app).await;
    assert!(took < grace(&app), "stopped in {took:?}");

    // The others were shed, or refused once the vault stopped accepting.
    let mut answered = 0;
    for read in reads {
        if read.await.unwrap().is_ok() {
            answered += 1;
        }
    }
    let granted = app
        .count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'GetRecord' AND outcome = 'OK' \
             AND request_id LIKE 'drain-%'",
        )
        .await;
    assert!(
        granted >= answered,
        "{answered} reads answered, {granted} events"
    );
    let mut accepted = 0;
    for event in direct {
        match event.await.unwrap() {
            Ok(()) => accepted += 1,
            // Offered after the writer closed: refused, so never counted as recorded.
            Err(pdvault::audit::AuditError::Stopped) => {}
            Err(other) => panic!("an accepted event failed: {other}"),
        }
    }
    assert!(accepted > 0, "events were offered before the signal");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE chain_id = '{chain}' AND rpc = 'ShutdownTest'"
        ))
        .await,
        accepted,
        "every event the writer took is committed"
    );

    let app = app.restart().await;
    let report = app.verify_with_witness().await;
    assert!(report.ok(), "{:?}", report.problems);
    app.stop().await;
}

fn operator_event(app: &TestApp, chain: &str, i: usize) -> pdvault::audit::AuditEvent {
    use pdvault::vault::Clock;
    pdvault::audit::AuditEvent {
        event_id: format!("evt_shutdown_{i:04}"),
        occurred_at: app.clock.now().timestamp_micros(),
        chain_id: chain.to_owned(),
        caller: "operator".into(),
        peer: None,
        rpc: "ShutdownTest".into(),
        record_ids: Vec::new(),
        purpose: None,
        justification: None,
        released: Vec::new(),
        outcome: "OK".into(),
        reason: None,
        request_id: None,
        trace_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_shutdown_interrupts_a_rewrap_between_batches() {
    a_shutdown_interrupts_a_rewrap_between_batches(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_shutdown_interrupts_a_rewrap_between_batches() {
    a_shutdown_interrupts_a_rewrap_between_batches(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_events_accepted_before_shutdown_are_committed() {
    audit_events_accepted_before_shutdown_are_committed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_audit_events_accepted_before_shutdown_are_committed() {
    audit_events_accepted_before_shutdown_are_committed(Backend::Postgres).await;
}
