//! The audit trail against its most likely adversary: someone with write access to the
//! database and no keyring. Each attack edits the database directly with SQL, as a database
//! administrator would, on SQLite and on PostgreSQL, and is then detected by an outside
//! verifier holding only the public key and the witness file (the real `pdvault audit
//! verify --public-key --checkpoints` process, run where no keyring exists), while the
//! running instance refuses to sign on top of the forgery and raises its alarm.
//!
//! Where the attack leaves the database consistent in itself, the tests also show that
//! verifying the database alone passes: that is what the witness file is for.

use std::path::Path;
use std::time::Duration;

use crate::support::cli::{Ran, cli};
use crate::support::fixtures::*;
use crate::support::{Backend, CLAIMS, COMPLIANCE, TestApp, authed};
use pdvault::audit::{AuditEvent, CheckpointError, Problem, Refusal, StoredEvent, VerifyReport};
use pdvault::proto::VerifyAuditChainRequest;

/// The vault's own chain after four checkpoints: the one introducing it at start (head 0),
/// then heads 3, 6 and 9 (a create and eight reads; nine reads where the create's event
/// goes to another of the process's chains, as on PostgreSQL). Returns the chain id.
async fn history(app: &TestApp) -> String {
    let record = create(app, zhang_san()).await;
    let create_on_own_chain = app.vault.audit().chains().len() == 1;
    for round in 0..3 {
        let reads = if round == 0 && create_on_own_chain {
            2
        } else {
            3
        };
        for _ in 0..reads {
            get(app, CLAIMS.token, &record.record_id, "service-delivery", "")
                .await
                .unwrap();
        }
        app.checkpoint().await.unwrap();
    }
    let chain = app.vault.audit().chain_id().to_string();
    let report = outside_report(app).await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.witnessed, 4);
    assert_eq!(head_seq(app, &chain).await, 9);
    chain
}

fn signer(app: &TestApp) -> String {
    app.vault.checkpoint_signer().unwrap().signer().to_string()
}

async fn head_seq(app: &TestApp, chain: &str) -> i64 {
    app.count(&format!(
        "SELECT head_seq FROM audit_chains WHERE chain_id = '{chain}'"
    ))
    .await
}

/// A byte string as a SQL literal of the backend.
fn blob(app: &TestApp, bytes: &[u8]) -> String {
    let hex = data_encoding::HEXLOWER.encode(bytes);
    match app.backend {
        Backend::Sqlite => format!("X'{hex}'"),
        Backend::Postgres => format!("'\\x{hex}'::bytea"),
    }
}

/// Verification with the public key and the witness file only, in process, for the exact
/// problems.
async fn outside_report(app: &TestApp) -> VerifyReport {
    app.verify_with_witness().await
}

/// Verification of the database alone (no witness file), with the public key.
async fn database_only_report(app: &TestApp) -> VerifyReport {
    pdvault::audit::verify_with(
        app.store().await.as_ref(),
        &app.keyring().audit_signing().public_key(),
        None,
    )
    .await
    .unwrap()
}

/// `pdvault audit verify --public-key HEX --checkpoints FILE --database-url URL`, run in an
/// empty directory with no configuration: no keyring exists where it could look for one.
async fn outside_verifier(app: &TestApp) -> (bool, String) {
    let public = app.keyring().audit_signing().public_key_hex();
    let empty = tempfile::tempdir().unwrap();
    let ran = cli("audit verify --database-url")
        .arg(&app.database_url)
        .arg("--public-key")
        .arg(&public)
        .arg("--checkpoints")
        .arg(app.witness_path())
        .current_dir(empty.path())
        .run()
        .await;
    assert!(
        !Path::new(&empty.path().join("pdvault-data")).exists(),
        "the verifier created nothing"
    );
    (ran.ok, ran.text())
}

/// Detected by the outside verifier, in process and as the real command.
async fn assert_detected(app: &TestApp, expected: &[&dyn Fn(&Problem) -> bool]) {
    let report = outside_report(app).await;
    for (i, matches) in expected.iter().enumerate() {
        assert!(
            report.problems.iter().any(matches),
            "expected problem #{i} missing: {:?}",
            report.problems
        );
    }
    let (passed, output) = outside_verifier(app).await;
    assert!(
        !passed,
        "the outside verifier passed a forged trail:\n{output}"
    );
    assert!(output.contains("PROBLEM"), "{output}");
}

/// The instance refuses to sign on top of the forgery.
async fn assert_signer_refuses(app: &TestApp, expected: impl Fn(&Refusal) -> bool) {
    match app.checkpoint().await {
        Err(CheckpointError::Refused(refusal)) => {
            assert!(expected(&refusal), "unexpected refusal: {refusal}")
        }
        other => panic!("the signer signed on top of a forgery: {other:?}"),
    }
    let health = app.vault.checkpoint_signer().unwrap().health();
    assert!(health.alarm.is_some() && !health.ok(), "{health:?}");
}

async fn events(app: &TestApp, chain: &str) -> Vec<StoredEvent> {
    app.store()
        .await
        .chain_events(chain, 0, 1000)
        .await
        .unwrap()
}

/// Rewrites `events` (in order) to follow `prev` from `first_seq` on, hashes recomputed
/// exactly as the vault computes them, and moves the chain's head to the last: what a
/// database administrator with the source code can do.
async fn relink(app: &TestApp, chain: &str, events: &[StoredEvent], first_seq: i64, prev: &[u8]) {
    let mut prev = prev.to_vec();
    let mut sql = String::new();
    for (i, stored) in events.iter().enumerate() {
        let seq = first_seq + i as i64;
        let hash = pdvault::audit::link(&stored.event, seq, &prev).to_vec();
        sql.push_str(&format!(
            "UPDATE audit_events SET seq = {seq}, prev_hash = {}, hash = {} WHERE event_id = '{}';\n",
            blob(app, &prev),
            blob(app, &hash),
            stored.event.event_id
        ));
        prev = hash;
    }
    let last = first_seq + events.len() as i64 - 1;
    sql.push_str(&format!(
        "UPDATE audit_chains SET head_seq = {last}, head_hash = {} WHERE chain_id = '{chain}';",
        blob(app, &prev)
    ));
    app.execute_sql(&sql).await;
}

async fn cutting_a_chain_back_to_a_signed_head_and_deleting_later_checkpoints_is_detected(
    app: &TestApp,
) {
    let chain = history(app).await;
    let signer = signer(app);
    // Back to checkpoint 2's head (event 3); checkpoints 3 and 4 go with the events.
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE chain_id = '{chain}' AND seq > 3; \
         UPDATE audit_chains SET head_seq = 3, \
           head_hash = (SELECT hash FROM audit_events WHERE chain_id = '{chain}' AND seq = 3) \
         WHERE chain_id = '{chain}'; \
         DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter > 2;"
    ))
    .await;
    // The database agrees with itself: without the witness the cut is invisible.
    let alone = database_only_report(app).await;
    assert!(alone.ok(), "{:?}", alone.problems);

    assert_detected(
        app,
        &[
            &|p| matches!(p, Problem::CheckpointMissing { counter: 3, .. }),
            &|p| matches!(p, Problem::Truncated { chain_id, last_seq: 3, .. } if *chain_id == chain),
        ],
    )
    .await;
    assert_signer_refuses(app, |r| {
        matches!(
            r,
            Refusal::CheckpointsRemoved {
                signed: 4,
                found: 2
            }
        )
    })
    .await;
}

async fn removing_one_event_and_rehashing_the_rest_is_detected(app: &TestApp) {
    let chain = history(app).await;
    let signer = signer(app);
    // Event 5 goes; 6..9 become 5..8 with hashes recomputed after it; the checkpoints that
    // saw the old events (3 and 4) go too.
    let before = events(app, &chain).await;
    let removed = before[4].event.event_id.clone();
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE event_id = '{removed}'; \
         DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter > 2;"
    ))
    .await;
    relink(app, &chain, &before[5..], 5, &before[3].hash).await;
    assert_eq!(head_seq(app, &chain).await, 8);
    let alone = database_only_report(app).await;
    assert!(alone.ok(), "{:?}", alone.problems);

    assert_detected(
        app,
        &[
            &|p| matches!(p, Problem::CheckpointMissing { counter: 3, .. }),
            &|p| matches!(p, Problem::Truncated { chain_id, .. } if *chain_id == chain),
        ],
    )
    .await;
    assert_signer_refuses(app, |r| {
        matches!(
            r,
            Refusal::CheckpointsRemoved {
                signed: 4,
                found: 2
            }
        )
    })
    .await;
}

/// The same rewrite with the checkpoints left in place: even without them removed, the
/// signer, which remembers the head it signed, refuses.
async fn the_signer_refuses_a_chain_rewritten_under_its_signed_head(app: &TestApp) {
    let chain = history(app).await;
    let before = events(app, &chain).await;
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE event_id = '{}'",
        before[4].event.event_id
    ))
    .await;
    relink(app, &chain, &before[5..], 5, &before[3].hash).await;
    assert_signer_refuses(app, |r| {
        matches!(
            r,
            Refusal::ChainCut {
                signed_seq: 9,
                head_seq: 8,
                ..
            }
        )
    })
    .await;
    assert_detected(
        app,
        &[&|p| matches!(p, Problem::Truncated { chain_id, .. } if *chain_id == chain)],
    )
    .await;
}

async fn an_invented_chain_is_detected(app: &TestApp) {
    history(app).await;
    // A chain no vault wrote: compliance reading someone's identity in plaintext, linked
    // and hashed from the genesis exactly as a vault would.
    let chain = "chn_forgedbyadba00000";
    let mut prev = pdvault::audit::genesis(chain).to_vec();
    let mut sql = format!(
        "INSERT INTO audit_chains (chain_id, started_at, head_seq, head_hash) \
         VALUES ('{chain}', 0, 0, {});\n",
        blob(app, &prev)
    );
    for seq in 1..=3i64 {
        let event = AuditEvent {
            event_id: format!("evt_forged_{seq}"),
            occurred_at: 1_780_000_000_000_000 + seq,
            chain_id: chain.into(),
            caller: COMPLIANCE.name.into(),
            peer: Some("10.0.0.9:40000".into()),
            rpc: "GetRecord".into(),
            record_ids: vec!["rec_someone".into()],
            purpose: Some("legal-compliance".into()),
            justification: Some("none".into()),
            released: vec![("name".into(), "PLAIN".into())],
            outcome: "OK".into(),
            reason: None,
            request_id: None,
            trace_id: None,
        };
        let hash = pdvault::audit::link(&event, seq, &prev).to_vec();
        sql.push_str(&format!(
            "INSERT INTO audit_events (chain_id, seq, event_id, occurred_at, caller, peer, rpc, \
               record_id, record_ids, purpose, justification, released, plaintext, outcome, \
               reason, request_id, trace_id, prev_hash, hash) \
             VALUES ('{chain}', {seq}, '{}', {}, '{}', '{}', 'GetRecord', 'rec_someone', '{}', \
               'legal-compliance', 'none', '{}', 1, 'OK', NULL, NULL, NULL, {}, {});\n",
            event.event_id,
            event.occurred_at,
            event.caller,
            event.peer.as_deref().unwrap(),
            serde_json::to_string(&event.record_ids).unwrap(),
            serde_json::to_string(&event.released).unwrap(),
            blob(app, &prev),
            blob(app, &hash),
        ));
        prev = hash;
    }
    sql.push_str(&format!(
        "UPDATE audit_chains SET head_seq = 3, head_hash = {} WHERE chain_id = '{chain}';",
        blob(app, &prev)
    ));
    app.execute_sql(&sql).await;
    // The invented events link and hash like real ones...
    let forged = events(app, chain).await;
    assert_eq!(forged.len(), 3);
    // ...but no checkpoint names their chain, with or without the witness.
    let unvouched = |p: &Problem| matches!(p, Problem::Unvouched { chain_id } if chain_id == chain);
    assert_eq!(
        database_only_report(app).await.problems,
        [Problem::Unvouched {
            chain_id: chain.into()
        }]
    );
    assert_detected(app, &[&unvouched]).await;
    // Nor does this instance vouch for a chain it did not write.
    let checkpoint = app.checkpoint().await.unwrap();
    assert!(checkpoint.heads.iter().all(|h| h.chain_id != chain));
    assert_detected(app, &[&unvouched]).await;
}

async fn deleted_checkpoints_are_detected(app: &TestApp) {
    history(app).await;
    let signer = signer(app);
    // The newest one: the database's chain of checkpoints is still whole.
    app.execute_sql(&format!(
        "DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter = 4"
    ))
    .await;
    let alone = database_only_report(app).await;
    assert!(alone.ok(), "{:?}", alone.problems);
    assert_detected(
        app,
        &[&|p| matches!(p, Problem::CheckpointMissing { counter: 4, .. })],
    )
    .await;
    // One in the middle: a gap, seen even without the witness.
    app.execute_sql(&format!(
        "DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter = 2"
    ))
    .await;
    assert!(
        database_only_report(app)
            .await
            .problems
            .iter()
            .any(|p| matches!(
                p,
                Problem::CheckpointGap {
                    expected: 2,
                    found: 3,
                    ..
                }
            )),
        "a gap in the checkpoints"
    );
    assert_detected(
        app,
        &[&|p| matches!(p, Problem::CheckpointMissing { counter: 2, .. })],
    )
    .await;
    assert_signer_refuses(app, |r| {
        matches!(
            r,
            Refusal::CheckpointsRemoved {
                signed: 4,
                found: 3
            }
        )
    })
    .await;
}

async fn edited_checkpoints_are_detected(app: &TestApp) {
    let chain = history(app).await;
    let signer = signer(app);
    // The newest checkpoint's head moved back to event 6, with its hash: a checkpoint that
    // would agree with a chain cut back there. The signature no longer verifies.
    let hash6 = data_encoding::HEXLOWER.encode(&events(app, &chain).await[5].hash);
    app.execute_sql(&format!(
        "UPDATE audit_checkpoints SET heads = '[{{\"chain_id\":\"{chain}\",\"seq\":6,\"hash\":\"{hash6}\"}}]' \
         WHERE signer_id = '{signer}' AND counter = 4"
    ))
    .await;
    let bad_signature =
        |p: &Problem| matches!(p, Problem::BadSignature { what } if what.contains("checkpoint 4"));
    assert!(
        database_only_report(app)
            .await
            .problems
            .iter()
            .any(bad_signature)
    );
    assert_detected(app, &[&bad_signature]).await;
    assert_signer_refuses(app, |r| {
        matches!(r, Refusal::CheckpointReplaced { counter: 4 })
    })
    .await;

    // Renumbered so that it seems to be the signer's second: its counter is signed too.
    app.execute_sql(&format!(
        "DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter IN (2, 4); \
         UPDATE audit_checkpoints SET counter = 2 WHERE signer_id = '{signer}' AND counter = 3;"
    ))
    .await;
    assert_detected(
        app,
        &[&|p| matches!(p, Problem::BadSignature { what } if what.contains("checkpoint 2"))],
    )
    .await;
}

/// The alarm reaches health (`pdvault.audit.checkpoint`) and metrics.
async fn the_alarm_reaches_health_and_metrics(app: &TestApp) {
    let chain = history(app).await;
    assert_eq!(
        checkpoint_health(app).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE chain_id = '{chain}' AND seq > 6; \
         UPDATE audit_chains SET head_seq = 6, \
           head_hash = (SELECT hash FROM audit_events WHERE chain_id = '{chain}' AND seq = 6) \
         WHERE chain_id = '{chain}';"
    ))
    .await;
    assert_signer_refuses(app, |r| matches!(r, Refusal::ChainCut { .. })).await;
    wait_for_checkpoint_health(
        app,
        tonic_health::pb::health_check_response::ServingStatus::NotServing,
    )
    .await;
    let metrics = scrape(app).await;
    let signer = signer(app);
    for expected in [
        format!("pdvault_audit_signer_alarm{{signer=\"{signer}\"}} 1"),
        format!(
            "pdvault_audit_checkpoint_refusals_total{{signer=\"{signer}\",reason=\"chain_cut\"}} 1"
        ),
    ] {
        assert!(metrics.contains(&expected), "{expected} not in:\n{metrics}");
    }
    // The vault itself keeps serving: the alarm is for operators.
    get_health(app, "").await;
}

/// A stale newest checkpoint (older than twice the interval) shows in health and metrics,
/// and clears when checkpoints resume.
async fn a_stale_checkpoint_is_reported_by_health_and_metrics(app: &TestApp) {
    use tonic_health::pb::health_check_response::ServingStatus;
    wait_for_checkpoint_health(app, ServingStatus::Serving).await;
    block_checkpoint_inserts(app).await;
    wait_for_checkpoint_health(app, ServingStatus::NotServing).await;
    let signer = signer(app);
    let health = app.vault.checkpoint_signer().unwrap().health();
    assert!(health.stale && health.alarm.is_none(), "{health:?}");
    let metrics = scrape(app).await;
    let stale = format!("pdvault_audit_checkpoint_stale{{signer=\"{signer}\"}} 1");
    assert!(metrics.contains(&stale), "{stale} not in:\n{metrics}");
    assert!(metrics.contains(&format!(
        "pdvault_audit_checkpoint_age_seconds{{signer=\"{signer}\"}}"
    )));
    unblock_checkpoint_inserts(app).await;
    wait_for_checkpoint_health(app, ServingStatus::Serving).await;
    // Checkpoints signed while the database refused them were kept and are stored now.
    let report = outside_report(app).await;
    assert!(report.ok(), "{:?}", report.problems);
}

async fn block_checkpoint_inserts(app: &TestApp) {
    let sql = match app.backend {
        Backend::Sqlite => {
            "CREATE TRIGGER block_checkpoints BEFORE INSERT ON audit_checkpoints \
             BEGIN SELECT RAISE(ABORT, 'checkpoints unwritable'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION block_checkpoints() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN RAISE EXCEPTION 'checkpoints unwritable'; END $$; \
             CREATE TRIGGER block_checkpoints BEFORE INSERT ON audit_checkpoints \
               FOR EACH ROW EXECUTE FUNCTION block_checkpoints();"
        }
    };
    app.execute_sql(sql).await;
}

async fn unblock_checkpoint_inserts(app: &TestApp) {
    let sql = match app.backend {
        Backend::Sqlite => "DROP TRIGGER block_checkpoints;",
        Backend::Postgres => {
            "DROP TRIGGER block_checkpoints ON audit_checkpoints; DROP FUNCTION block_checkpoints();"
        }
    };
    app.execute_sql(sql).await;
}

/// A checkpoint signed and witnessed but not stored (the database failed, or the process
/// died in between) is stored by the next one, and the witness's copy matches.
async fn a_checkpoint_witnessed_but_not_stored_is_stored_again(app: &TestApp) {
    history(app).await;
    block_checkpoint_inserts(app).await;
    assert!(matches!(
        app.checkpoint().await,
        Err(CheckpointError::Store(_))
    ));
    let report = outside_report(app).await;
    assert!(
        matches!(
            report.problems.as_slice(),
            [Problem::CheckpointMissing { counter: 5, .. }]
        ),
        "{:?}",
        report.problems
    );
    unblock_checkpoint_inserts(app).await;
    let next = app.checkpoint().await.unwrap();
    assert_eq!(next.link.unwrap().counter, 6);
    let report = outside_report(app).await;
    assert!(report.ok(), "{:?}", report.problems);
    // Checkpoint 5 was witnessed twice, identically; six distinct ones match the database.
    assert_eq!(report.witnessed, 6);
}

/// Appends one more event to `chain` behind the vault's back, a copy of its last one,
/// properly linked, and moves the chain's head to it (as a forger with database access
/// would after the chain was closed).
async fn append_linked_event(app: &TestApp, chain: &str) {
    let before = events(app, chain).await;
    let tail = before.last().unwrap();
    let mut extra = tail.clone();
    extra.event.event_id = "evt_appended_after_close".into();
    let hash = pdvault::audit::link(&extra.event, tail.seq + 1, &tail.hash).to_vec();
    app.execute_sql(&format!(
        "INSERT INTO audit_events (chain_id, seq, event_id, occurred_at, caller, peer, rpc, \
           record_id, record_ids, purpose, justification, released, plaintext, outcome, \
           reason, request_id, trace_id, prev_hash, hash) \
         SELECT chain_id, seq + 1, 'evt_appended_after_close', occurred_at, caller, peer, rpc, \
           record_id, record_ids, purpose, justification, released, plaintext, outcome, reason, \
           request_id, trace_id, {}, {} \
         FROM audit_events WHERE chain_id = '{chain}' AND seq = {}; \
         UPDATE audit_chains SET head_seq = head_seq + 1, head_hash = {} WHERE chain_id = '{chain}';",
        blob(app, &tail.hash),
        blob(app, &hash),
        tail.seq,
        blob(app, &hash),
    ))
    .await;
}

/// A restarted instance closes its previous chain: events appended to it afterwards are
/// detected, and the instance refuses to sign on top of them.
async fn events_appended_to_a_closed_chain_are_detected(app: TestApp) -> TestApp {
    let old_chain = history(&app).await;
    let old_signer = signer(&app);
    let app = app.restart().await;
    assert_eq!(
        signer(&app),
        old_signer,
        "the same instance, the same signer"
    );
    assert_ne!(app.vault.audit().chain_id().as_str(), old_chain);
    let report = outside_report(&app).await;
    assert!(report.ok(), "{:?}", report.problems);
    append_linked_event(&app, &old_chain).await;
    assert_detected(
        &app,
        &[&|p| matches!(p, Problem::AfterClose { chain_id, .. } if *chain_id == old_chain)],
    )
    .await;
    assert_signer_refuses(&app, |r| matches!(r, Refusal::ChainReopened { .. })).await;
    app
}

/// Creates spread their events over the process's write chains (several on PostgreSQL,
/// where each write's transaction holds its chain's head until it commits; one on SQLite),
/// checkpoints meanwhile leave them all open, and the shutdown checkpoint closes every one
/// of them: an event appended afterwards to any of them is detected.
async fn every_chain_of_a_process_is_closed_at_shutdown(app: TestApp) -> TestApp {
    let chains: Vec<String> = app
        .vault
        .audit()
        .chains()
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected_chains = match app.backend {
        Backend::Sqlite => 1,
        Backend::Postgres => 8,
    };
    assert_eq!(chains.len(), expected_chains);
    // A checkpoint between the creates: it must leave the chains still written to open.
    for i in 0..12u32 {
        let mut person = zhang_san();
        person.id_number = resident_id(&format!("11010519900101{:03}", 100 + i));
        person.phone = format!("1390000{:04}", 1000 + i);
        create(&app, person).await;
        if i == 5 {
            app.checkpoint().await.unwrap();
        }
    }
    app.checkpoint().await.unwrap();
    let used = app
        .count(
            "SELECT COUNT(DISTINCT chain_id) FROM audit_events \
             WHERE rpc = 'CreateRecord' AND outcome = 'OK'",
        )
        .await;
    match app.backend {
        Backend::Sqlite => assert_eq!(used, 1),
        Backend::Postgres => assert!(used >= 2, "creates on {used} chain(s)"),
    }
    let last = chains.last().unwrap().clone();
    let app = app.restart().await;
    let report = outside_report(&app).await;
    assert!(report.ok(), "{:?}", report.problems);
    append_linked_event(&app, &last).await;
    assert_detected(
        &app,
        &[&|p| matches!(p, Problem::AfterClose { chain_id, .. } if *chain_id == last)],
    )
    .await;
    app
}

/// Checkpoints in the format before chaining keep verifying, and a database that has only
/// them (a vault upgraded in place) is taken over by the first chained checkpoint, its
/// chains included, even one that no checkpoint ever named.
async fn format_1_checkpoints_keep_verifying_and_an_upgraded_database_is_adopted(
    app: TestApp,
) -> TestApp {
    let chain = history(&app).await;
    let key = app.keyring();
    let legacy = pdvault::audit::write_checkpoint(
        app.store().await.as_ref(),
        key.audit_signing(),
        chrono::Utc::now().timestamp_micros(),
    )
    .await
    .unwrap();
    assert!(legacy.link.is_none());
    let report = outside_report(&app).await;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.checkpoints, 5);
    app.execute_sql("UPDATE audit_checkpoints SET created_at = created_at + 1 WHERE format = 1")
        .await;
    assert!(
        database_only_report(&app)
            .await
            .problems
            .iter()
            .any(|p| matches!(p, Problem::BadSignature { .. }))
    );
    app.execute_sql("UPDATE audit_checkpoints SET created_at = created_at - 1 WHERE format = 1")
        .await;

    // Back to a database as an older version left it: format-1 checkpoints only, one chain
    // that no checkpoint names (its process died before checkpointing), no signer state.
    let orphan = "chn_beforeupgradeaaa";
    app.store()
        .await
        .register_chain(
            &pdvault::domain::ids::ChainId::parse("chain_id", orphan).unwrap(),
            0,
            &pdvault::audit::genesis(orphan),
        )
        .await
        .unwrap();
    let event = AuditEvent {
        event_id: "evt_before_upgrade".into(),
        occurred_at: 1,
        chain_id: orphan.into(),
        caller: "claims".into(),
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
    };
    app.store().await.append_audit(&[event]).await.unwrap();
    let mut app = app;
    app.halt().await;
    // What this version wrote, an older one would not have.
    app.execute_sql("DELETE FROM audit_checkpoints WHERE format = 2")
        .await;
    std::fs::remove_file(app.config.audit_signer_state_path()).unwrap();
    std::fs::remove_file(app.witness_path()).unwrap();
    let unvouched = database_only_report(&app).await;
    assert!(
        unvouched.problems.contains(&Problem::Unvouched {
            chain_id: orphan.into()
        }),
        "{:?}",
        unvouched.problems
    );
    let app = app.restart().await;
    let report = outside_report(&app).await;
    assert!(report.ok(), "{:?}", report.problems);
    let adopted = app.store().await.checkpoints().await.unwrap();
    let first = adopted
        .iter()
        .find(|c| c.link.as_ref().is_some_and(|l| l.counter == 1))
        .unwrap();
    for adopted_chain in [orphan, chain.as_str()] {
        assert!(first.heads.iter().any(|h| h.chain_id == adopted_chain));
    }
    app
}

/// One process signs as one instance: a second one on the same state file is refused.
async fn a_second_process_cannot_sign_as_the_same_instance(app: &TestApp) {
    let refused = pdvault::app::open_signer(&app.config);
    assert!(
        matches!(
            refused,
            Err(pdvault::app::StartupError::Checkpoints(
                CheckpointError::StateLocked { .. }
            ))
        ),
        "{:?}",
        refused.err()
    );
}

/// `VerifyAuditChain` compares with the configured witness file too.
async fn verify_audit_chain_reads_the_configured_witness_file(app: &TestApp) {
    let chain = history(app).await;
    let mut client = app.audit_client().await;
    let response = client
        .verify_audit_chain(authed(COMPLIANCE.token, VerifyAuditChainRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(response.ok, "{:?}", response.problems);
    assert_eq!(response.witnessed_checkpoints, 4);
    let signer = signer(app);
    app.execute_sql(&format!(
        "DELETE FROM audit_events WHERE chain_id = '{chain}' AND seq > 6; \
         UPDATE audit_chains SET head_seq = 6, \
           head_hash = (SELECT hash FROM audit_events WHERE chain_id = '{chain}' AND seq = 6) \
         WHERE chain_id = '{chain}'; \
         DELETE FROM audit_checkpoints WHERE signer_id = '{signer}' AND counter = 4;"
    ))
    .await;
    let response = client
        .verify_audit_chain(authed(COMPLIANCE.token, VerifyAuditChainRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!response.ok);
    assert!(
        response
            .problems
            .iter()
            .any(|p| p.contains("in the witness file but not in the database")),
        "{:?}",
        response.problems
    );
}

async fn checkpoint_health(
    app: &TestApp,
) -> tonic_health::pb::health_check_response::ServingStatus {
    get_health(app, pdvault::app::health::CHECKPOINT_SERVICE).await
}

async fn get_health(
    app: &TestApp,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut client = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

async fn wait_for_checkpoint_health(
    app: &TestApp,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut client = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
        let status = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: pdvault::app::health::CHECKPOINT_SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status());
        if status.as_ref().is_ok_and(|s| *s == wanted) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "checkpoint health never became {wanted:?} (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scrape(app: &TestApp) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.metrics_addr.unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Fast health probes and a metrics listener; checkpoints every second when `fast`.
fn observed(fast: bool) -> impl FnOnce(&mut pdvault::config::Config) {
    move |config| {
        config.health.interval_ms = 50;
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        if fast {
            config.audit.checkpoint_interval_secs = 1;
        }
    }
}

for_each_backend!(
    cutting_a_chain_back_to_a_signed_head_and_deleting_later_checkpoints_is_detected,
    removing_one_event_and_rehashing_the_rest_is_detected,
    the_signer_refuses_a_chain_rewritten_under_its_signed_head,
    an_invented_chain_is_detected,
    deleted_checkpoints_are_detected,
    edited_checkpoints_are_detected,
    a_checkpoint_witnessed_but_not_stored_is_stored_again,
    a_second_process_cannot_sign_as_the_same_instance,
    verify_audit_chain_reads_the_configured_witness_file,
);

/// Scenarios that need their own configuration, or restart the app.
mod configured {
    use super::*;

    type Body = for<'a> fn(&'a TestApp) -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>;
    type Restarting = fn(TestApp) -> std::pin::Pin<Box<dyn Future<Output = TestApp>>>;
    use std::future::Future;

    async fn observed_run(backend: Backend, fast: bool, body: Body) {
        if let Some(app) = TestApp::spawn_with(backend, observed(fast)).await {
            body(&app).await;
            app.stop().await;
        }
    }

    async fn restarting_run(backend: Backend, body: Restarting) {
        if let Some(app) = TestApp::spawn(backend).await {
            body(app).await.stop().await;
        }
    }

    macro_rules! on_both_backends {
        ($($name:ident: $run:expr;)*) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        ($run)(super::Backend::Sqlite).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        ($run)(super::Backend::Postgres).await;
                    }
                )*
            }
        };
    }

    pub(super) async fn alarm(backend: Backend) {
        observed_run(backend, false, |app| {
            Box::pin(the_alarm_reaches_health_and_metrics(app))
        })
        .await;
    }

    pub(super) async fn stale(backend: Backend) {
        observed_run(backend, true, |app| {
            Box::pin(a_stale_checkpoint_is_reported_by_health_and_metrics(app))
        })
        .await;
    }

    pub(super) async fn closed(backend: Backend) {
        restarting_run(backend, |app| {
            Box::pin(events_appended_to_a_closed_chain_are_detected(app))
        })
        .await;
    }

    pub(super) async fn all_closed(backend: Backend) {
        restarting_run(backend, |app| {
            Box::pin(every_chain_of_a_process_is_closed_at_shutdown(app))
        })
        .await;
    }

    pub(super) async fn upgraded(backend: Backend) {
        restarting_run(backend, |app| {
            Box::pin(format_1_checkpoints_keep_verifying_and_an_upgraded_database_is_adopted(app))
        })
        .await;
    }

    on_both_backends! {
        the_alarm_reaches_health_and_metrics: super::alarm;
        a_stale_checkpoint_is_reported_by_health_and_metrics: super::stale;
        events_appended_to_a_closed_chain_are_detected: super::closed;
        every_chain_of_a_process_is_closed_at_shutdown: super::all_closed;
        format_1_checkpoints_keep_verifying_and_an_upgraded_database_is_adopted: super::upgraded;
    }
}

/// The operator's commands on the real binary: `audit public-key` prints what outside
/// verifiers need, `audit checkpoint` is refused while the vault signs and works once it has
/// stopped, and both ways of `audit verify` (the keyring with the configured witness file;
/// the public key with `--checkpoints` and nothing else) pass an untouched trail.
async fn operator_commands(database: Option<&str>) {
    use crate::support::process::ServerProcess;
    let witness_dir = tempfile::tempdir().unwrap();
    let witness = witness_dir.path().join("checkpoints.jsonl");
    let database_section = database
        .map(|url| format!("[database]\nurl = {url:?}\n"))
        .unwrap_or_default();
    let config = format!(
        "{database_section}[audit]\ncheckpoint_sink = {:?}\n",
        witness.display().to_string()
    );
    let mut server = ServerProcess::start(&config, "info").await;
    let config_path = server.config_path();
    let pdvault = |line: &str| cli(line).arg("--config").arg(&config_path).run();
    let text = Ran::text;

    let printed = pdvault("audit public-key").await;
    assert!(printed.ok, "{}", text(&printed));
    let public = printed.stdout.trim().to_owned();
    let keyring = pdvault::keys::Keyring::load(&server.data_dir().join("keyring.json")).unwrap();
    assert_eq!(public, keyring.audit_signing().public_key_hex());

    let refused = pdvault("audit checkpoint").await;
    assert!(!refused.ok);
    assert!(
        text(&refused).contains("in use by another running pdvault process"),
        "{}",
        text(&refused)
    );

    server.signal("TERM");
    assert!(server.wait().await.success());
    let signed = pdvault("audit checkpoint").await;
    assert!(signed.ok, "{}", text(&signed));
    // The introduction at start and the final checkpoint at shutdown came before.
    assert!(
        text(&signed).contains("checkpoint 3 of signer sgn_"),
        "{}",
        text(&signed)
    );

    let verified = pdvault("audit verify").await;
    assert!(verified.ok, "{}", text(&verified));
    assert!(
        text(&verified).contains("3 checkpoint(s) found unchanged"),
        "{}",
        text(&verified)
    );

    let database_url = database.map(str::to_owned).unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            server.data_dir().join("pdvault.db").display()
        )
    });
    let empty = tempfile::tempdir().unwrap();
    let outside = cli("audit verify --database-url")
        .args([&database_url, "--public-key", &public])
        .arg("--checkpoints")
        .arg(&witness)
        .current_dir(empty.path())
        .run()
        .await;
    assert!(outside.ok, "{}", text(&outside));
    assert!(text(&outside).contains("audit trail verified"));

    let bad_key = cli("audit verify --database-url")
        .args([&database_url, "--public-key", "00"])
        .current_dir(empty.path())
        .run()
        .await;
    assert!(!bad_key.ok);
    assert!(
        text(&bad_key).contains("--public-key"),
        "{}",
        text(&bad_key)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_sqlite() {
    operator_commands(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_postgres() {
    let Some(database) = crate::support::PostgresDatabase::create().await else {
        return;
    };
    operator_commands(Some(&database.url())).await;
    database.drop_database().await;
}
