//! The layers a gRPC call passes between the socket and its service, in order, all in this
//! file so a reader follows a call through one: the request layer ([`RequestLayer`]: request
//! id, span, completion log line, request metrics), admission ([`AdmissionLayer`]: what a
//! call must show before it may hold any of the server's capacity), then the call timeout
//! ([`TimeoutLayer`]). [`layers`] stacks them; `app` puts the stack in front of every
//! service. The limits they apply and their state are `limits.rs`; the metric hooks are
//! `telemetry::metrics`.
//!
//! Admission exists because a call that takes a slot of `limits.max_concurrent_requests`
//! and then sends nothing holds that slot until its deadline; before this layer, 450 such
//! streams on one connection from a client without a token shut every caller (and the
//! health check) out. So, in order:
//! 1. Health `Check` passes straight through: it reads a watch channel, costs nothing, and
//!    a load balancer that sees it refused takes a loaded instance out for nothing. Health
//!    `Watch` is another matter: a stream held open for as long as the peer likes, with a
//!    task of its own, so it is admitted as reflection is (step 3).
//! 2. A request that is not gRPC (content type) is refused with HTTP 415, as the gRPC over
//!    HTTP/2 protocol says.
//! 3. The caller is authenticated from the headers alone. A call without a valid credential
//!    is answered at once (`UNAUTHENTICATED`), or `RESOURCE_EXHAUSTED` / `RATE_LIMITED` once
//!    its peer address is over `limits.unauthenticated_requests_per_minute`; its body is
//!    never read. Reflection and health `Watch` need no credential: they are charged to the
//!    peer's rate and run on a small budget of their own
//!    (`limits.max_unauthenticated_requests`), held for as long as the stream lasts.
//! 4. An authenticated caller is charged its own rate (`limits.caller_requests_per_minute`),
//!    on every service alike, and takes a place in its own in-flight count
//!    (`limits.max_in_flight_per_caller`, `RESOURCE_EXHAUSTED` / `RATE_LIMITED` when full),
//!    held until its handler has answered: one credential cannot have more messages than that
//!    buffered at once, nor take every slot of step 6.
//! 5. The request message is read within `limits.request_read_timeout_ms`, bounded by
//!    `limits.max_message_bytes`, and its gRPC framing checked (one complete message, no
//!    compressed flag without `grpc-encoding`): framing errors are `INVALID_ARGUMENT` /
//!    `MALFORMED_REQUEST`, the caller's error, not `INTERNAL`.
//! 6. Only then does the call take a slot, refused with `UNAVAILABLE` / `OVERLOADED` when
//!    none is free, and run under the call timeout (`DEADLINE_EXCEEDED` /
//!    `REQUEST_TIMEOUT`, its handler dropped), read per call so a reload changes it.
//!
//! The handlers authenticate again (they need the caller and its policy snapshot, and audit
//! in its name); this layer only decides who gets in.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};
use tracing::Instrument;

use super::status::RequestError;
use crate::config::LimitsConfig;
use crate::grpc::limits::{CallLimits, LimitError, LiveLimits};
use crate::vault::Vault;

/// The 5-byte prefix of every gRPC message: compressed flag and big-endian length.
const FRAME_HEADER_BYTES: usize = 5;

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The metadata key a request id travels in, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest client-chosen request id kept; longer or non-printable ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = crate::domain::edge::MAX_REQUEST_ID_BYTES;

/// Marks a request whose client sent an `x-request-id` that is not printable ASCII of at
/// most [`MAX_REQUEST_ID_LEN`] bytes: it was replaced by a generated one here, and the
/// pdvault services refuse the call as `INVALID_ARGUMENT` (the value itself goes nowhere).
#[derive(Clone, Copy, Debug)]
pub struct ClientRequestIdRefused;

/// The stack [`layers`] builds (tower nests the first layer added outermost).
pub type Layers = Stack<TimeoutLayer, Stack<AdmissionLayer, Stack<RequestLayer, Identity>>>;

/// The layers in the order a call passes them: [`RequestLayer`] outermost (so even a refused
/// call has a request id, a log line and its metrics), then [`AdmissionLayer`], then
/// [`TimeoutLayer`] around the service.
pub fn layers(
    vault: Arc<Vault>,
    limits: Arc<LiveLimits>,
    config: &LimitsConfig,
) -> ServiceBuilder<Layers> {
    let timeout = TimeoutLayer::new(&limits);
    ServiceBuilder::new()
        .layer(RequestLayer)
        .layer(AdmissionLayer::new(vault, limits, config))
        .layer(timeout)
}

// 1. The request layer.

/// Request ids, spans, completion logs and request metrics for every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestLayer;

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> RequestService<S> {
        RequestService { inner }
    }
}

#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RequestService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let request_id = match request.headers().get(REQUEST_ID_HEADER) {
            Some(value) if valid_request_id(value) => value.clone(),
            sent => {
                if sent.is_some() {
                    // The pdvault services refuse the call; logs and the response still
                    // carry an id to correlate the refusal by.
                    request.extensions_mut().insert(ClientRequestIdRefused);
                }
                let generated = new_request_id();
                // The handlers read the id from metadata, so the generated one goes there.
                request
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, generated.clone());
                generated
            }
        };
        let method = crate::telemetry::metrics::method_label(request.uri().path());
        let span = tracing::info_span!(
            "call",
            method,
            request_id = request_id.to_str().unwrap_or_default()
        );
        let started = Instant::now();
        let future = span.in_scope(|| self.inner.call(request));
        Box::pin(
            async move {
                let mut result = future.await;
                if let Ok(response) = &mut result {
                    response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
                    // Unary errors are trailers-only responses, so their status is in the
                    // headers; a response without one is an OK whose status trails the body,
                    // unless it is not a gRPC answer at all (HTTP 415 for a request that was
                    // not gRPC), which gRPC's HTTP mapping calls UNKNOWN.
                    let code = match response.headers().get("grpc-status") {
                        Some(value) => tonic::Code::from_bytes(value.as_bytes()),
                        None if response.status() != http::StatusCode::OK => tonic::Code::Unknown,
                        None => tonic::Code::Ok,
                    };
                    let elapsed = started.elapsed();
                    crate::telemetry::metrics::record_request(method, code, elapsed);
                    tracing::info!(
                        code = ?code,
                        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                        "call finished"
                    );
                }
                result
            }
            .instrument(span),
        )
    }
}

fn valid_request_id(value: &HeaderValue) -> bool {
    crate::domain::edge::check_request_id(value.as_bytes()).is_ok()
}

#[allow(
    clippy::expect_used,
    reason = "`req_` and lower-case base32 are visible ASCII, always a header value"
)]
fn new_request_id() -> HeaderValue {
    let mut bytes = [0u8; 12];
    // Uniqueness is all a request id needs; should the OS generator fail, time will do.
    if getrandom::fill(&mut bytes).is_err() {
        let now = chrono::Utc::now().timestamp_micros().to_le_bytes();
        bytes[..8].copy_from_slice(&now);
    }
    let id = format!(
        "req_{}",
        data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
    );
    HeaderValue::from_str(&id).expect("base32 is a valid header value")
}

// 2. Admission.

/// What a request path is, for admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `grpc.health.v1.Health/Check`: free.
    HealthCheck,
    /// Streams that need no credential (reflection, health `Watch`): the peer's rate and
    /// the unauthenticated budget.
    Unauthenticated,
    Service,
}

fn kind(path: &str) -> Kind {
    if path == "/grpc.health.v1.Health/Check" {
        Kind::HealthCheck
    } else if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        Kind::Unauthenticated
    } else {
        Kind::Service
    }
}

/// The admission rules over every gRPC service; see the module header.
#[derive(Clone)]
pub struct AdmissionLayer {
    shared: Arc<Shared>,
}

struct Shared {
    vault: Arc<Vault>,
    /// Rates, caps and the read deadline; a reload may replace them.
    limits: Arc<LiveLimits>,
    /// Fixed at start: the services' decoders are built with it.
    max_message_bytes: usize,
}

impl AdmissionLayer {
    /// Admission under `limits` (shared with the policy reloader) and the message size
    /// limit of `config`.
    pub fn new(
        vault: Arc<Vault>,
        limits: Arc<LiveLimits>,
        config: &LimitsConfig,
    ) -> AdmissionLayer {
        AdmissionLayer {
            shared: Arc::new(Shared {
                vault,
                limits,
                max_message_bytes: config.max_message_bytes,
            }),
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready clone serves this call; the fresh clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let kind = kind(request.uri().path());
        if kind == Kind::HealthCheck {
            return Box::pin(inner.call(request));
        }
        if !is_grpc(request.headers()) {
            crate::telemetry::metrics::record_denial("UNSUPPORTED_MEDIA_TYPE");
            return Box::pin(async { Ok(unsupported_media_type()) });
        }
        Box::pin(async move {
            match shared.admit(kind, request).await {
                Ok(Admitted::Service(request, permit, caller_slot)) => {
                    let response = inner.call(request).await;
                    drop(permit);
                    drop(caller_slot);
                    response
                }
                Ok(Admitted::Unauthenticated(request, permit, peer_slot)) => {
                    // Reflection and health Watch streams: the budget is held until the
                    // response ends.
                    let response = inner.call(request).await?;
                    Ok(response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _held = (&permit, &peer_slot);
                            frame
                        }))
                    }))
                }
                Err(refused) => Ok(Status::from(refused).into_http()),
            }
        })
    }
}

enum Admitted {
    Service(
        http::Request<Body>,
        tokio::sync::OwnedSemaphorePermit,
        crate::grpc::limits::CallerSlot,
    ),
    Unauthenticated(
        http::Request<Body>,
        tokio::sync::OwnedSemaphorePermit,
        Option<crate::grpc::limits::CallerSlot>,
    ),
}

impl Shared {
    async fn admit(
        &self,
        kind: Kind,
        request: http::Request<Body>,
    ) -> Result<Admitted, RequestError> {
        let limits = self.limits.current();
        let peer = peer_addr(request.extensions()).map(|addr| addr.ip());
        if kind == Kind::Unauthenticated {
            charge_peer(&limits, peer)?;
            // One address holds at most its share of the budget, so it cannot keep every
            // reflection or Watch stream open for itself.
            let peer_slot = match peer {
                Some(ip) => Some(
                    limits
                        .unauthenticated_per_peer
                        .try_take(&crate::grpc::limits::peer_key(ip).to_string())?,
                ),
                None => None,
            };
            let permit = limits.unauthenticated.try_take()?;
            return Ok(Admitted::Unauthenticated(request, permit, peer_slot));
        }
        let caller = {
            let policy = self.vault.policy();
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|value| value.to_str().ok());
            let certificates = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs());
            let leaf = certificates
                .as_ref()
                .and_then(|chain| chain.first())
                .map(|leaf| leaf.as_ref());
            match super::identify(&policy, authorization, leaf) {
                Ok(caller) => caller,
                Err(refused) => {
                    if let Err(limited) = charge_peer(&limits, peer) {
                        // The rate answers the call; the credential's refusal still counts.
                        super::status::count_unanswered(refused);
                        return Err(limited.into());
                    }
                    return Err(refused);
                }
            }
        };
        if !limits.callers.check(&caller.name) {
            return Err(LimitError::CallerRate.into());
        }
        let caller_slot = limits.per_caller.try_take(&caller.name)?;
        let (parts, body) = request.into_parts();
        let compressed = parts
            .headers
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding.as_bytes() != b"identity");
        let message = self.read_message(body, limits.read_timeout).await?;
        check_framing(&message, compressed, self.max_message_bytes)?;
        let permit = limits.permits.try_take()?;
        let body = Body::new(http_body_util::Full::new(message));
        Ok(Admitted::Service(
            http::Request::from_parts(parts, body),
            permit,
            caller_slot,
        ))
    }

    /// The whole request body, within the read deadline and the message size limit.
    async fn read_message(&self, body: Body, deadline: Duration) -> Result<Bytes, RequestError> {
        let limit = self.max_message_bytes.saturating_add(FRAME_HEADER_BYTES);
        let collect = http_body_util::Limited::new(body, limit).collect();
        match tokio::time::timeout(deadline, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
                Err(RequestError::TooLarge {
                    max: self.max_message_bytes,
                })
            }
            // The client reset its stream: nobody reads the answer.
            Ok(Err(_)) => Err(RequestError::Malformed(
                "the request stream failed before its end",
            )),
            Err(_) => Err(RequestError::ReadTimeout),
        }
    }
}

/// Charges one unauthenticated call to its peer's rate.
fn charge_peer(limits: &CallLimits, peer: Option<IpAddr>) -> Result<(), LimitError> {
    if limits.peers.check(peer) {
        Ok(())
    } else {
        Err(LimitError::PeerRate)
    }
}

/// Every pdvault RPC takes exactly one request message: one complete frame, uncompressed
/// unless the request names its `grpc-encoding`.
fn check_framing(body: &[u8], compressed_allowed: bool, max: usize) -> Result<(), RequestError> {
    let malformed = RequestError::Malformed;
    if body.is_empty() {
        return Err(malformed("no request message"));
    }
    if body.len() < FRAME_HEADER_BYTES {
        return Err(malformed("truncated message frame"));
    }
    match body[0] {
        0 => {}
        1 if compressed_allowed => {}
        1 => return Err(malformed("compressed flag set without grpc-encoding")),
        _ => return Err(malformed("invalid compressed flag")),
    }
    let declared = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if declared > max {
        return Err(RequestError::TooLarge { max });
    }
    let payload = body.len() - FRAME_HEADER_BYTES;
    if payload < declared {
        return Err(malformed("truncated message"));
    }
    if payload > declared {
        return Err(malformed("more than one message in a unary request"));
    }
    Ok(())
}

/// `application/grpc`, optionally `+proto` or another subtype, or with parameters.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

fn unsupported_media_type() -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response.headers_mut().insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

// 3. The call timeout.

/// Fails a call that runs longer than the configured timeout with `DEADLINE_EXCEEDED`,
/// dropping (and so cancelling) its handler. The timeout is read per call, so a reload
/// ([`LiveLimits::replace`]) changes it for the next call.
#[derive(Clone)]
pub struct TimeoutLayer {
    timeout_ms: Arc<AtomicU64>,
}

impl TimeoutLayer {
    /// The timeout `limits` hold, followed across reloads.
    pub fn new(limits: &LiveLimits) -> TimeoutLayer {
        TimeoutLayer {
            timeout_ms: limits.request_timeout_ms(),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout_ms: Arc::clone(&self.timeout_ms),
        }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout_ms: Arc<AtomicU64>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Timeout<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let future = self.inner.call(request);
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed).max(1));
        Box::pin(async move {
            match tokio::time::timeout(timeout, future).await {
                Ok(response) => response,
                Err(_) => {
                    tracing::warn!(timeout_ms = timeout.as_millis() as u64, "call timed out");
                    Ok(Status::from(LimitError::Timeout).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![flag];
        body.extend_from_slice(&declared.to_be_bytes());
        body.extend_from_slice(payload);
        body
    }

    fn reason(status: &Status) -> (tonic::Code, String) {
        use tonic_types::StatusExt;
        let reason = status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default();
        (status.code(), reason)
    }

    #[test]
    fn only_one_complete_frame_is_a_request() {
        let max = 16;
        assert!(check_framing(&frame(0, 3, b"abc"), false, max).is_ok());
        assert!(check_framing(&frame(0, 0, b""), false, max).is_ok());
        assert!(check_framing(&frame(1, 3, b"abc"), true, max).is_ok());
        let malformed = (tonic::Code::InvalidArgument, "MALFORMED_REQUEST".to_owned());
        for bad in [
            Vec::new(),
            vec![0, 0, 0],
            frame(0, 10, b"abc"),
            frame(0, 2, b"abc"),
            frame(1, 3, b"abc"),
            frame(7, 3, b"abc"),
        ] {
            let refused = Status::from(check_framing(&bad, false, max).unwrap_err());
            assert_eq!(reason(&refused), malformed, "{bad:?}");
        }
        let big = Status::from(check_framing(&frame(0, 17, b""), false, max).unwrap_err());
        assert_eq!(
            reason(&big),
            (tonic::Code::OutOfRange, "MESSAGE_TOO_LARGE".to_owned())
        );
    }

    #[test]
    fn grpc_content_types_and_paths() {
        let headers = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(value),
            );
            headers
        };
        assert!(is_grpc(&headers("application/grpc")));
        assert!(is_grpc(&headers("application/grpc+proto")));
        assert!(!is_grpc(&headers("application/grpcx")));
        assert!(!is_grpc(&headers("application/json")));
        assert!(!is_grpc(&http::HeaderMap::new()));
        assert_eq!(kind("/grpc.health.v1.Health/Check"), Kind::HealthCheck);
        assert_eq!(kind("/grpc.health.v1.Health/Watch"), Kind::Unauthenticated);
        assert_eq!(
            kind("/grpc.health.v1.Health/Check/x"),
            Kind::Unauthenticated
        );
        assert_eq!(
            kind("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Kind::Unauthenticated
        );
        assert_eq!(kind("/pdvault.v1.Vault/GetRecord"), Kind::Service);
    }

    #[test]
    fn request_ids_are_bounded_and_printable() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!valid_request_id(&HeaderValue::from_str(&long).unwrap()));
        let generated = new_request_id();
        assert!(valid_request_id(&generated));
        assert_ne!(generated, new_request_id());
    }

    /// A service that answers OK when `release` fires.
    fn held(
        release: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>,
    > + Clone {
        tower::service_fn(move |_: http::Request<()>| {
            let release = Arc::clone(&release);
            Box::pin(async move {
                release.notified().await;
                Ok(http::Response::new(tonic::body::Body::default()))
            }) as BoxFuture<_, _>
        })
    }

    #[tokio::test]
    async fn timed_out_calls_carry_their_reason() {
        use tower::ServiceExt;
        let live = LiveLimits::new(&LimitsConfig {
            request_timeout_ms: 10,
            ..LimitsConfig::default()
        });
        let release = Arc::new(tokio::sync::Notify::new());
        let mut timed = TimeoutLayer::new(&live).layer(held(release));
        let late = timed
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        let status = Status::from_header_map(late.headers()).expect("a grpc-status");
        assert_eq!(
            reason(&status),
            (tonic::Code::DeadlineExceeded, "REQUEST_TIMEOUT".to_owned())
        );
    }
}
