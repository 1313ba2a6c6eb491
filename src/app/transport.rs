//! The connections the gRPC server accepts: how many one peer may hold, how long a silent one
//! lives, and what happens when the process runs out of file descriptors.
//!
//! Every descriptor is a connection someone else opened, so nothing here trusts the peer to
//! close it: a connection whose peer sends nothing for `limits.idle_timeout_ms` is closed
//! (live HTTP/2 clients answer the server's pings, which counts), TCP keepalive finds peers
//! that vanished without a FIN, and one peer may hold at most
//! `limits.max_connections_per_peer` (an IPv4 address, or an IPv6 /64: see
//! [`crate::grpc::limits::peer_key`]). When `accept` fails because descriptors ran out
//! (EMFILE/ENFILE), the listener logs it and backs off instead of spinning on the error, so
//! calls already in flight keep the descriptors they need (a database connection, a file).
//!
//! Per-call limits (authentication before a slot, read deadlines) are the admission layer's
//! ([`crate::grpc::admission`]); this module knows nothing of gRPC.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::LimitsConfig;
use crate::grpc::limits::peer_key;

/// Idle time before the kernel's first TCP keepalive probe, and between probes.
const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Back-off after `accept` failed for lack of descriptors: doubling up to the maximum.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Refused connections and failed accepts are logged at most this often (with how many
/// went unlogged): a flood of them must not become a flood of log lines.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one log line through per [`LOG_INTERVAL`], counting the ones it held back.
#[derive(Default)]
struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(held back since the last line)` when this event may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now - last < LOG_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Connection settings derived from [`LimitsConfig`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub idle_timeout: Duration,
    pub max_per_peer: usize,
}

impl ConnectionLimits {
    pub fn from_config(limits: &LimitsConfig) -> ConnectionLimits {
        ConnectionLimits {
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms.max(100)),
            max_per_peer: limits.max_connections_per_peer,
        }
    }

    /// How often the server pings a client over HTTP/2, and how long it waits for the
    /// acknowledgement: a third of the idle limit each, so a live client's answers reach the
    /// server well before its connection would count as silent.
    pub fn http2_keepalive(&self) -> Duration {
        self.idle_timeout / 3
    }
}

/// The accepted connections, as the stream tonic serves.
pub struct Incoming {
    listener: TcpListener,
    limits: ConnectionLimits,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    backoff: Option<Pin<Box<Sleep>>>,
    next_backoff: Duration,
    refused_log: LogThrottle,
    exhausted_log: LogThrottle,
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> Incoming {
        Incoming {
            listener,
            limits,
            peers: Arc::default(),
            backoff: None,
            next_backoff: ACCEPT_BACKOFF_MIN,
            refused_log: LogThrottle::default(),
            exhausted_log: LogThrottle::default(),
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it holds its share. Peers are
    /// counted under [`peer_key`], as the unauthenticated rate limiter counts them: a host
    /// with an IPv6 /64 would otherwise open unbounded connections from its 2^64 addresses.
    fn admit(&self, ip: IpAddr) -> Option<PeerSlot> {
        let ip = peer_key(ip);
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let held = peers.entry(ip).or_insert(0);
        if self.limits.max_per_peer != 0 && *held >= self.limits.max_per_peer {
            return None;
        }
        *held += 1;
        Some(PeerSlot {
            ip,
            peers: Arc::clone(&self.peers),
        })
    }

    fn accepted(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<Connection> {
        let Some(slot) = self.admit(peer.ip()) else {
            crate::telemetry::metrics::record_denial("CONNECTION_LIMIT");
            if let Some(unlogged) = self.refused_log.allow(Instant::now()) {
                tracing::warn!(
                    peer = %peer.ip(),
                    limit = self.limits.max_per_peer,
                    unlogged,
                    "connection refused: the peer holds its share of connections"
                );
            }
            return None;
        };
        // Nagle against the peer's delayed ACK stalls a small gRPC response for up to 40 ms.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_TIME)
            .with_interval(TCP_KEEPALIVE_INTERVAL);
        if let Err(error) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(%error, "cannot set TCP keepalive");
        }
        let local = stream.local_addr().ok();
        Some(Connection {
            stream,
            info: TcpConnectInfo {
                local_addr: local,
                remote_addr: Some(peer),
            },
            idle_timeout: self.limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
            _slot: slot,
        })
    }
}

/// Whether an `accept` error means the process or system ran out of descriptors.
pub fn out_of_descriptors(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
                || code == rustix::io::Errno::NFILE.raw_os_error()
        )
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
    }
}

impl Stream for Incoming {
    type Item = Result<Connection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                std::task::ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, peer))) => {
                    self.next_backoff = ACCEPT_BACKOFF_MIN;
                    if let Some(connection) = self.accepted(stream, peer) {
                        return Poll::Ready(Some(Ok(connection)));
                    }
                }
                Poll::Ready(Err(error)) if out_of_descriptors(&error) => {
                    let wait = self.next_backoff;
                    crate::telemetry::metrics::record_denial("DESCRIPTORS_EXHAUSTED");
                    if let Some(unlogged) = self.exhausted_log.allow(Instant::now()) {
                        tracing::error!(
                            %error,
                            backoff_ms = wait.as_millis() as u64,
                            unlogged,
                            "cannot accept connections: out of file descriptors (raise LimitNOFILE)"
                        );
                    }
                    self.next_backoff = (wait * 2).min(ACCEPT_BACKOFF_MAX);
                    self.backoff = Some(Box::pin(tokio::time::sleep(wait)));
                }
                // A connection reset before it was accepted and the like: that peer's
                // problem, not the listener's.
                Poll::Ready(Err(error)) => tracing::debug!(%error, "accept failed"),
            }
        }
    }
}

/// Releases a peer's connection slot when its connection is dropped.
struct PeerSlot {
    ip: IpAddr,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = peers.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection that fails its reads once the peer has been silent for the idle
/// limit, which makes the server drop it.
pub struct Connection {
    stream: TcpStream,
    info: TcpConnectInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: PeerSlot,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let deadline = Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::debug!(peer = ?this.info.remote_addr, "closing a silent connection");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the idle limit",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_exhaustion_is_told_apart_from_other_accept_errors() {
        #[cfg(unix)]
        {
            let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
            let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
            assert!(out_of_descriptors(&emfile));
            assert!(out_of_descriptors(&enfile));
        }
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert!(!out_of_descriptors(&reset));
    }

    #[test]
    fn log_lines_are_throttled() {
        let start = Instant::now();
        let mut throttle = LogThrottle::default();
        assert_eq!(throttle.allow(start), Some(0));
        assert_eq!(throttle.allow(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.allow(start + Duration::from_secs(9)), None);
        assert_eq!(
            throttle.allow(start + LOG_INTERVAL),
            Some(2),
            "the held-back lines are counted"
        );
        assert_eq!(throttle.allow(start + LOG_INTERVAL), None);
    }

    #[tokio::test]
    async fn a_peer_gets_its_share_of_connections_and_no_more() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let incoming = Incoming::new(
            listener,
            ConnectionLimits {
                idle_timeout: Duration::from_secs(5),
                max_per_peer: 2,
            },
        );
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let first = incoming.admit(ip).unwrap();
        let _second = incoming.admit(ip).unwrap();
        assert!(incoming.admit(ip).is_none());
        assert!(incoming.admit("192.0.2.8".parse().unwrap()).is_some());
        drop(first);
        assert!(
            incoming.admit(ip).is_some(),
            "a closed connection frees its slot"
        );
    }

    #[tokio::test]
    async fn an_ipv6_64_and_a_v4_mapped_peer_are_counted_as_one_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let incoming = Incoming::new(
            listener,
            ConnectionLimits {
                idle_timeout: Duration::from_secs(5),
                max_per_peer: 2,
            },
        );
        // Walking the interface identifier within one /64 gets no extra slots.
        let first = incoming.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _second = incoming
            .admit("2001:db8:1:2:ffff:ffff:ffff:fffe".parse().unwrap())
            .unwrap();
        assert!(incoming.admit("2001:db8:1:2::3".parse().unwrap()).is_none());
        assert!(
            incoming.admit("2001:db8:1:3::1".parse().unwrap()).is_some(),
            "the next /64 is another peer"
        );
        drop(first);
        assert!(
            incoming
                .admit("2001:db8:1:2::99".parse().unwrap())
                .is_some(),
            "a closed connection frees the /64's slot"
        );

        // The v4-mapped form of an IPv4 peer shares that peer's slots.
        let _v4 = incoming.admit("192.0.2.7".parse().unwrap()).unwrap();
        let _mapped = incoming.admit("::ffff:192.0.2.7".parse().unwrap()).unwrap();
        assert!(incoming.admit("192.0.2.7".parse().unwrap()).is_none());
        assert!(
            incoming
                .admit("::ffff:192.0.2.7".parse().unwrap())
                .is_none()
        );
        let peers = incoming.peers.lock().unwrap();
        assert_eq!(
            peers.len(),
            2,
            "one count for the /64, one for the IPv4 peer"
        );
        assert_eq!(peers[&"2001:db8:1:2::".parse::<IpAddr>().unwrap()], 1);
        assert_eq!(peers[&"192.0.2.7".parse::<IpAddr>().unwrap()], 2);
    }

    #[test]
    fn peers_are_keyed_by_ipv4_address_and_ipv6_64() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::"), "2001:db8:1:2::");
        assert_eq!(key("::1"), "::");
    }
}
