//! Limits that keep one caller, or a flood of calls, from taking the vault down: a deadline
//! per call, caps on calls in flight with load shedding, a rate per caller and a rate per
//! peer address for calls that prove no identity.
//!
//! This file holds the limits and their state; the layers that apply them are in
//! `admission.rs`, with every other layer a call passes: the caps and rates in the admission
//! layer, which authenticates a call before it may take a slot, and the deadline in the
//! timeout layer. Both read them from [`LiveLimits`], which a policy reload replaces. Each refusal is
//! a [`LimitError`], answered with its own gRPC status (`DEADLINE_EXCEEDED`, `UNAVAILABLE`,
//! `RESOURCE_EXHAUSTED`, made in `status.rs`) so clients can tell "retry later" from a bug.
//! Shedding refuses at once instead of queueing: a queue in front of a saturated database
//! only turns overload into timeouts for everyone. Caller buckets are keyed on names from
//! configuration and peer buckets are pruned, so their memory stays bounded.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;

/// What the limits refuse a call for. Each becomes its gRPC status (code and ErrorInfo
/// reason: `OVERLOADED`, `RATE_LIMITED`, `REQUEST_TIMEOUT`) in `status.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Every slot of a cap is taken: shed at once rather than queue.
    #[error("server is at its concurrency limit; retry with backoff")]
    Overloaded,
    /// The caller, or the address, already has its most calls in flight.
    #[error("too many calls in flight from this caller or address; retry later")]
    InFlight,
    /// The caller spent its rate (`limits.caller_requests_per_minute`).
    #[error("caller rate limit exceeded; retry later")]
    CallerRate,
    /// The address spent its rate of calls without a valid credential.
    #[error("too many unauthenticated calls from this address; retry later")]
    PeerRate,
    /// The call ran past `limits.request_timeout_ms`.
    #[error("the call exceeded the server's timeout")]
    Timeout,
}

/// A cap on calls in flight: a call over the cap is refused with `UNAVAILABLE` at once.
#[derive(Clone)]
pub struct Permits {
    permits: Arc<Semaphore>,
}

impl Permits {
    pub fn new(max_in_flight: usize) -> Permits {
        Permits {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    /// A slot, held until the permit is dropped, or the load-shedding refusal.
    pub fn try_take(&self) -> Result<OwnedSemaphorePermit, LimitError> {
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| LimitError::Overloaded)
    }
}

/// A cap on each authenticated caller's calls in flight, taken before the request message
/// is read and held until the response ends: without it one credential could have every
/// stream of every connection it opens buffer a message at once, and take every slot of
/// `max_concurrent_requests`. Counts are keyed by caller name (from configuration), and a
/// caller with nothing in flight has no entry, so memory stays bounded.
#[derive(Clone)]
pub struct CallerInFlight {
    /// 0: no cap.
    max: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl CallerInFlight {
    pub fn new(max: usize) -> CallerInFlight {
        CallerInFlight {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for one more call of `caller`, held until dropped, or the refusal
    /// (`RESOURCE_EXHAUSTED` / `RATE_LIMITED`: the caller's own load, retry later).
    pub fn try_take(&self, caller: &str) -> Result<CallerSlot, LimitError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(caller.to_owned()).or_insert(0);
        if self.max != 0 && *count >= self.max {
            return Err(LimitError::InFlight);
        }
        *count += 1;
        Ok(CallerSlot {
            caller: caller.to_owned(),
            held: Arc::clone(&self.held),
        })
    }

    /// How many calls `caller` has in flight.
    pub fn in_flight(&self, caller: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(caller).copied().unwrap_or(0)
    }
}

/// One call's place in its caller's in-flight count.
pub struct CallerSlot {
    caller: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

/// The per-call limits in force: rates, slot caps and the read deadline, which the
/// admission layer reads per call.
pub struct CallLimits {
    pub callers: Arc<CallerRateLimiter>,
    pub peers: Arc<PeerRateLimiter>,
    pub permits: Permits,
    pub unauthenticated: Permits,
    pub per_caller: CallerInFlight,
    /// Each address's share of `unauthenticated` ([`unauthenticated_share`]).
    pub unauthenticated_per_peer: CallerInFlight,
    pub read_timeout: Duration,
    /// The settings these were built from, to tell on reload what changed.
    config: LimitsConfig,
}

/// The `limits` a policy reload may change while the vault runs, swapped whole like the
/// policy. What is unchanged is kept as it is (a caller's bucket keeps its tokens); a
/// changed rate starts with fresh buckets, and a changed cap with a fresh count, so calls
/// in flight at the reload are not counted against the new cap. The listener-level limits
/// (`max_message_bytes`, `max_streams_per_connection`, `max_connections_per_peer`,
/// `idle_timeout_ms`) are fixed at start ([`FIXED_LIMITS`]).
pub struct LiveLimits {
    current: ArcSwap<CallLimits>,
    request_timeout_ms: Arc<AtomicU64>,
}

/// The `limits` keys only a restart can change: they are built into the listener, the
/// HTTP/2 settings or the services' decoders.
pub const FIXED_LIMITS: [&str; 4] = [
    "max_message_bytes",
    "max_streams_per_connection",
    "max_connections_per_peer",
    "idle_timeout_ms",
];

impl LiveLimits {
    pub fn new(config: &LimitsConfig) -> LiveLimits {
        LiveLimits {
            current: ArcSwap::from_pointee(CallLimits::build(config, None)),
            request_timeout_ms: Arc::new(AtomicU64::new(config.request_timeout_ms)),
        }
    }

    /// The limits in force now.
    pub fn current(&self) -> Arc<CallLimits> {
        self.current.load_full()
    }

    /// The call timeout in force, in milliseconds: shared with the timeout layer
    /// (`admission::TimeoutLayer`), which reads it per call, so a reload changes it for the
    /// next call.
    pub fn request_timeout_ms(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.request_timeout_ms)
    }

    /// Puts `config`'s per-call limits in force for the next call.
    pub fn replace(&self, config: &LimitsConfig) {
        let running = self.current.load_full();
        self.current
            .store(Arc::new(CallLimits::build(config, Some(&running))));
        self.request_timeout_ms
            .store(config.request_timeout_ms, Ordering::Relaxed);
    }
}

impl CallLimits {
    /// Limits for `config`, reusing from `running` what `config` does not change.
    fn build(config: &LimitsConfig, running: Option<&CallLimits>) -> CallLimits {
        let old = running.map(|running| &running.config);
        let kept = |same: &dyn Fn(&LimitsConfig) -> bool| old.is_some_and(same);
        let callers = match running {
            Some(running)
                if kept(&|old| {
                    old.caller_requests_per_minute == config.caller_requests_per_minute
                        && old.caller_burst == config.caller_burst
                }) =>
            {
                Arc::clone(&running.callers)
            }
            _ => Arc::new(CallerRateLimiter::new(config)),
        };
        let peers = match running {
            Some(running)
                if kept(&|old| {
                    old.unauthenticated_requests_per_minute
                        == config.unauthenticated_requests_per_minute
                        && old.unauthenticated_burst == config.unauthenticated_burst
                }) =>
            {
                Arc::clone(&running.peers)
            }
            _ => Arc::new(PeerRateLimiter::new(config)),
        };
        let permits = match running {
            Some(running)
                if kept(&|old| old.max_concurrent_requests == config.max_concurrent_requests) =>
            {
                running.permits.clone()
            }
            _ => Permits::new(config.max_concurrent_requests),
        };
        let unauthenticated = match running {
            Some(running)
                if kept(&|old| {
                    old.max_unauthenticated_requests == config.max_unauthenticated_requests
                }) =>
            {
                running.unauthenticated.clone()
            }
            _ => Permits::new(config.max_unauthenticated_requests),
        };
        let unauthenticated_per_peer = match running {
            Some(running)
                if kept(&|old| {
                    old.max_unauthenticated_requests == config.max_unauthenticated_requests
                }) =>
            {
                running.unauthenticated_per_peer.clone()
            }
            _ => CallerInFlight::new(unauthenticated_share(config.max_unauthenticated_requests)),
        };
        let per_caller = match running {
            Some(running)
                if kept(&|old| old.max_in_flight_per_caller == config.max_in_flight_per_caller) =>
            {
                running.per_caller.clone()
            }
            _ => CallerInFlight::new(config.max_in_flight_per_caller),
        };
        CallLimits {
            callers,
            peers,
            permits,
            unauthenticated,
            per_caller,
            unauthenticated_per_peer,
            read_timeout: Duration::from_millis(config.request_read_timeout_ms.max(1)),
            config: config.clone(),
        }
    }
}

/// The address a peer is counted under, for its rate bucket and its connection slots alike.
/// An IPv6 address stands for its /64, the block one host usually holds, so a host cannot
/// dodge a per-peer limit by walking its addresses; an IPv4-mapped IPv6 address is the IPv4
/// peer it maps, so a dual-stack listener counts that peer once.
/// How many of the `max_unauthenticated_requests` streams (reflection, health `Watch`) one
/// address (IPv4, or IPv6 /64: [`peer_key`]) may hold at once: a quarter, at least one, so
/// a single peer that keeps its streams open cannot take the whole budget.
pub fn unauthenticated_share(max_unauthenticated_requests: usize) -> usize {
    (max_unauthenticated_requests / 4).max(1)
}

pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// One token bucket per peer address, for calls that prove no identity: refused
/// credentials and reflection. IPv6 peers share a bucket per /64, the block one host
/// usually holds, so a host cannot dodge its bucket by walking its addresses.
pub struct PeerRateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Buckets kept before idle ones are dropped: keeps memory bounded against address sprays.
const MAX_PEER_BUCKETS: usize = 100_000;

impl PeerRateLimiter {
    pub fn new(config: &LimitsConfig) -> PeerRateLimiter {
        let limiter =
            NonZeroU32::new(config.unauthenticated_requests_per_minute).map(|per_minute| {
                let burst =
                    NonZeroU32::new(config.unauthenticated_burst).unwrap_or(NonZeroU32::MIN);
                governor::RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst))
            });
        PeerRateLimiter { limiter }
    }

    /// Whether `peer` may make one more unauthenticated call now. Calls whose peer is not
    /// known (not over TCP) share one bucket.
    pub fn check(&self, peer: Option<IpAddr>) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        if limiter.len() > MAX_PEER_BUCKETS {
            limiter.retain_recent();
        }
        let key = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), peer_key);
        limiter.check_key(&key).is_ok()
    }
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
    use tonic::Status;

    use super::*;

    #[test]
    fn each_caller_has_its_own_in_flight_cap() {
        let cap = CallerInFlight::new(2);
        let first = cap.try_take("claims").unwrap();
        let _second = cap.try_take("claims").unwrap();
        let refused = Status::from(cap.try_take("claims").err().unwrap());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let _other = cap
            .try_take("login")
            .expect("another caller has its own count");
        drop(first);
        assert_eq!(cap.in_flight("claims"), 1);
        let _again = cap
            .try_take("claims")
            .expect("a finished call frees its place");
        let off = CallerInFlight::new(0);
        let held: Vec<_> = (0..1000).map(|_| off.try_take("claims").unwrap()).collect();
        assert_eq!(off.in_flight("claims"), 1000, "0 is no cap");
        drop(held);
        assert!(
            off.held.lock().unwrap().is_empty(),
            "idle callers leave no entry"
        );
    }

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

    #[test]
    fn a_reload_keeps_what_it_does_not_change() {
        let config = LimitsConfig {
            caller_requests_per_minute: 1,
            caller_burst: 1,
            ..LimitsConfig::default()
        };
        let live = LiveLimits::new(&config);
        assert!(live.current().callers.check("a"));
        assert!(!live.current().callers.check("a"));
        // Another setting changes: the bucket keeps its state.
        live.replace(&LimitsConfig {
            request_read_timeout_ms: 5,
            ..config.clone()
        });
        assert!(!live.current().callers.check("a"));
        assert_eq!(live.current().read_timeout, Duration::from_millis(5));
        // The rate changes: fresh buckets at the new rate; the cap changes too.
        live.replace(&LimitsConfig {
            caller_burst: 3,
            max_concurrent_requests: 1,
            request_timeout_ms: 7,
            ..config
        });
        let current = live.current();
        assert!((0..3).all(|_| current.callers.check("a")));
        assert!(!current.callers.check("a"));
        let slot = current.permits.try_take().unwrap();
        assert!(current.permits.try_take().is_err());
        drop(slot);
        assert_eq!(live.request_timeout_ms.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn unauthenticated_calls_are_limited_per_address_and_ipv6_per_64() {
        let limiter = PeerRateLimiter::new(&LimitsConfig {
            unauthenticated_requests_per_minute: 1,
            unauthenticated_burst: 1,
            ..LimitsConfig::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limiter.check(Some(a)));
        assert!(!limiter.check(Some(a)));
        assert!(limiter.check(Some("192.0.2.2".parse().unwrap())));
        assert!(limiter.check(Some("2001:db8::1".parse().unwrap())));
        assert!(
            !limiter.check(Some("2001:db8::ffff:2".parse().unwrap())),
            "the same /64"
        );
        assert!(limiter.check(Some("2001:db8:0:1::1".parse().unwrap())));
        assert!(
            !limiter.check(Some("::ffff:192.0.2.1".parse().unwrap())),
            "mapped v4"
        );
    }

    #[test]
    fn shed_calls_carry_their_reason() {
        let permits = Permits::new(1);
        let taken = permits.try_take().unwrap();
        let shed = Status::from(permits.try_take().unwrap_err());
        assert_eq!(shed.code(), tonic::Code::Unavailable);
        assert_eq!(
            reason_of(&shed.into_http()),
            (tonic::Code::Unavailable, "OVERLOADED".to_owned())
        );
        drop(taken);
        assert!(permits.try_take().is_ok());
    }
}
