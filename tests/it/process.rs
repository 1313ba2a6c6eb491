//! The real `pdvault serve` process: SIGTERM under load loses no audit event, SIGKILL under
//! a mixed load loses nothing acknowledged (and the trail still verifies), SIGHUP reloads
//! the policy (and a broken or emptied file changes nothing, minting no credential), and a
//! full scenario's logs hold no identity value.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::cli::cli;
use crate::support::fixtures::{reason, resident_id};
use crate::support::process::ServerProcess;
use crate::support::{
    ANALYTICS, CLAIMS, COMPLIANCE, PostgresDatabase, authed, callers_toml, connect,
};
use pdvault::proto::vault_client::VaultClient;
use pdvault::proto::{
    self, CreateRecordRequest, DeleteRecordRequest, FindRecordsRequest, GetRecordRequest, Identity,
    UpdateRecordRequest, find_records_request,
};
use sqlx::Connection;
use tonic::Code;
use tonic::transport::Channel;

async fn client(server: &ServerProcess) -> VaultClient<Channel> {
    VaultClient::new(connect(server.addr).await)
}

/// Record ids in the audit trail's CreateRecord events, read straight from the database.
async fn audited_creates(database_url: &str) -> BTreeSet<String> {
    let rows: Vec<String> = if database_url.starts_with("sqlite:") {
        crate::support::sqlite::column(
            database_url,
            "SELECT record_ids FROM audit_events WHERE rpc = 'CreateRecord' AND outcome = 'OK'",
        )
        .await
    } else {
        let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query_scalar(
            "SELECT record_ids FROM audit_events WHERE rpc = 'CreateRecord' AND outcome = 'OK'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    rows.iter()
        .flat_map(|ids| serde_json::from_str::<Vec<String>>(ids).unwrap())
        .collect()
}

/// Clients create records as fast as they can; SIGTERM arrives mid-stream. Every create
/// that was answered OK must have its audit event, and the process must exit 0.
async fn sigterm_under_load_loses_no_audit_event(database: Option<&str>) {
    let database_section = database
        .map(|url| format!("[database]\nurl = {url:?}\n"))
        .unwrap_or_default();
    let config = format!("{database_section}\n{}", callers_toml());
    let mut server = ServerProcess::start(&config, "info").await;
    let database_url = database.map(str::to_owned).unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            server.data_dir().join("pdvault.db").display()
        )
    });
    let answered = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..6 {
        let mut client = client(&server).await;
        let answered = Arc::clone(&answered);
        workers.spawn(async move {
            let mut created = Vec::new();
            let mut refusals = 0;
            // Bounded: the server stops long before this many calls.
            for n in 0..20_000 {
                let request = authed(
                    CLAIMS.token,
                    CreateRecordRequest {
                        identity: Some(Identity {
                            name: "测试员".into(),
                            phone: format!("139{:08}", worker * 100_000 + n),
                            ..Identity::default()
                        }),
                        request_id: String::new(),
                        ..Default::default()
                    },
                );
                match client.create_record(request).await {
                    Ok(response) => {
                        created.push(response.into_inner().record_id);
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        refusals += 1;
                        if refusals > 3 {
                            break;
                        }
                    }
                }
            }
            created
        });
    }
    // Signal only once calls are flowing, so the signal lands under load.
    while answered.load(Ordering::SeqCst) < 60 {
        assert!(
            workers.len() == 6 && workers.try_join_next().is_none(),
            "a client stopped before the signal; server log:\n{}",
            server.logs().join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before_signal = answered.load(Ordering::SeqCst);
    server.signal("TERM");
    let mut created = Vec::new();
    while let Some(ids) = workers.join_next().await {
        created.extend(ids.unwrap());
    }
    let status = server.wait().await;
    assert!(status.success(), "exit status {status:?}");
    let logs = server.logs().join("\n");
    assert!(logs.contains("pdvault stopped"), "{logs}");
    assert!(created.len() >= before_signal);
    let audited = audited_creates(&database_url).await;
    let lost: Vec<_> = created.iter().filter(|id| !audited.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered creates have no audit event: {lost:?}",
        lost.len(),
        created.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_on_sqlite() {
    sigterm_under_load_loses_no_audit_event(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_on_postgres() {
    let Some(database) = PostgresDatabase::create().await else {
        return;
    };
    sigterm_under_load_loses_no_audit_event(Some(&database.url())).await;
    database.drop_database().await;
}

/// Request ids of the GetRecord events that released something, straight from the database.
async fn audited_releases(database_url: &str) -> BTreeSet<String> {
    let sql = "SELECT request_id FROM audit_events \
               WHERE rpc = 'GetRecord' AND outcome = 'OK' AND request_id IS NOT NULL";
    let rows: Vec<String> = if database_url.starts_with("sqlite:") {
        crate::support::sqlite::column(database_url, sql).await
    } else {
        let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
    };
    rows.into_iter().collect()
}

fn create_request(name: &str, phone: String) -> tonic::Request<CreateRecordRequest> {
    let identity = Identity {
        name: name.into(),
        phone,
        ..Identity::default()
    };
    authed(
        CLAIMS.token,
        crate::support::fixtures::create_request(identity, ""),
    )
}

fn read_request(record_id: &str, request_id: &str) -> tonic::Request<GetRecordRequest> {
    let mut request = authed(
        CLAIMS.token,
        GetRecordRequest {
            record_id: record_id.to_owned(),
            purpose: "service-delivery".into(),
            ..GetRecordRequest::default()
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
}

/// Issue 11 acceptance, the crash test: creates and granted reads run at once when the
/// process is SIGKILLed. Restarted on the same data, every create that was answered OK is
/// readable, every read that released something has its event, and `pdvault audit verify`
/// passes.
async fn sigkill_under_mixed_load_loses_nothing_acknowledged(database: Option<&str>) {
    let database_section = database
        .map(|url| format!("[database]\nurl = {url:?}\n"))
        .unwrap_or_default();
    let config = format!("{database_section}\n{}", callers_toml());
    let mut server = ServerProcess::start(&config, "info").await;
    let database_url = database.map(str::to_owned).unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            server.data_dir().join("pdvault.db").display()
        )
    });
    let mut vault = client(&server).await;
    let mut seeded = Vec::new();
    for n in 0..20 {
        let created = vault
            .create_record(create_request("读者", format!("136{n:08}")))
            .await
            .unwrap();
        seeded.push(created.into_inner().record_id);
    }
    let seeded = Arc::new(seeded);
    let created = Arc::new(Mutex::new(Vec::<String>::new()));
    let released = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..6usize {
        let mut client = client(&server).await;
        let (seeded, created, released, answered) = (
            Arc::clone(&seeded),
            Arc::clone(&created),
            Arc::clone(&released),
            Arc::clone(&answered),
        );
        workers.spawn(async move {
            let mut failures = 0;
            // Bounded: the process dies long before this many calls.
            for n in 0..20_000usize {
                let ok = if worker % 2 == 0 {
                    let phone = format!("139{:08}", worker * 1_000_000 + n);
                    match client.create_record(create_request("崩溃", phone)).await {
                        Ok(response) => {
                            created
                                .lock()
                                .unwrap()
                                .push(response.into_inner().record_id);
                            true
                        }
                        Err(_) => false,
                    }
                } else {
                    let request_id = format!("crash-{worker}-{n}");
                    let record = &seeded[n % seeded.len()];
                    match client.get_record(read_request(record, &request_id)).await {
                        Ok(_) => {
                            released.lock().unwrap().push(request_id);
                            true
                        }
                        Err(_) => false,
                    }
                };
                if ok {
                    answered.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures += 1;
                    if failures > 3 {
                        break;
                    }
                }
            }
        });
    }
    // Kill only once both kinds of call are flowing.
    while answered.load(Ordering::SeqCst) < 400
        || created.lock().unwrap().is_empty()
        || released.lock().unwrap().is_empty()
    {
        assert!(
            workers.len() == 6 && workers.try_join_next().is_none(),
            "a client stopped before the kill; server log:\n{}",
            server.logs().join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.signal("KILL");
    let status = server.wait().await;
    assert!(!status.success(), "SIGKILL ends the process: {status:?}");
    while let Some(joined) = workers.join_next().await {
        joined.unwrap();
    }
    let created = created.lock().unwrap().clone();
    let released = released.lock().unwrap().clone();
    assert!(!created.is_empty() && !released.is_empty());

    let server = server.restart().await;
    let audited = audited_releases(&database_url).await;
    let unaudited: Vec<_> = released
        .iter()
        .filter(|id| !audited.contains(*id))
        .collect();
    assert!(
        unaudited.is_empty(),
        "{} of {} answered releases have no audit event: {unaudited:?}",
        unaudited.len(),
        released.len()
    );
    let mut vault = client(&server).await;
    for (n, record_id) in created.iter().enumerate() {
        let read = vault
            .get_record(read_request(record_id, &format!("after-{n}")))
            .await;
        assert!(
            read.is_ok(),
            "acknowledged create {record_id} lost: {read:?}"
        );
    }
    let mut server = server;
    server.signal("TERM");
    assert!(server.wait().await.success());
    let verified = cli("audit verify --config")
        .arg(server.config_path())
        .run()
        .await;
    let text = verified.text();
    assert!(verified.ok, "{text}");
    assert!(text.contains("audit trail verified"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mixed_load_loses_nothing_on_sqlite() {
    sigkill_under_mixed_load_loses_nothing_acknowledged(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_mixed_load_loses_nothing_on_postgres() {
    let Some(database) = PostgresDatabase::create().await else {
        return;
    };
    sigkill_under_mixed_load_loses_nothing_acknowledged(Some(&database.url())).await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_grants_and_keeps_them_on_a_broken_file() {
    let analytics_grants = "purposes = [\"audit-research\", \"business-analytics\"]";
    let config = |analytics: &str| callers_toml().replace(analytics_grants, analytics);
    let mut server = ServerProcess::start(&callers_toml(), "info").await;
    let mut vault = client(&server).await;
    let record = vault
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "孙八".into(),
                    ..Identity::default()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let read = || {
        authed(
            ANALYTICS.token,
            GetRecordRequest {
                record_id: record.record_id.clone(),
                purpose: "service-delivery".into(),
                ..GetRecordRequest::default()
            },
        )
    };
    let status = vault.get_record(read()).await.unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");

    for broken in [
        config("purposes = [\"service-delivery\", \"marketing\"]"),
        "[[callers]]\nname = ".to_owned(),
    ] {
        server.rewrite_config(&broken, "info");
        let from = server.log_count();
        server.signal("HUP");
        let line = server
            .wait_for_log(from, |line| line.contains("policy reload refused"))
            .await;
        assert!(line.contains("callers") || line.contains("TOML"), "{line}");
        let status = vault.get_record(read()).await.unwrap_err();
        assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED", "unchanged policy");
    }

    // Issue 11 E21: an emptied file is refused (it used to lock every caller out and mint
    // an administrator token in ./pdvault-data), and so is a reload with the administrator
    // token moved away (it used to mint a new one).
    std::fs::write(server.config_path(), "").unwrap();
    let from = server.log_count();
    server.signal("HUP");
    let line = server
        .wait_for_log(from, |line| line.contains("policy reload refused"))
        .await;
    assert!(line.contains("is empty"), "{line}");
    assert!(!server.dir.path().join("pdvault-data").exists());
    server.rewrite_config(&callers_toml(), "info");
    let token = server.data_dir().join("admin.token");
    let moved = server.dir.path().join("admin.token.moved");
    std::fs::rename(&token, &moved).unwrap();
    let from = server.log_count();
    server.signal("HUP");
    let line = server
        .wait_for_log(from, |line| line.contains("policy reload refused"))
        .await;
    assert!(line.contains("admin.token_path"), "{line}");
    assert!(!token.exists(), "no administrator token was minted");
    std::fs::rename(&moved, &token).unwrap();
    let status = vault.get_record(read()).await.unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED", "unchanged policy");

    server.rewrite_config(&config("purposes = [\"service-delivery\"]"), "info");
    let from = server.log_count();
    server.signal("HUP");
    server
        .wait_for_log(from, |line| line.contains("policy reloaded"))
        .await;
    let released = vault.get_record(read()).await.unwrap().into_inner();
    assert_eq!(released.fields["name"].value, "孙八");
    server.signal("TERM");
    assert!(server.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_full_scenario_hold_no_identity_value() {
    let mut server = ServerProcess::start(&callers_toml(), "debug,pdvault=trace").await;
    let mut vault = client(&server).await;
    let id_number = resident_id("45010219900307123");
    let identity = Identity {
        name: "张小三".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: id_number.clone(),
        nationality: "CHN".into(),
        phone: "+86 138 1234 5678".into(),
        email: "zhangsan@example.com".into(),
        address: "广西壮族自治区南宁市青秀区民族大道100号".into(),
        postal_code: "530022".into(),
        ..Identity::default()
    };
    let mut request = authed(
        CLAIMS.token,
        crate::support::fixtures::create_request(identity.clone(), "scenario-1"),
    );
    request
        .metadata_mut()
        .insert("x-request-id", "scenario-create".parse().unwrap());
    let record = vault.create_record(request).await.unwrap().into_inner();
    let id = record.record_id.clone();
    for (token, purpose, justification) in [
        (CLAIMS.token, "service-delivery", ""),
        (CLAIMS.token, "customer-support", ""),
        (ANALYTICS.token, "audit-research", ""),
        (COMPLIANCE.token, "legal-compliance", "court order 2026-17"),
        (CLAIMS.token, "legal-compliance", ""),
    ] {
        let _ = vault
            .get_record(authed(
                token,
                GetRecordRequest {
                    record_id: id.clone(),
                    purpose: purpose.into(),
                    justification: justification.into(),
                    fields: vec![],
                },
            ))
            .await;
    }
    // Invalid input is refused without echoing it.
    let status = vault
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    email: "zhangsan-at-example.com".into(),
                    phone: "13812345678999".into(),
                    ..identity.clone()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let found = vault
        .find_records(authed(
            CLAIMS.token,
            FindRecordsRequest {
                purpose: "service-delivery".into(),
                justification: String::new(),
                key: Some(find_records_request::Key::Phone("13812345678".into())),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.record_ids, std::slice::from_ref(&id));
    vault
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: id.clone(),
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
        ))
        .await
        .unwrap();
    vault
        .delete_record(authed(
            CLAIMS.token,
            DeleteRecordRequest {
                record_id: id.clone(),
                reason: "account closed".into(),
            },
        ))
        .await
        .unwrap();
    server.signal("TERM");
    assert!(server.wait().await.success());

    let logs = server.logs().join("\n");
    assert!(
        logs.contains("scenario-create") && logs.contains("call finished"),
        "the calls were logged with their request ids:\n{logs}"
    );
    for secret in [
        "张小三",
        "小三",
        id_number.as_str(),
        &id_number[6..14],
        "13812345678",
        "138 1234",
        "13700001111",
        "zhangsan",
        "民族大道",
        "青秀区",
        "530022",
        "1990-03-07",
        CLAIMS.token,
        ANALYTICS.token,
    ] {
        assert!(!logs.contains(secret), "{secret:?} found in the logs");
    }
}
