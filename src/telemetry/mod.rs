//! Logging setup, and the per-call layer that gives every gRPC call a request id, a span,
//! a completion log line and its request metrics; the metrics themselves in `metrics.rs`.
//!
//! Low in the module graph (it needs only `config` and `domain::edge`), so that every layer
//! that counts something (audit, vault, grpc, app) can reach the metric hooks.
//!
//! Logs carry caller names, record ids, purposes, reasons and request ids: never identity
//! values, which no code path formats into a log line (identity types redact their `Debug`),
//! and never request or response bodies, which this layer does not look at.

pub mod metrics;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderValue;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

/// The metadata key a request id travels in, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest client-chosen request id kept; longer or non-printable ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = crate::domain::edge::MAX_REQUEST_ID_BYTES;

/// Marks a request whose client sent an `x-request-id` that is not printable ASCII of at
/// most [`MAX_REQUEST_ID_LEN`] bytes: it was replaced by a generated one here, and the
/// pdvault services refuse the call as `INVALID_ARGUMENT` (the value itself goes nowhere).
#[derive(Clone, Copy, Debug)]
pub struct ClientRequestIdRefused;

/// Installs the global subscriber; later calls are ignored (tests build many apps).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

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

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
