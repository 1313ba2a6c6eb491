//! Issue 11, items A5, C10, C11, C12 and D20, and the property test: what a client that
//! speaks raw HTTP/2 (hand-made frames through the `h2` crate) or plain TCP can do to the
//! service, and what it gets back.
//!
//! Every loop is bounded in count and time, on loopback, against the test's own server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::fixtures::*;
use crate::support::{ANALYTICS, Backend, CLAIMS, COMPLIANCE, LOGIN, SECURITY, TestApp, authed};
use bytes::Bytes;
use pdvault::config::Config;
use pdvault::proto::account_security_client::AccountSecurityClient;
use pdvault::proto::admin_client::AdminClient;
use pdvault::proto::audit_client::AuditClient;
use pdvault::proto::key_management_client::KeyManagementClient;
use pdvault::proto::{
    CheckAccountRequest, GetKeyStatusRequest, GetRecordRequest, ListAccountEventsRequest,
    ListAuditEventsRequest, ReloadPolicyRequest,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

const GET_RECORD: &str = "/pdvault.v1.Vault/GetRecord";
const UNKNOWN_RECORD: &str = "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa";

// --- A raw HTTP/2 client -------------------------------------------------------------------

/// An HTTP/2 connection driven by its own task.
struct RawConnection {
    send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    /// SETTINGS_MAX_CONCURRENT_STREAMS as the server advertised it.
    max_streams: usize,
}

/// Connects and waits for the server's SETTINGS.
async fn raw_connect(addr: SocketAddr) -> RawConnection {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut connection = Box::pin(connection);
    // Drive the connection until the server's SETTINGS arrived (the limit leaves its
    // "unlimited" default), then hand it to a task of its own.
    let settled = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(result) = connection.as_mut().poll(cx) {
                panic!("the connection ended during the handshake: {result:?}");
            }
            if connection.max_concurrent_send_streams() != usize::MAX {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        }),
    )
    .await;
    assert!(settled.is_ok(), "the server sent its SETTINGS");
    let max_streams = connection.max_concurrent_send_streams();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    RawConnection {
        send,
        addr,
        max_streams,
    }
}

/// What came back for one raw call.
#[derive(Debug)]
struct Reply {
    http: u16,
    code: Option<Code>,
    reason: String,
    message: String,
}

impl Reply {
    fn is(&self, code: Code, reason: &str) -> bool {
        self.code == Some(code) && self.reason == reason
    }
}

fn reply_from(http: u16, headers: &http::HeaderMap) -> Option<Reply> {
    let status = tonic::Status::from_header_map(headers)?;
    Some(Reply {
        http,
        code: Some(status.code()),
        reason: status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default(),
        message: status.message().to_owned(),
    })
}

/// The gRPC request headers of a call to `path`, with `token` as its bearer credential.
fn grpc_request(addr: SocketAddr, path: &str, token: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

/// A gRPC message frame around `payload`.
fn frame(payload: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

impl RawConnection {
    /// Sends `request` with `body` (ending the stream) and reads the reply, status from the
    /// headers (trailers-only) or the trailers.
    async fn call(&mut self, request: http::Request<()>, body: Bytes) -> Reply {
        let send = self.send.clone().ready().await.unwrap();
        self.send = send;
        let (response, mut stream) = self.send.send_request(request, false).unwrap();
        // The vault may answer from the headers alone (a refused credential, a content type
        // it does not serve) and close the stream before the body is sent: the reply says so.
        let _ = stream.send_data(body, true);
        read_reply(response).await
    }

    /// Sends only the HEADERS of a call: no DATA, the stream left open.
    async fn headers_only(
        &mut self,
        request: http::Request<()>,
    ) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
        let send = self.send.clone().ready().await.unwrap();
        self.send = send;
        self.send.send_request(request, false).unwrap()
    }
}

async fn read_reply(response: h2::client::ResponseFuture) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("a response within 20 s")
        .expect("a response, not a reset stream");
    let http = response.status().as_u16();
    if let Some(reply) = reply_from(http, response.headers()) {
        return reply;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the response body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("the response trailers");
    trailers
        .and_then(|trailers| reply_from(http, &trailers))
        .unwrap_or(Reply {
            http,
            code: None,
            reason: String::new(),
            message: String::new(),
        })
}

async fn health(app: &TestApp) -> ServingStatus {
    let mut health = HealthClient::new(app.channel().await);
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("health answers within 5 s")
    .expect("health answers");
    response.into_inner().status()
}

/// Waits until the vault's health monitor reports SERVING (its first probe).
async fn wait_serving(app: &TestApp) {
    let started = Instant::now();
    while health(app).await != ServingStatus::Serving {
        assert!(started.elapsed() < Duration::from_secs(10), "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fast_health(config: &mut Config) {
    config.health.interval_ms = 100;
}

// --- A5. Rate limits cover every service and every refusal ---------------------------------

/// Every service charges its caller's bucket as the Vault does (the bucket is the caller's,
/// whatever the service), and calls without a valid credential are charged to their peer
/// address, reflection included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_every_service_and_every_refusal_is_rate_limited() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.caller_requests_per_minute = 1;
        config.limits.caller_burst = 2;
        config.limits.unauthenticated_requests_per_minute = 1;
        config.limits.unauthenticated_burst = 2;
    })
    .await
    .unwrap();
    let channel = app.channel().await;
    let limited = |status: &tonic::Status| {
        status.code() == Code::ResourceExhausted && reason(status) == "RATE_LIMITED"
    };

    // Audit, as compliance staff.
    let mut audit = AuditClient::new(channel.clone());
    for attempt in 0..3 {
        let result = audit
            .list_audit_events(authed(COMPLIANCE.token, ListAuditEventsRequest::default()))
            .await;
        match (attempt, result) {
            (2, Err(status)) => assert!(limited(&status), "{status:?}"),
            (2, Ok(_)) => panic!("Audit is not rate limited"),
            (_, Ok(_)) => {}
            (_, Err(status)) => assert!(!limited(&status), "{status:?}"),
        }
    }
    // AccountSecurity, as the security team (refused or not, each call is charged).
    let accounts = AccountSecurityClient::new(channel.clone());
    let statuses: Vec<_> = futures_in_order(3, || {
        let mut accounts = accounts.clone();
        async move {
            accounts
                .list_account_events(authed(
                    SECURITY.token,
                    ListAccountEventsRequest {
                        record_id: UNKNOWN_RECORD.into(),
                        ..Default::default()
                    },
                ))
                .await
        }
    })
    .await;
    assert!(
        statuses[..2]
            .iter()
            .all(|r| !r.as_ref().is_err_and(limited))
    );
    assert!(
        statuses[2].as_ref().is_err_and(limited),
        "{:?}",
        statuses[2]
    );
    // KeyManagement, as the administrator.
    let keys = KeyManagementClient::new(channel.clone());
    let statuses = futures_in_order(3, || {
        let mut keys = keys.clone();
        let token = app.admin_token.clone();
        async move {
            keys.get_key_status(authed(&token, GetKeyStatusRequest {}))
                .await
        }
    })
    .await;
    assert!(statuses[..2].iter().all(|r| r.is_ok()), "{statuses:?}");
    assert!(
        statuses[2].as_ref().is_err_and(limited),
        "{:?}",
        statuses[2]
    );
    // Admin, as a caller not granted it: refused twice, then limited.
    let admin = AdminClient::new(channel.clone());
    let statuses = futures_in_order(3, || {
        let mut admin = admin.clone();
        async move {
            admin
                .reload_policy(authed(ANALYTICS.token, ReloadPolicyRequest {}))
                .await
        }
    })
    .await;
    for status in &statuses[..2] {
        let status = status.as_ref().unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    assert!(
        statuses[2].as_ref().is_err_and(limited),
        "{:?}",
        statuses[2]
    );
    // The Vault, as before; and other callers' buckets are untouched by all of the above.
    let mut vault = app.client().await;
    let check = || {
        authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: UNKNOWN_RECORD.into(),
            },
        )
    };
    for _ in 0..2 {
        let status = vault.check_account(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    assert!(limited(&vault.check_account(check()).await.unwrap_err()));

    // Without a valid credential: refused twice, then the address is limited, for a bad
    // token, no token and reflection alike, while authenticated callers go on.
    let bad = |token: Option<&str>| {
        let mut request = tonic::Request::new(GetRecordRequest {
            record_id: UNKNOWN_RECORD.into(),
            purpose: "service-delivery".into(),
            ..Default::default()
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let first = vault
        .get_record(bad(Some("guessed-token")))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unauthenticated, "{first:?}");
    let second = vault.get_record(bad(None)).await.unwrap_err();
    assert_eq!(second.code(), Code::Unauthenticated, "{second:?}");
    let third = vault
        .get_record(bad(Some("guessed-again")))
        .await
        .unwrap_err();
    assert!(limited(&third), "{third:?}");
    let reflection = list_services_v1(&app).await.unwrap_err();
    assert!(limited(&reflection), "{reflection:?}");
    let status = vault
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: UNKNOWN_RECORD.into(),
                purpose: "service-delivery".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    app.stop().await;
}

/// Health `Watch` holds a stream (and a task) for as long as the peer likes, with no
/// credential: it is charged to the peer's rate and the unauthenticated budget, as
/// reflection is, while `Check` stays free so a load balancer always gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_health_watch_is_charged_and_check_stays_free() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        fast_health(config);
        config.limits.unauthenticated_requests_per_minute = 1;
        config.limits.unauthenticated_burst = 3;
        // A budget of two streams, of which one address may hold one.
        config.limits.max_unauthenticated_requests = 2;
    })
    .await
    .unwrap();
    // Three peers on loopback: 127.0.0.1, .2 and .3 all reach the vault's 127.0.0.1.
    let from = |last: u8| {
        let addr = app.addr;
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .local_address(Some(std::net::IpAddr::from([127, 0, 0, last])))
                .connect()
                .await
                .expect("loopback source addresses connect");
            HealthClient::new(channel)
        }
    };
    let (mut first, mut second, mut third) = (from(1).await, from(2).await, from(3).await);
    let watch = || HealthCheckRequest {
        service: String::new(),
    };
    let served = |result: Result<tonic::Response<tonic::Streaming<_>>, tonic::Status>| {
        result
            .expect("a Watch within the budget is served")
            .into_inner()
    };
    let refused = |result: Result<tonic::Response<tonic::Streaming<_>>, tonic::Status>| {
        let status = result.expect_err("refused");
        (status.code(), reason(&status), status.message().to_owned())
    };
    let mut held = vec![served(first.watch(watch()).await)];
    // The first address holds its share: a second stream of its own is refused, while
    // another address still gets the rest of the budget.
    let (code, why, message) = refused(first.watch(watch()).await);
    assert_eq!(
        (code, why.as_str()),
        (Code::ResourceExhausted, "RATE_LIMITED")
    );
    assert!(message.contains("in flight"), "{message}");
    held.push(served(second.watch(watch()).await));
    // Two streams take the whole budget: a third address is refused for load.
    let (code, why, _) = refused(third.watch(watch()).await);
    assert_eq!((code, why.as_str()), (Code::Unavailable, "OVERLOADED"));
    // The first address has used its burst of three: the fourth is refused for its rate.
    let (code, why, message) = refused(first.watch(watch()).await);
    assert_eq!(
        (code, why.as_str()),
        (Code::ResourceExhausted, "RATE_LIMITED")
    );
    assert!(message.contains("in flight"), "{message}");
    let (code, why, message) = refused(first.watch(watch()).await);
    assert_eq!(
        (code, why.as_str()),
        (Code::ResourceExhausted, "RATE_LIMITED")
    );
    assert!(message.contains("unauthenticated calls"), "{message}");
    // Check is charged to neither: it answers as often as asked, with the streams held.
    for _ in 0..5 {
        third.check(watch()).await.expect("Check is never refused");
    }
    for stream in &mut held {
        assert!(
            stream.message().await.unwrap().is_some(),
            "the stream lives"
        );
    }
    drop(held);
    app.stop().await;
}

/// The per-call limits are part of what a reload applies (E21): a caller's rate, the rate
/// of calls without a credential; the listener-level limits are refused, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a5_a_reload_changes_the_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pdvault.toml");
    let app = TestApp::spawn_full(
        Backend::Sqlite,
        |_| {},
        |config| {
            std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
            Some(pdvault::app::reload::ConfigSource {
                file: Some(file.clone()),
                flags: Default::default(),
            })
        },
    )
    .await
    .unwrap();
    let channel = app.channel().await;
    let mut admin = AdminClient::new(channel.clone());
    let mut vault = pdvault::proto::vault_client::VaultClient::new(channel);
    let limited = |status: &tonic::Status| {
        status.code() == Code::ResourceExhausted && reason(status) == "RATE_LIMITED"
    };
    let check = || {
        authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: UNKNOWN_RECORD.into(),
            },
        )
    };
    for _ in 0..5 {
        let status = vault.check_account(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let write = |change: &dyn Fn(&mut Config)| {
        let mut config = app.config.clone();
        change(&mut config);
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    };
    let reload = || authed(&app.admin_token, ReloadPolicyRequest {});

    // What the listener and the decoders are built with needs a restart.
    for (change, key) in [
        (
            &(|config: &mut Config| config.limits.max_message_bytes = 1024) as &dyn Fn(&mut Config),
            "limits.max_message_bytes",
        ),
        (
            &|config: &mut Config| config.limits.max_connections_per_peer = 3,
            "limits.max_connections_per_peer",
        ),
    ] {
        write(change);
        let status = admin.reload_policy(reload()).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&format!("{key}: cannot change")),
            "{}",
            status.message()
        );
    }
    write(&|config| {
        config.limits.caller_requests_per_minute = 1;
        config.limits.caller_burst = 2;
        config.limits.unauthenticated_requests_per_minute = 1;
        config.limits.unauthenticated_burst = 1;
    });
    admin.reload_policy(reload()).await.unwrap();
    for _ in 0..2 {
        let status = vault.check_account(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    assert!(limited(&vault.check_account(check()).await.unwrap_err()));
    let guessed = || {
        let mut request = tonic::Request::new(CheckAccountRequest {
            record_id: UNKNOWN_RECORD.into(),
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer guessed".parse().unwrap());
        request
    };
    let first = vault.check_account(guessed()).await.unwrap_err();
    assert_eq!(first.code(), Code::Unauthenticated, "{first:?}");
    assert!(limited(&vault.check_account(guessed()).await.unwrap_err()));

    // Back to no caller limit (the administrator's second call under the limits): the
    // login path is served again at once.
    write(&|_| {});
    admin.reload_policy(reload()).await.unwrap();
    for _ in 0..5 {
        let status = vault.check_account(check()).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    app.stop().await;
}

/// Runs `count` calls one after the other and returns their results in order.
async fn futures_in_order<F, Fut, T>(count: usize, mut make: F) -> Vec<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        results.push(make().await);
    }
    results
}

// --- C10. The concurrency cap is held before authentication ---------------------------------

/// Streams that send HEADERS and no DATA, with no credential and with a valid one, on
/// several connections at the advertised stream limit: they never hold the slots that
/// authenticated calls need, the health check stays SERVING, the unauthenticated ones are
/// answered at once and the authenticated ones when the read deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_headers_without_data_starve_no_caller_and_not_health() {
    const STREAMS: u32 = 40;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        fast_health(config);
        config.limits.max_concurrent_requests = 8;
        config.limits.max_streams_per_connection = STREAMS;
        config.limits.request_read_timeout_ms = 3_000;
        config.limits.unauthenticated_burst = 1_000;
        // The global slots are under test here: 80 silent streams of one caller would
        // otherwise meet its own cap first (c10_one_caller_cannot_hold_more_than_its_share).
        config.limits.max_in_flight_per_caller = 0;
    })
    .await
    .unwrap();
    let record = create(&app, zhang_san()).await;
    wait_serving(&app).await;

    let mut attackers = Vec::new();
    for _ in 0..4 {
        let connection = raw_connect(app.addr).await;
        assert_eq!(
            connection.max_streams, STREAMS as usize,
            "the server advertises its per-connection stream limit"
        );
        attackers.push(connection);
    }
    let started = Instant::now();
    let mut anonymous = Vec::new();
    let mut silent = Vec::new();
    let mut open_streams = Vec::new();
    for (index, connection) in attackers.iter_mut().enumerate() {
        for _ in 0..STREAMS {
            // Half the connections without a credential, half as a configured caller.
            let token = (index % 2 == 1).then_some(CLAIMS.token);
            let request = grpc_request(connection.addr, GET_RECORD, token);
            let (response, stream) = connection.headers_only(request).await;
            open_streams.push(stream);
            if token.is_some() {
                silent.push(response);
            } else {
                anonymous.push(response);
            }
        }
    }
    // Meanwhile an authenticated caller reads, repeatedly, and health answers SERVING.
    let mut client = app.client().await;
    for _ in 0..20 {
        let released = client
            .get_record(authed(
                CLAIMS.token,
                GetRecordRequest {
                    record_id: record.record_id.clone(),
                    purpose: "service-delivery".into(),
                    ..Default::default()
                },
            ))
            .await;
        assert!(released.is_ok(), "{released:?}");
        assert_eq!(health(&app).await, ServingStatus::Serving);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the reads ran while every silent stream was still open"
    );
    for response in anonymous {
        let reply = read_reply(response).await;
        assert!(
            reply.is(Code::Unauthenticated, "UNAUTHENTICATED"),
            "{reply:?}"
        );
    }
    for response in silent {
        let reply = read_reply(response).await;
        assert!(
            reply.is(Code::DeadlineExceeded, "REQUEST_READ_TIMEOUT"),
            "{reply:?}"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2_500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    drop(open_streams);
    app.stop().await;
}

/// One authenticated caller holds at most `limits.max_in_flight_per_caller` calls at once,
/// counted from before its message is read: streams that send headers and trickle no body
/// cannot buffer more than that, or take every global slot, and other callers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_one_caller_cannot_hold_more_than_its_share() {
    const CAP: usize = 3;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.max_in_flight_per_caller = CAP;
        config.limits.request_read_timeout_ms = 10_000;
    })
    .await
    .unwrap();
    let mut connection = raw_connect(app.addr).await;
    let get = || {
        use prost::Message;
        frame(
            &GetRecordRequest {
                record_id: UNKNOWN_RECORD.into(),
                purpose: "service-delivery".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    // CAP calls of one caller send their headers and no message: each holds its place.
    let mut silent = Vec::new();
    for _ in 0..CAP {
        let request = grpc_request(connection.addr, GET_RECORD, Some(CLAIMS.token));
        silent.push(connection.headers_only(request).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One more call of that caller is refused at once, message or not.
    let started = Instant::now();
    let refused = connection
        .call(
            grpc_request(app.addr, GET_RECORD, Some(CLAIMS.token)),
            get(),
        )
        .await;
    assert!(
        refused.is(Code::ResourceExhausted, "RATE_LIMITED"),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused without waiting"
    );
    // Another caller is not charged for it.
    let other = app
        .client()
        .await
        .check_account(authed(
            LOGIN.token,
            CheckAccountRequest {
                record_id: UNKNOWN_RECORD.into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "{other:?}");
    // A silent call that finally sends its message is served and frees its place.
    let (response, mut stream) = silent.pop().unwrap();
    stream.send_data(get(), true).unwrap();
    let answered = read_reply(response).await;
    assert_eq!(answered.code, Some(Code::NotFound), "{answered:?}");
    let served = connection
        .call(
            grpc_request(app.addr, GET_RECORD, Some(CLAIMS.token)),
            get(),
        )
        .await;
    assert_eq!(served.code, Some(Code::NotFound), "{served:?}");
    drop(silent);
    app.stop().await;
}

/// One peer address holds at most `limits.max_connections_per_peer` connections; a closed
/// one frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_connections_per_peer_are_limited() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.max_connections_per_peer = 3;
    })
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(raw_connect(app.addr).await);
    }
    // The fourth is closed on accept: its first read ends.
    let mut fourth = TcpStream::connect(app.addr).await.unwrap();
    let mut buffer = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match fourth.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection over the limit is closed");
    // The held ones still serve.
    let reply = held[0]
        .call(
            grpc_request(app.addr, GET_RECORD, Some(CLAIMS.token)),
            frame(&[]),
        )
        .await;
    assert!(reply.code.is_some(), "{reply:?}");
    // Closing one frees a slot.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = raw_connect(app.addr).await;
    let reply = again
        .call(
            grpc_request(app.addr, "/grpc.health.v1.Health/Check", None),
            frame(&[]),
        )
        .await;
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    drop(held);
    drop(again);
    app.stop().await;
}

// --- C11. Idle and half-open connections are closed ----------------------------------------

/// TCP connections that never say anything, and HTTP/2 connections whose client stopped
/// answering after its preface, are closed after the idle limit, not before; an HTTP/2
/// client that is merely quiet keeps its connection, because it answers the
/// server's pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_silent_connections_are_closed_after_the_idle_limit() {
    const IDLE_MS: u64 = 600;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.limits.idle_timeout_ms = IDLE_MS;
    })
    .await
    .unwrap();
    let mut live = raw_connect(app.addr).await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    // Half-open at the HTTP/2 level: the client preface and SETTINGS, then nothing, not
    // even the answers to the server's PINGs.
    for _ in 0..5 {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        silent.push(stream);
    }
    let mut closed_after = Vec::new();
    for mut stream in silent {
        let mut buffer = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                // The server's SETTINGS arrive first; then the end.
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection stays open");
        closed_after.push(started.elapsed());
    }
    let first = *closed_after.iter().min().unwrap();
    let last = *closed_after.iter().max().unwrap();
    assert!(
        first >= Duration::from_millis(IDLE_MS / 2) && last < Duration::from_millis(IDLE_MS * 5),
        "closed between {first:?} and {last:?}"
    );
    // Three idle limits later the quiet HTTP/2 client's connection still serves.
    tokio::time::sleep(Duration::from_millis(IDLE_MS * 3)).await;
    let reply = live
        .call(
            grpc_request(app.addr, "/grpc.health.v1.Health/Check", None),
            frame(&[]),
        )
        .await;
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    app.stop().await;
}

/// When `accept` runs out of file descriptors the server says so in its log (not once per
/// failed accept: it backs off and throttles the line) and serves again once descriptors
/// are free. The real binary, with `ulimit -n` lowered as `LimitNOFILE` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_running_out_of_descriptors_is_logged_and_survived() {
    const OPEN_FILES: u32 = 64;
    let server =
        crate::support::process::ServerProcess::start_with_open_files("", "info", Some(OPEN_FILES))
            .await;
    let mut flood = Vec::new();
    for _ in 0..(OPEN_FILES as usize + 40) {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(server.addr)).await
        {
            flood.push(stream);
        }
    }
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        server.wait_for_log(0, |line| line.contains("out of file descriptors")),
    )
    .await
    .expect("running out of descriptors is logged");
    assert!(line.contains("LimitNOFILE"), "{line}");
    // Kept busy for a while, the listener neither spins nor floods the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logged = server
        .logs()
        .iter()
        .filter(|line| line.contains("out of file descriptors"))
        .count();
    assert!(logged <= 2, "{logged} lines");
    drop(flood);
    // Descriptors are free again: a new client is served.
    let started = Instant::now();
    loop {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
        if let Ok(channel) = channel {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if answer.is_ok() {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never served again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- C12. Malformed messages are the caller's error ----------------------------------------

/// Invalid UTF-8, truncated messages and frames, wrong wire types, deep nesting, the
/// compressed flag without `grpc-encoding` and no message at all are INVALID_ARGUMENT with
/// reason MALFORMED_REQUEST, on every service; a non-gRPC content type is HTTP 415.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_malformed_messages_are_invalid_argument() {
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let mut connection = raw_connect(app.addr).await;
    let deep: Vec<u8> = std::iter::repeat_n(0x7b_u8, 200).collect(); // field 15, start group
    let bodies: Vec<(&str, Bytes)> = vec![
        ("invalid UTF-8", frame(&[0x0a, 0x02, 0xff, 0xfe])),
        ("truncated message", frame(&[0x0a, 0x10, b'r', b'e'])),
        ("wrong wire type", frame(&[0x08, 0x01])),
        ("deep recursion", frame(&deep)),
        ("truncated frame", {
            let mut body = vec![0u8, 0, 0, 0, 20];
            body.extend_from_slice(&[0x0a, 0x01, b'x']);
            Bytes::from(body)
        }),
        ("compressed flag without grpc-encoding", {
            let mut body = frame(&[0x0a, 0x01, b'x']).to_vec();
            body[0] = 1;
            Bytes::from(body)
        }),
        ("invalid compressed flag", {
            let mut body = frame(&[0x0a, 0x01, b'x']).to_vec();
            body[0] = 9;
            Bytes::from(body)
        }),
        ("no message", Bytes::new()),
        ("two messages", {
            let mut body = frame(&[]).to_vec();
            body.extend_from_slice(&frame(&[]));
            Bytes::from(body)
        }),
    ];
    let targets = [
        (GET_RECORD, CLAIMS.token),
        ("/pdvault.v1.Audit/ListAuditEvents", COMPLIANCE.token),
        ("/pdvault.v1.AccountSecurity/SuspendAccount", SECURITY.token),
        (
            "/pdvault.v1.KeyManagement/RekeyRecord",
            app.admin_token.as_str(),
        ),
    ];
    for (path, token) in targets {
        for (what, body) in &bodies {
            let reply = connection
                .call(grpc_request(app.addr, path, Some(token)), body.clone())
                .await;
            assert_eq!(reply.http, 200, "{path} {what}");
            assert!(
                reply.is(Code::InvalidArgument, "MALFORMED_REQUEST"),
                "{path} {what}: {reply:?}"
            );
            assert!(!reply.message.contains('\u{fffd}'), "{what}: {reply:?}");
        }
    }
    // Not gRPC at all.
    for content_type in ["application/json", "text/plain", "application/grpcfoo"] {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{GET_RECORD}", app.addr))
            .header("content-type", content_type)
            .header("authorization", format!("Bearer {}", CLAIMS.token))
            .body(())
            .unwrap();
        let reply = connection.call(request, Bytes::from_static(b"{}")).await;
        assert_eq!(reply.http, 415, "{content_type}: {reply:?}");
    }
    // And the connection, and the service, are fine.
    let reply = connection
        .call(
            grpc_request(app.addr, GET_RECORD, Some(CLAIMS.token)),
            frame(
                &[0x0a, 0x1e]
                    .iter()
                    .copied()
                    .chain(UNKNOWN_RECORD.bytes())
                    .chain([0x12, 0x10].into_iter().chain("service-delivery".bytes()))
                    .collect::<Vec<_>>(),
            ),
        )
        .await;
    assert!(reply.is(Code::NotFound, "RECORD_NOT_FOUND"), "{reply:?}");
    app.stop().await;
}

// --- D20. Reflection for every client ------------------------------------------------------

async fn list_services_v1(app: &TestApp) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response: ServerReflectionResponse = stream.message().await?.expect("a response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

async fn list_services_v1alpha(app: &TestApp) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response: ServerReflectionResponse = stream.message().await?.expect("a response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// Both `grpc.reflection.v1` and `v1alpha` list every service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d20_reflection_v1_and_v1alpha_list_every_service() {
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    for services in [
        list_services_v1(&app).await.unwrap(),
        list_services_v1alpha(&app).await.unwrap(),
    ] {
        for service in [
            "pdvault.v1.Vault",
            "pdvault.v1.Audit",
            "pdvault.v1.AccountSecurity",
            "pdvault.v1.KeyManagement",
            "pdvault.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.iter().any(|s| s == service),
                "{service} in {services:?}"
            );
        }
    }
    app.stop().await;
}

// --- The property test: arbitrary bytes as every request of every service -------------------

/// Every RPC path of every pdvault service, from the descriptors the server reflects.
fn every_rpc_path() -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(pdvault::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut paths = Vec::new();
    for file in set.file {
        let package = file.package().to_owned();
        for service in &file.service {
            for method in &service.method {
                paths.push(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    assert!(paths.len() >= 23, "{paths:?}");
    paths
}

/// A protobuf length-delimited field.
fn string_field(number: u32, value: &[u8]) -> Vec<u8> {
    let mut field = Vec::new();
    let mut key = u64::from(number << 3 | 2);
    let mut len = value.len() as u64;
    for varint in [&mut key, &mut len] {
        loop {
            let byte = (*varint & 0x7f) as u8;
            *varint >>= 7;
            if *varint == 0 {
                field.push(byte);
                break;
            }
            field.push(byte | 0x80);
        }
    }
    field.extend_from_slice(value);
    field
}

fn fuzz(backend: Backend) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(app) = runtime.block_on(TestApp::spawn(backend)) else {
        return;
    };
    let person = zhang_san();
    runtime.block_on(create(&app, person.clone()));
    let identity_values: Vec<Vec<u8>> = [
        person.id_number.clone(),
        person.name.clone(),
        person.email.clone(),
        person.address.clone(),
        "13812345678".to_owned(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let paths = every_rpc_path();
    // The runner's closure is `Fn`; the one connection is borrowed per case.
    let connection = std::cell::RefCell::new(runtime.block_on(raw_connect(app.addr)));
    let token = app.admin_token.clone();

    // Arbitrary bytes; or identity values in arbitrary string fields, then mutated.
    let values = identity_values.clone();
    let seeded = (
        proptest::collection::vec((1u32..12, 0..values.len()), 1..6),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    )
        .prop_map(move |(fields, flips)| {
            let mut payload: Vec<u8> = fields
                .into_iter()
                .flat_map(|(number, value)| string_field(number, &values[value]))
                .collect();
            for (at, byte) in flips {
                let at = at.index(payload.len());
                payload[at] = byte;
            }
            payload
        });
    let payload = prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), seeded];
    let strategy = (0..paths.len(), payload);
    let cases = std::env::var("PDVAULT_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(192);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let answers = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let result = runner.run(&strategy, |(path, payload)| {
        let path = &paths[path];
        let reply = runtime.block_on(
            connection
                .borrow_mut()
                .call(grpc_request(app.addr, path, Some(&token)), frame(&payload)),
        );
        let code = reply
            .code
            .ok_or_else(|| TestCaseError::fail(format!("{path}: no grpc-status: {reply:?}")))?;
        prop_assert_eq!(reply.http, 200);
        *answers
            .borrow_mut()
            .entry(format!("{code:?}/{}", reply.reason))
            .or_default() += 1;
        prop_assert!(
            !matches!(code, Code::Internal | Code::Unknown),
            "{} answered {:?}",
            path,
            reply
        );
        for value in &identity_values {
            prop_assert!(
                !contains(reply.message.as_bytes(), value),
                "{} repeated an identity value: {:?}",
                path,
                reply
            );
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // About a third of the inputs decode (random bytes rarely do); if not even an eighth
    // did, the handlers were never exercised and the test would prove nothing.
    let answers = answers.into_inner();
    eprintln!("{backend:?}: answers by code and reason: {answers:?}");
    let total: usize = answers.values().sum();
    let malformed = answers
        .get("InvalidArgument/MALFORMED_REQUEST")
        .copied()
        .unwrap_or(0);
    assert!(
        (total - malformed) * 8 >= total,
        "fewer than an eighth of the inputs reached a handler: {answers:?}"
    );
    // Nothing of it reached the database in plaintext (the trail included).
    let bytes = runtime.block_on(app.raw_database_bytes());
    for value in &identity_values {
        assert!(
            !contains(&bytes, value),
            "an identity value is stored in plaintext"
        );
    }
    runtime.block_on(app.stop());
}

#[test]
fn property_arbitrary_bytes_as_every_request_sqlite() {
    fuzz(Backend::Sqlite);
}

#[test]
fn property_arbitrary_bytes_as_every_request_postgres() {
    fuzz(Backend::Postgres);
}
