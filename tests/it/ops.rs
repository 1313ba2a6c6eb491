//! Operations behaviour of the in-process server: health, reflection, request ids, limits,
//! metrics, the admin reload RPC (what it applies, what it refuses, never minting a
//! credential), private files, the read-only `pdvault audit verify`, and rewrap jobs whose
//! server died.

use crate::support::cli::cli;
use crate::support::fixtures::reason;
use crate::support::proxy::{ProxyState, TcpProxy};
use crate::support::{ANALYTICS, Backend, CLAIMS, LOGIN, TestApp, authed};
use pdvault::app::reload::ConfigSource;
use pdvault::proto::admin_client::AdminClient;
use pdvault::proto::{
    CheckAccountRequest, CreateRecordRequest, GetRecordRequest, Identity, ReloadPolicyRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_types::StatusExt;

const UNKNOWN_RECORD: &str = "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa";

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
    let mut health = HealthClient::new(app.channel().await);
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
    let mut client = ServerReflectionClient::new(app.channel().await);
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
    // The recorder is the process's: other modules' vaults release under purposes whose
    // names contain a caller's name (`business-analytics`), which this test must not find.
    if !crate::support::own_process::run_here(
        module_path!(),
        "metrics_count_calls_releases_and_denials_without_identity",
    ) {
        return;
    }
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

/// The running configuration as a file, with the analytics caller granted `purposes`.
fn reload_file(running: &pdvault::config::Config, granted_to_analytics: &[&str]) -> String {
    let mut config = running.clone();
    for caller in &mut config.callers {
        if caller.name == ANALYTICS.name {
            caller.purposes = granted_to_analytics.iter().map(|p| p.to_string()).collect();
        }
    }
    toml::to_string(&config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_applies_new_grants_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pdvault.toml");
    let app = TestApp::spawn_full(
        Backend::Sqlite,
        |_| {},
        |config| {
            std::fs::write(&file, reload_file(config, &["audit-research"])).unwrap();
            Some(ConfigSource {
                file: Some(file.clone()),
                flags: Default::default(),
            })
        },
    )
    .await
    .unwrap();
    let write =
        |purposes: &[&str]| std::fs::write(&file, reload_file(&app.config, purposes)).unwrap();
    let mut admin = AdminClient::new(app.channel().await);
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
    write(&["service-delivery", "marketing"]);
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

    write(&["service-delivery"]);
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
    use crate::support::fixtures::{create, get, zhang_san};
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

/// Issue 11 E21: a reload applies the policy (callers, purposes, account rules) and nothing
/// else. A file that changes
/// what only a restart can change is refused naming the key; an emptied file is refused
/// rather than read as "all defaults"; and a missing administrator token is never minted
/// anew. Every refusal leaves the running policy in force.
async fn reload_changes_policy_never_the_service(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pdvault.toml");
    let Some(app) = TestApp::spawn_full(
        backend,
        |_| {},
        |config| {
            std::fs::write(&file, reload_file(config, &["audit-research"])).unwrap();
            Some(ConfigSource {
                file: Some(file.clone()),
                flags: Default::default(),
            })
        },
    )
    .await
    else {
        return;
    };
    let mut admin = AdminClient::new(app.channel().await);
    let mut vault = app.client().await;
    let reload = |admin: &mut AdminClient<Channel>| {
        let mut admin = admin.clone();
        let token = app.admin_token.clone();
        async move {
            admin
                .reload_policy(authed(&token, ReloadPolicyRequest {}))
                .await
        }
    };
    // The same file reloads.
    assert_eq!(reload(&mut admin).await.unwrap().into_inner().generation, 1);

    let changed = |change: &dyn Fn(&mut pdvault::config::Config)| {
        let mut config = app.config.clone();
        change(&mut config);
        toml::to_string(&config).unwrap()
    };
    let other_dir = dir.path().join("elsewhere");
    let fixed: Vec<(String, &str)> = vec![
        (
            changed(&|c| c.listen = "127.0.0.1:1".parse().unwrap()),
            "listen",
        ),
        (changed(&|c| c.data_dir = other_dir.clone()), "data_dir"),
        (
            changed(&|c| c.database.url = Some("sqlite:///tmp/other.db".into())),
            "database.url",
        ),
        (
            changed(&|c| c.keys.keyring_path = Some(other_dir.join("k.json"))),
            "keys.keyring_path",
        ),
        (
            changed(&|c| c.tls.allow_insecure = true),
            "tls.allow_insecure",
        ),
        (changed(&|c| c.admin.enabled = false), "admin.enabled"),
        // Of `limits`, what the listener is built with (the per-call limits reload: see
        // tests/it/transport.rs).
        (
            changed(&|c| c.limits.max_streams_per_connection = 7),
            "limits.max_streams_per_connection",
        ),
        (
            changed(&|c| c.limits.idle_timeout_ms = 7_000),
            "limits.idle_timeout_ms",
        ),
    ];
    for (body, key) in fixed {
        std::fs::write(&file, body).unwrap();
        let status = reload(&mut admin).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{key}: {status:?}");
        assert_eq!(reason(&status), "POLICY_INVALID");
        assert!(
            status.message().contains(&format!("{key}: cannot change")),
            "{key}: {}",
            status.message()
        );
    }
    assert!(!other_dir.exists(), "a refused reload created nothing");

    // An emptied (or comments-only) file would lock every configured caller out and, with
    // the default data_dir, mint an administrator token in ./pdvault-data.
    for body in ["", "# emptied\n\n"] {
        std::fs::write(&file, body).unwrap();
        let status = reload(&mut admin).await.unwrap_err();
        assert!(
            status.message().contains("is empty"),
            "{}",
            status.message()
        );
    }
    // So is a file that drops every caller.
    std::fs::write(&file, changed(&|c| c.callers.clear())).unwrap();
    let status = reload(&mut admin).await.unwrap_err();
    assert!(
        status
            .message()
            .contains("callers: the file configures no caller"),
        "{}",
        status.message()
    );
    let read = authed(
        CLAIMS.token,
        GetRecordRequest {
            record_id: UNKNOWN_RECORD.into(),
            purpose: "service-delivery".into(),
            ..GetRecordRequest::default()
        },
    );
    let status = vault.get_record(read).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "claims still authenticates");

    // The administrator token moved away: a reload refuses instead of minting a new one.
    let token_path = app.config.admin_token_path();
    let moved = dir.path().join("admin.token.moved");
    std::fs::rename(&token_path, &moved).unwrap();
    std::fs::write(&file, reload_file(&app.config, &["service-delivery"])).unwrap();
    let status = reload(&mut admin).await.unwrap_err();
    assert!(
        status.message().contains("admin.token_path") && status.message().contains("never creates"),
        "{}",
        status.message()
    );
    assert!(!token_path.exists(), "no administrator token was minted");
    let status = vault
        .get_record(get_request(ANALYTICS.token, "service-delivery"))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&status),
        "PURPOSE_NOT_GRANTED",
        "the old policy stays"
    );
    std::fs::rename(&moved, &token_path).unwrap();
    let reloaded = reload(&mut admin).await.unwrap().into_inner();
    assert_eq!(reloaded.generation, 2);
    let status = vault
        .get_record(get_request(ANALYTICS.token, "service-delivery"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "the new grant is in force");

    // The account rules are policy too: a new privacy-policy version applies live.
    let record = vault
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "版本".into(),
                    ..Identity::default()
                }),
                policy_version: "2025-01".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let check = || {
        authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: record.record_id.clone(),
            },
        )
    };
    let state = vault.check_account(check()).await.unwrap().into_inner();
    assert!(!state.policy_reconsent_required);
    let mut config = app.config.clone();
    config.privacy_policy.current_version = "2026-01".into();
    for caller in &mut config.callers {
        if caller.name == ANALYTICS.name {
            caller.purposes = vec!["service-delivery".into()];
        }
    }
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    assert_eq!(reload(&mut admin).await.unwrap().into_inner().generation, 3);
    let state = vault.check_account(check()).await.unwrap().into_inner();
    assert!(
        state.policy_reconsent_required,
        "the new version is in force"
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'ReloadPolicy' AND outcome = 'INVALID'"
        )
        .await,
        12
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_policy_never_the_service_on_sqlite() {
    reload_changes_policy_never_the_service(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_policy_never_the_service_on_postgres() {
    reload_changes_policy_never_the_service(Backend::Postgres).await;
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Issue 11 D17: the data directory is 0700 and every file the vault creates in it 0600
/// whatever the umask (the SQLite database, its WAL and SHM were 0644); an existing data
/// directory open to group or others is refused, as the keyring is.
#[cfg(unix)]
async fn data_files_stay_private(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let Some(mut app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut vault = app.client().await;
    vault
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "权限测试".into(),
                    ..Identity::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let data_dir = app.config.data_dir.clone();
    assert_eq!(mode(&data_dir), 0o700);
    let files = files_under(&data_dir);
    if backend == Backend::Sqlite {
        for name in ["pdvault.db", "pdvault.db-wal", "pdvault.db-shm"] {
            assert!(files.contains(&data_dir.join(name)), "{name} in {files:?}");
        }
    }
    for name in ["keyring.json", "admin.token", "audit-signer.json"] {
        assert!(files.contains(&data_dir.join(name)), "{name} in {files:?}");
    }
    for file in &files {
        assert_eq!(
            mode(file) & 0o077,
            0,
            "{} is {:o}",
            file.display(),
            mode(file)
        );
    }
    let config = app.config.clone();
    let sqlite = app.sqlite_path();
    app.halt().await;

    // A database left readable by an older version is closed on the next start.
    if backend == Backend::Sqlite {
        std::fs::set_permissions(&sqlite, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = pdvault::app::open_store(&config).await.unwrap();
        store.close().await;
        assert_eq!(mode(&sqlite), 0o600);
    }

    // An existing data directory open to the group is refused before anything is opened.
    let open_dir = tempfile::tempdir().unwrap();
    let data_dir = open_dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let refused = pdvault::app::Application::build(pdvault::config::Config {
        data_dir: data_dir.clone(),
        database: pdvault::config::DatabaseConfig {
            url: None,
            ..config.database.clone()
        },
        ..config
    })
    .await
    .err()
    .expect("an open data directory is refused");
    let message = refused.to_string();
    assert!(
        message.contains("data_dir") && message.contains("group or others"),
        "{message}"
    );
    assert!(
        std::fs::read_dir(&data_dir).unwrap().next().is_none(),
        "nothing was created"
    );
    app.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_stay_private_on_sqlite() {
    data_files_stay_private(Backend::Sqlite).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_stay_private_on_postgres() {
    data_files_stay_private(Backend::Postgres).await;
}

/// `pdvault <args>` with `config` as its configuration file; (success, stdout + stderr).
async fn pdvault_cli(config: Option<&std::path::Path>, args: &[&str]) -> (bool, String) {
    let mut command = cli("").args(args);
    if let Some(config) = config {
        command = command.arg("--config").arg(config);
    }
    let ran = command.run().await;
    (ran.ok, ran.text())
}

/// Issue 11 D18 and E22: `pdvault audit verify` reads and never writes (it ran migrations
/// first), refuses a database that does not exist (a mistyped SQLite path used to create an
/// empty file and "verify" it), and says plainly when there is nothing to verify.
async fn audit_verify_reads_only_what_exists(backend: Backend) {
    let Some(mut app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut vault = app.client().await;
    vault
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    name: "核验".into(),
                    ..Identity::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    app.halt().await;
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("pdvault.toml");
    std::fs::write(&config_file, toml::to_string(&app.config).unwrap()).unwrap();
    let (ok, output) = pdvault_cli(Some(&config_file), &["audit", "verify"]).await;
    assert!(ok, "{output}");
    assert!(output.contains("audit trail verified"), "{output}");

    // Pretend the newest migration is pending: verify must neither apply it (it would fail
    // on the columns that exist) nor record it.
    app.execute_sql("DELETE FROM _sqlx_migrations WHERE version = 9")
        .await;
    let applied = app.count("SELECT COUNT(*) FROM _sqlx_migrations").await;
    let (ok, output) = pdvault_cli(Some(&config_file), &["audit", "verify"]).await;
    assert!(ok, "verify ran a migration: {output}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM _sqlx_migrations").await,
        applied
    );

    // A database that does not exist is refused, and not created.
    let missing = dir.path().join("mistyped.db");
    let mut config = app.config.clone();
    config.database.url = Some(match backend {
        Backend::Sqlite => format!("sqlite://{}", missing.display()),
        Backend::Postgres => {
            let url = app.database_url.clone();
            let (base, _) = url.rsplit_once('/').unwrap();
            format!("{base}/pdvault_no_such_database")
        }
    });
    let mistyped = dir.path().join("mistyped.toml");
    std::fs::write(&mistyped, toml::to_string(&config).unwrap()).unwrap();
    let (ok, output) = pdvault_cli(Some(&mistyped), &["audit", "verify"]).await;
    assert!(!ok, "{output}");
    assert!(output.contains("cannot verify"), "{output}");
    if backend == Backend::Sqlite {
        assert!(output.contains("does not exist"), "{output}");
        assert!(!missing.exists(), "verify created the database file");
    }

    // Chains with every checkpoint gone: said plainly, and not "verified" (no witness here,
    // which would report the deletions on its own).
    app.execute_sql("DELETE FROM audit_checkpoints").await;
    let mut config = app.config.clone();
    config.audit.checkpoint_sink = "stdout".into();
    let unwitnessed = dir.path().join("unwitnessed.toml");
    std::fs::write(&unwitnessed, toml::to_string(&config).unwrap()).unwrap();
    let (ok, output) = pdvault_cli(Some(&unwitnessed), &["audit", "verify"]).await;
    assert!(!ok, "{output}");
    assert!(output.contains("no checkpoints"), "{output}");

    // A database with no trail at all is not "verified".
    if backend == Backend::Sqlite {
        let empty = dir.path().join("empty");
        let mut config = app.config.clone();
        config.data_dir = empty.clone();
        config.database.url = None;
        config.keys.keyring_path = Some(app.config.keyring_path());
        config.keys.create_if_missing = false;
        // No witness either: a witness would name the chains it saw.
        config.audit.checkpoint_sink = "stdout".into();
        let empty_config = dir.path().join("empty.toml");
        std::fs::write(&empty_config, toml::to_string(&config).unwrap()).unwrap();
        let (ok, output) = pdvault_cli(Some(&empty_config), &["migrate"]).await;
        assert!(ok, "{output}");
        let (ok, output) = pdvault_cli(Some(&empty_config), &["audit", "verify"]).await;
        assert!(!ok, "{output}");
        assert!(output.contains("no audit chains"), "{output}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_reads_only_what_exists_on_sqlite() {
    audit_verify_reads_only_what_exists(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_reads_only_what_exists_on_postgres() {
    audit_verify_reads_only_what_exists(Backend::Postgres).await;
}

// Rewrap job ids of the shape the vault issued before ids were time-ordered (`rwj_`, 13 hex
// digits of microseconds, 26 base32 characters): the store refuses any other as corrupt.
const JOB_DEAD: &str = "rwj_0000000000001deaddeaddeaddeaddeaddeadde";
const JOB_SIBLING: &str = "rwj_0000000000002siblingsiblingsiblingsibli";
const JOB_MINE: &str = "rwj_0000000000003minemineminemineminemineme";
const JOB_LEGACY: &str = "rwj_0000000000004legacylegacylegacylegacyle";

fn job_id(raw: &str) -> pdvault::domain::ids::JobId {
    pdvault::domain::ids::JobId::parse("job_id", raw).unwrap()
}

/// Rewrap jobs by id, with their state, as `GetKeyStatus` reports them.
async fn job_states(app: &TestApp) -> std::collections::BTreeMap<String, String> {
    use pdvault::proto::GetKeyStatusRequest;

    let status = app
        .keys_client()
        .await
        .get_key_status(authed(&app.admin_token, GetKeyStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    status
        .rewrap_jobs
        .into_iter()
        .map(|job| (job.job_id, job.state))
        .collect()
}

/// Issue 11 E24: a rewrap job whose server died stayed RUNNING forever. Whichever instance
/// sees its owner gone (lease run out, or its instance restarted as another process) marks
/// it INTERRUPTED, and `GetKeyStatus` / `pdvault keys status` show it.
async fn rewrap_jobs_of_dead_servers_are_interrupted(backend: Backend) {
    use pdvault::store::JobOwner;
    use pdvault::vault::Clock;

    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let store = app.store().await;
    let minute = 60_000_000;
    let now = app.clock.now().timestamp_micros();
    let me = app.vault.job_owner();
    assert!(me.instance.is_some());
    let other = |process: &str| JobOwner {
        instance: Some("sgn_sibling".into()),
        process: process.into(),
    };
    // A sibling that stopped renewing ten minutes ago.
    store
        .start_rewrap_job(
            &job_id(JOB_DEAD),
            1,
            &other("chn_dead"),
            now - 12 * minute,
            now - 10 * minute,
        )
        .await
        .unwrap();
    // A sibling that is alive.
    store
        .start_rewrap_job(
            &job_id(JOB_SIBLING),
            1,
            &other("chn_alive"),
            now,
            now + 10 * minute,
        )
        .await
        .unwrap();
    // This process's own job, alive: it must survive every sweep until this process stops.
    store
        .start_rewrap_job(&job_id(JOB_MINE), 1, &me, now, now + 10 * minute)
        .await
        .unwrap();
    // A job from before leases, last progress long ago.
    app.execute_sql(&format!(
        "INSERT INTO rewrap_jobs (job_id, target_version, state, started_at, updated_at) \
         VALUES ('{JOB_LEGACY}', 1, 'RUNNING', {}, {})",
        now - 30 * minute,
        now - 20 * minute
    ))
    .await;
    let seen = job_states(&app).await;
    assert_eq!(seen[JOB_DEAD], "INTERRUPTED");
    assert_eq!(seen[JOB_LEGACY], "INTERRUPTED");
    assert_eq!(seen[JOB_SIBLING], "RUNNING");
    assert_eq!(seen[JOB_MINE], "RUNNING");

    // `pdvault keys status` shows it too.
    let token_file = app.config.admin_token_path();
    let addr = format!("http://{}", app.addr);
    let (ok, output) = pdvault_cli(
        None,
        &[
            "keys",
            "--addr",
            &addr,
            "--token-file",
            token_file.to_str().unwrap(),
            "status",
        ],
    )
    .await;
    assert!(ok, "{output}");
    assert!(
        output
            .lines()
            .any(|line| line.contains(JOB_DEAD) && line.contains("INTERRUPTED")),
        "{output}"
    );

    // This instance dies with its job running and starts again: its new process sees that
    // the job's process is gone, at once, without waiting for the lease.
    let app = app.restart().await;
    let seen = job_states(&app).await;
    assert_eq!(seen[JOB_MINE], "INTERRUPTED");
    assert_eq!(seen[JOB_SIBLING], "RUNNING");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_jobs_of_dead_servers_are_interrupted_on_sqlite() {
    rewrap_jobs_of_dead_servers_are_interrupted(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_jobs_of_dead_servers_are_interrupted_on_postgres() {
    rewrap_jobs_of_dead_servers_are_interrupted(Backend::Postgres).await;
}

/// Issue 11 E24: `pdvault purge --help` named `keys.rotate`, the wrong grant.
#[tokio::test]
async fn purge_help_names_its_grant() {
    let (ok, output) = pdvault_cli(None, &["purge", "--help"]).await;
    assert!(ok, "{output}");
    assert!(output.contains("records.purge"), "{output}");
    assert!(!output.contains("keys.rotate"), "{output}");
}

/// A SQLite database made by the release before the store ran entirely on rusqlite (its
/// migrations applied by sqlx's migrator, which records them in `_sqlx_migrations`), with two
/// records, an audit chain and a checkpoint (`tests/fixtures/sqlite-v0.1/`): this build
/// adopts it as it is, applies no migration a second time, opens the records and verifies
/// the trail against the fixture's witness file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_sqlx_release_is_adopted() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sqlite-v0.1");
    let ids = std::fs::read_to_string(fixture.join("records.txt")).unwrap();
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 2);
    let migrations = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"),
    )
    .unwrap()
    .count() as i64;

    let app = TestApp::adopt(&fixture.join("dir")).await;
    // Every migration of this build was applied once, by the earlier release (applying one
    // again would fail on the tables it creates, and the vault would not start).
    let recorded = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success = 1";
    assert_eq!(app.count(recorded).await, migrations);
    let history = "SELECT group_concat(version || ' ' || installed_on || ' ' || hex(checksum), ';') \
                   FROM _sqlx_migrations";
    let applied: String = crate::support::sqlite::scalar(&app.database_url, history).await;

    let name = |response: &pdvault::proto::GetRecordResponse| {
        crate::support::fixtures::value(response, "name").0
    };
    let first = crate::support::fixtures::get(&app, CLAIMS.token, ids[0], "service-delivery", "x")
        .await
        .expect("reads the first record");
    assert_eq!(name(&first), "张小三");
    let second = crate::support::fixtures::get(&app, CLAIMS.token, ids[1], "service-delivery", "x")
        .await
        .expect("reads the second record");
    assert_eq!(name(&second), "李四");

    // The earlier release's chain and checkpoint verify, with this process's chain after.
    app.checkpoint().await.unwrap();
    let report = app.verify_with_witness().await;
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.chains >= 2 && report.checkpoints >= 2, "{report:?}");

    // Started again, it still applies nothing and rewrites no record of what it applied.
    let app = app.restart().await;
    let again: String = crate::support::sqlite::scalar(&app.database_url, history).await;
    assert_eq!(again, applied);
    app.stop().await;
}
