//! Operations behaviour of the in-process server: health, reflection, request ids, limits,
//! metrics and the admin reload RPC.

mod support;

use pdvault::proto::admin_client::AdminClient;
use pdvault::proto::{
    CheckAccountRequest, CreateRecordRequest, GetRecordRequest, Identity, ReloadPolicyRequest,
};
use pdvault::reload::ConfigSource;
use support::fixtures::reason;
use support::proxy::{ProxyState, TcpProxy};
use support::{ANALYTICS, Backend, CLAIMS, LOGIN, TestApp, authed};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_types::StatusExt;

const UNKNOWN_RECORD: &str = "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa";

async fn channel(app: &TestApp) -> Channel {
    app.channel().await
}

fn get_request(token: &str, purpose: &str) -> tonic::Request<GetRecordRequest> {
    authed(
        token,
        GetRecordRequest {
            record_id: UNKNOWN_RECORD.into(),
            purpose: purpose.into(),
            ..GetRecordRequest::default()
        },
    )
}

/// A vault whose PostgreSQL connections go through a proxy the test controls.
async fn spawn_behind_proxy(
    adjust: impl FnOnce(&mut pdvault::config::Config),
) -> Option<(TestApp, TcpProxy)> {
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let app = TestApp::spawn_with(Backend::Postgres, |config| {
        let url = config.database.url.clone().unwrap();
        config.database.url = Some(proxy.rewrite_url(&url));
        config.health.interval_ms = 50;
        config.health.probe_timeout_ms = 1_000;
        adjust(config);
    })
    .await?;
    Some((app, proxy))
}

async fn next_status(stream: &mut tonic::Streaming<HealthCheckResponse>, wanted: ServingStatus) {
    while let Some(message) = stream.next().await {
        if message.unwrap().status() == wanted {
            return;
        }
    }
    panic!("health stream ended before {wanted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres_reachability() {
    let Some((app, proxy)) = spawn_behind_proxy(|_| {}).await else {
        return;
    };
    let mut health = HealthClient::new(channel(&app).await);
    for service in ["", "pdvault.v1.Vault"] {
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        next_status(&mut stream, ServingStatus::Serving).await;
        if service.is_empty() {
            proxy.set(ProxyState::Down);
            next_status(&mut stream, ServingStatus::NotServing).await;
            let checked = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(checked.status(), ServingStatus::NotServing);
            proxy.set(ProxyState::Forward);
            next_status(&mut stream, ServingStatus::Serving).await;
        }
    }
    drop(health);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let mut client = ServerReflectionClient::new(channel(&app).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "pdvault.v1.AccountSecurity",
            "pdvault.v1.Admin",
            "pdvault.v1.Audit",
            "pdvault.v1.KeyManagement",
            "pdvault.v1.Vault"
        ]
    );
    drop(responses);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated_and_audited() {
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let mut client = app.client().await;
    let mut request = authed(
        LOGIN.token,
        CheckAccountRequest {
            record_id: UNKNOWN_RECORD.into(),
        },
    );
    request
        .metadata_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let status = client.check_account(request).await.unwrap_err();
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "trace-42");

    let create = |request_id: Option<&str>| {
        let mut request = authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "王小明".into(),
                    ..Identity::default()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        );
        if let Some(id) = request_id {
            request
                .metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        request
    };
    let first = client.create_record(create(None)).await.unwrap();
    let second = client.create_record(create(None)).await.unwrap();
    let first_id = first
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    let second_id = second
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(first_id.starts_with("req_"), "{first_id}");
    assert_ne!(first_id, second_id);
    // A client id that is not a printable token of at most 128 bytes is refused (issue 11),
    // and the refusal still carries an id of the vault's own to correlate it by.
    let refused = client
        .create_record(create(Some(&"x".repeat(200))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let generated = refused
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(generated.starts_with("req_"), "{generated}");
    let refusal = app
        .count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'CreateRecord' \
             AND request_id = '{generated}' AND reason = 'x-request-id'"
        ))
        .await;
    assert_eq!(refusal, 1, "the refusal is audited under the generated id");
    let audited = app
        .count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'CreateRecord' AND request_id = '{first_id}'"
        ))
        .await;
    assert_eq!(audited, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_rate_limited_each_on_their_own() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.caller_requests_per_minute = 1;
        config.limits.caller_burst = 3;
    })
    .await
    .unwrap();
    let mut client = app.client().await;
    let check = || {
        authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: UNKNOWN_RECORD.into(),
            },
        )
    };
    for _ in 0..3 {
        let status = client.check_account(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let status = client.check_account(check()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    // Another caller's bucket is untouched.
    let status = client
        .get_record(get_request(CLAIMS.token, "service-delivery"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_unavailable() {
    let Some((app, proxy)) = spawn_behind_proxy(|config| {
        config.limits.max_concurrent_requests = 1;
    })
    .await
    else {
        return;
    };
    // Warm the pool so the stall hits a query, not a connect.
    let mut client = app.client().await;
    let status = client
        .get_record(get_request(CLAIMS.token, "service-delivery"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    proxy.set(ProxyState::Stall);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = client.clone();
        calls.spawn(async move {
            client
                .get_record(get_request(CLAIMS.token, "service-delivery"))
                .await
                .unwrap_err()
        });
    }
    // One call holds the only slot, stuck on the database; the other three are shed.
    for _ in 0..3 {
        let status = calls.join_next().await.unwrap().unwrap();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    proxy.set(ProxyState::Forward);
    let status = calls.join_next().await.unwrap().unwrap();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_timeout_fail_with_deadline_exceeded() {
    let Some((app, proxy)) = spawn_behind_proxy(|config| {
        config.limits.request_timeout_ms = 200;
    })
    .await
    else {
        return;
    };
    let mut client = app.client().await;
    proxy.set(ProxyState::Stall);
    let status = client
        .get_record(get_request(CLAIMS.token, "service-delivery"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    proxy.set(ProxyState::Forward);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.max_message_bytes = 1024;
    })
    .await
    .unwrap();
    let mut client = app.client().await;
    let status = client
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    address: "北".repeat(600),
                    ..Identity::default()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Within the message limit, lists longer than there are fields are refused by name.
    let status = client
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: UNKNOWN_RECORD.into(),
                purpose: "service-delivery".into(),
                fields: vec!["name".into(); 11],
                ..GetRecordRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<_> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["fields"]);
    app.stop().await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_releases_and_denials_without_identity() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    .unwrap();
    let mut client = app.client().await;
    let record = client
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "赵六".into(),
                    phone: "13911112222".into(),
                    ..Identity::default()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let read = |token: &str, purpose: &str| {
        authed(
            token,
            GetRecordRequest {
                record_id: record.record_id.clone(),
                purpose: purpose.into(),
                ..GetRecordRequest::default()
            },
        )
    };
    client
        .get_record(read(CLAIMS.token, "customer-support"))
        .await
        .unwrap();
    let status = client
        .get_record(read(ANALYTICS.token, "legal-compliance"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let text = scrape(app.metrics_addr.unwrap()).await;
    for expected in [
        "pdvault_grpc_requests_total{method=\"/pdvault.v1.Vault/CreateRecord\",code=\"Ok\"}",
        "pdvault_grpc_requests_total{method=\"/pdvault.v1.Vault/GetRecord\",code=\"PermissionDenied\"}",
        "pdvault_grpc_request_duration_seconds_bucket{method=\"/pdvault.v1.Vault/GetRecord\",le=\"0.005\"}",
        "pdvault_released_fields_total{purpose=\"customer-support\",level=\"MASKED\"}",
        "pdvault_denials_total{reason=\"PURPOSE_NOT_GRANTED\"}",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    for secret in [
        "赵六",
        "13911112222",
        record.record_id.as_str(),
        CLAIMS.name,
        CLAIMS.token,
        ANALYTICS.name,
    ] {
        assert!(!text.contains(secret), "{secret} in metrics");
    }
    app.stop().await;
}

fn reload_config(granted_to_analytics: &[&str]) -> String {
    let mut callers = support::callers_toml();
    callers = callers.replace(
        "purposes = [\"audit-research\", \"business-analytics\"]",
        &format!("purposes = {granted_to_analytics:?}"),
    );
    callers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_applies_new_grants_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pdvault.toml");
    let write = |body: String, data_dir: &std::path::Path| {
        std::fs::write(&file, format!("data_dir = {data_dir:?}\n{body}")).unwrap();
    };
    let app = TestApp::spawn_full(
        Backend::Sqlite,
        |_| {},
        |config| {
            write(reload_config(&["audit-research"]), &config.data_dir);
            Some(ConfigSource {
                file: Some(file.clone()),
                flags: Default::default(),
            })
        },
    )
    .await
    .unwrap();
    let data_dir = app.data_dir.path().join("data");
    let mut admin = AdminClient::new(channel(&app).await);
    let mut vault = app.client().await;
    let analytics_read = || get_request(ANALYTICS.token, "service-delivery");
    let status = vault.get_record(analytics_read()).await.unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");

    // Only granted callers may reload.
    let status = admin
        .reload_policy(authed(CLAIMS.token, ReloadPolicyRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // A grant of an unknown purpose fails validation: nothing changes.
    write(reload_config(&["service-delivery", "marketing"]), &data_dir);
    let status = admin
        .reload_policy(authed(&app.admin_token, ReloadPolicyRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "POLICY_INVALID");
    assert!(
        status.message().contains("callers[1].purposes"),
        "{status:?}"
    );
    let status = vault.get_record(analytics_read()).await.unwrap_err();
    assert_eq!(reason(&status), "PURPOSE_NOT_GRANTED");

    write(reload_config(&["service-delivery"]), &data_dir);
    let reloaded = admin
        .reload_policy(authed(&app.admin_token, ReloadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reloaded.generation, 1);
    assert!(reloaded.callers.contains(&"analytics".to_owned()));
    // The next call is judged by the new grants: the record is looked for, not refused.
    let status = vault.get_record(analytics_read()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Both attempts are in the audit trail, with who asked.
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'ReloadPolicy' AND caller = 'admin'"
        )
        .await,
        2
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'ReloadPolicy' AND outcome = 'INVALID'"
        )
        .await,
        1
    );
    app.stop().await;
}

/// The audit acceptance with the database really gone: PostgreSQL stopped (the proxy cut),
/// a granted read releases nothing; PostgreSQL back, reads work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_releases_nothing_and_recovers() {
    use support::fixtures::{create, get, zhang_san};
    let Some((app, proxy)) = spawn_behind_proxy(|_| {}).await else {
        return;
    };
    let record = create(&app, zhang_san()).await;
    get(
        &app,
        CLAIMS.token,
        &record.record_id,
        "service-delivery",
        "",
    )
    .await
    .unwrap();
    proxy.set(ProxyState::Down);
    let status = get(
        &app,
        CLAIMS.token,
        &record.record_id,
        "service-delivery",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("张"));
    proxy.set(ProxyState::Forward);
    // The pool reconnects on its own; a bounded number of attempts, no timing asserted.
    let mut recovered = false;
    for _ in 0..50 {
        if get(
            &app,
            CLAIMS.token,
            &record.record_id,
            "service-delivery",
            "",
        )
        .await
        .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "reads work again once the database is back");
    app.stop().await;
}
