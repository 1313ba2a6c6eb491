//! Limits that keep one caller, or a flood of calls, from taking the vault down: a deadline
//! per call, a global cap on calls in flight with load shedding, and a per-caller rate.
//!
//! The deadline and the cap are tower layers around every gRPC service, and answer with a
//! proper gRPC status themselves (`DEADLINE_EXCEEDED`, `UNAVAILABLE`) so clients can tell
//! "retry later" from a bug. Shedding refuses at once instead of queueing: a queue in front of
//! a saturated database only turns overload into timeouts for everyone. The per-caller rate
//! needs the authenticated caller, so the gRPC layer consults [`CallerRateLimiter`] right
//! after authentication; keying it on names from configuration keeps its memory bounded.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::Semaphore;
use tonic::Status;
use tower::{Layer, Service};

use crate::config::LimitsConfig;

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Caps the calls in flight across all connections; a call over the cap is refused with
/// `UNAVAILABLE` at once.
#[derive(Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimitLayer {
    pub fn new(max_in_flight: usize) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

#[derive(Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ConcurrencyLimit<S>
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
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            crate::metrics::record_denial("OVERLOADED");
            return Box::pin(async {
                Ok(with_reason(
                    tonic::Code::Unavailable,
                    "server is at its concurrency limit; retry with backoff",
                    "OVERLOADED",
                )
                .into_http())
            });
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(permit);
            response
        })
    }
}

/// Fails a call that runs longer than the configured timeout with `DEADLINE_EXCEEDED`,
/// dropping (and so cancelling) its handler.
#[derive(Clone)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    pub fn new(timeout: Duration) -> TimeoutLayer {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
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
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, future).await {
                Ok(response) => response,
                Err(_) => {
                    tracing::warn!(timeout_ms = timeout.as_millis() as u64, "call timed out");
                    Ok(with_reason(
                        tonic::Code::DeadlineExceeded,
                        "the call exceeded the server's timeout",
                        "REQUEST_TIMEOUT",
                    )
                    .into_http())
                }
            }
        })
    }
}

/// A status the layers answer with themselves, with its ErrorInfo reason (domain `pdvault`)
/// like every other error of the service.
fn with_reason(code: tonic::Code, message: &str, reason: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(
            reason,
            crate::grpc::ERROR_DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}

/// One token bucket per authenticated caller name.
pub struct CallerRateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl CallerRateLimiter {
    pub fn new(config: &LimitsConfig) -> CallerRateLimiter {
        let limiter = NonZeroU32::new(config.caller_requests_per_minute).map(|per_minute| {
            let burst = NonZeroU32::new(config.caller_burst).unwrap_or(NonZeroU32::MIN);
            governor::RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst))
        });
        CallerRateLimiter { limiter }
    }

    /// No limit at all.
    pub fn unlimited() -> CallerRateLimiter {
        CallerRateLimiter { limiter: None }
    }

    /// Whether `caller` may make one more call now.
    pub fn check(&self, caller: &str) -> bool {
        match &self.limiter {
            None => true,
            Some(limiter) => limiter.check_key(&caller.to_owned()).is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_bucket() {
        let limiter = CallerRateLimiter::new(&LimitsConfig {
            caller_requests_per_minute: 1,
            caller_burst: 2,
            ..LimitsConfig::default()
        });
        assert!(limiter.check("a"));
        assert!(limiter.check("a"));
        assert!(!limiter.check("a"), "burst of 2 spent");
        assert!(limiter.check("b"), "b is not charged for a's calls");
        let off = CallerRateLimiter::new(&LimitsConfig {
            caller_requests_per_minute: 0,
            ..LimitsConfig::default()
        });
        assert!((0..1000).all(|_| off.check("a")));
    }

    fn reason_of(response: &http::Response<tonic::body::Body>) -> (tonic::Code, String) {
        use tonic_types::StatusExt;
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        let reason = status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default();
        (status.code(), reason)
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
    async fn shed_and_timed_out_calls_carry_their_reasons() {
        use tower::ServiceExt;
        let release = Arc::new(tokio::sync::Notify::new());
        let mut capped = ConcurrencyLimitLayer::new(1).layer(held(Arc::clone(&release)));
        let first = capped.ready().await.unwrap().call(http::Request::new(()));
        let shed = capped
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(
            reason_of(&shed),
            (tonic::Code::Unavailable, "OVERLOADED".to_owned())
        );
        release.notify_one();
        first.await.unwrap();

        let mut timed = TimeoutLayer::new(Duration::from_millis(10)).layer(held(release));
        let late = timed
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(
            reason_of(&late),
            (tonic::Code::DeadlineExceeded, "REQUEST_TIMEOUT".to_owned())
        );
    }
}
