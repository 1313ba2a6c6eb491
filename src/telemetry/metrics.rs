//! Prometheus metrics: the recorder, the HTTP listener that serves them, and one function per
//! thing the vault counts, so every metric name and label set is written down here once.
//!
//! Labels are RPC names, status codes, purpose names, release levels, reasons and key
//! versions: all from a fixed or configured vocabulary. Never a caller's identity, a token, a
//! record id or a request id: a label leaks to every dashboard, and unbounded label values
//! would also grow the registry without limit.
//!
//! The listener is separate from gRPC so that scraping needs neither TLS client
//! certificates nor a token, and cannot be used to reach the vault's data.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Buckets for latencies, in seconds: from a cached read to a stalled database.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for audit group-commit batch sizes, in events.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const MAX_HTTP_REQUEST: usize = 8 * 1024;

/// The gRPC methods served, as metric labels; anything else a client sends is "unknown".
const KNOWN_METHODS: &[&str] = &[
    "/pdvault.v1.Vault/CreateRecord",
    "/pdvault.v1.Vault/GetRecord",
    "/pdvault.v1.Vault/UpdateRecord",
    "/pdvault.v1.Vault/DeleteRecord",
    "/pdvault.v1.Vault/FindRecords",
    "/pdvault.v1.Vault/CheckAccount",
    "/pdvault.v1.Admin/ReloadPolicy",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Installs the process-wide recorder on first use and returns a handle that renders it.
/// Every application in a process shares it (tests start many).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("pdvault_audit_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "pdvault_grpc_requests_total",
        "gRPC calls by method and status code"
    );
    metrics::describe_histogram!(
        "pdvault_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "gRPC call latency by method"
    );
    metrics::describe_counter!(
        "pdvault_released_fields_total",
        "Identity fields released, by purpose and release level"
    );
    metrics::describe_counter!("pdvault_denials_total", "Refused calls by reason");
    metrics::describe_histogram!(
        "pdvault_audit_batch_size",
        "Audit events committed per group commit"
    );
    metrics::describe_histogram!(
        "pdvault_audit_flush_duration_seconds",
        metrics::Unit::Seconds,
        "Time to durably commit one audit batch"
    );
    metrics::describe_gauge!(
        "pdvault_rewrap_records_remaining",
        "Records whose data key still awaits re-wrapping"
    );
    metrics::describe_counter!(
        "pdvault_rewrapped_records_total",
        "Records whose data key was re-wrapped under a newer key version"
    );
    metrics::describe_gauge!(
        "pdvault_key_version_records",
        "Records whose data key is wrapped under each key-encryption-key version"
    );
    metrics::describe_gauge!(
        "pdvault_active_key_version",
        "The key-encryption-key version new records are wrapped under"
    );
    metrics::describe_counter!(
        "pdvault_audit_checkpoints_total",
        "Audit checkpoints this instance signed and stored"
    );
    metrics::describe_counter!(
        "pdvault_audit_checkpoint_refusals_total",
        "Checkpoints refused because the database does not continue from what was signed"
    );
    metrics::describe_counter!(
        "pdvault_audit_witness_failures_total",
        "Checkpoints that could not be appended to the witness sink"
    );
    metrics::describe_gauge!(
        "pdvault_audit_checkpoint_age_seconds",
        metrics::Unit::Seconds,
        "Age of the newest checkpoint this instance signed"
    );
    metrics::describe_gauge!(
        "pdvault_audit_checkpoint_stale",
        "1 when the newest checkpoint is older than twice the checkpoint interval"
    );
    metrics::describe_gauge!(
        "pdvault_audit_signer_alarm",
        "1 while the signer refuses to sign (the audit trail does not continue from what it signed)"
    );
    metrics::describe_gauge!(
        "pdvault_audit_witness_failing",
        "1 while checkpoints cannot be appended to the witness sink"
    );
}

/// The metric label for a request path: a known method, or "unknown".
pub fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| **known == path)
        .copied()
        .unwrap_or("unknown")
}

/// One finished gRPC call.
pub fn record_request(method: &'static str, code: tonic::Code, elapsed: Duration) {
    let code = format!("{code:?}");
    counter!("pdvault_grpc_requests_total", "method" => method, "code" => code).increment(1);
    histogram!("pdvault_grpc_request_duration_seconds", "method" => method)
        .record(elapsed.as_secs_f64());
}

/// A release under a granted (so configured) purpose: one count per field, by level.
pub fn record_release<'a>(purpose: &str, levels: impl IntoIterator<Item = &'a str>) {
    for level in levels {
        counter!(
            "pdvault_released_fields_total",
            "purpose" => purpose.to_owned(),
            "level" => level.to_owned()
        )
        .increment(1);
    }
}

/// A refused call; `reason` is one of the ErrorInfo reasons or a limit's name.
pub fn record_denial(reason: &'static str) {
    counter!("pdvault_denials_total", "reason" => reason).increment(1);
}

/// Hook for the audit writer: one group commit of `events` events.
pub fn record_audit_batch(events: usize) {
    histogram!("pdvault_audit_batch_size").record(events as f64);
}

/// Hook for the audit writer: how long one batch took to become durable.
pub fn record_audit_flush(elapsed: Duration) {
    histogram!("pdvault_audit_flush_duration_seconds").record(elapsed.as_secs_f64());
}

/// Hook for key rotation: `rewrapped` more records done, `remaining` still to go.
pub fn record_rewrap_progress(rewrapped: u64, remaining: u64) {
    counter!("pdvault_rewrapped_records_total").increment(rewrapped);
    gauge!("pdvault_rewrap_records_remaining").set(remaining as f64);
}

/// Hook for key rotation: how many records each key version wraps, and which is active.
pub fn record_key_versions(active: u32, records_per_version: &[(u32, u64)]) {
    gauge!("pdvault_active_key_version").set(f64::from(active));
    for (version, records) in records_per_version {
        gauge!("pdvault_key_version_records", "version" => version.to_string())
            .set(*records as f64);
    }
}

/// Hook for the checkpoint signer: one checkpoint signed and stored.
pub fn record_checkpoint_signed(signer: &str) {
    counter!("pdvault_audit_checkpoints_total", "signer" => signer.to_owned()).increment(1);
}

/// Hook for the checkpoint signer: it refused to sign (`reason` from a fixed list).
pub fn record_checkpoint_refused(signer: &str, reason: &'static str) {
    counter!(
        "pdvault_audit_checkpoint_refusals_total",
        "signer" => signer.to_owned(),
        "reason" => reason
    )
    .increment(1);
}

/// Hook for the checkpoint signer: appending to the witness sink failed.
pub fn record_witness_failure(signer: &str) {
    counter!("pdvault_audit_witness_failures_total", "signer" => signer.to_owned()).increment(1);
}

/// What health and metrics report about the signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerHealth {
    pub signer: String,
    /// Since the newest checkpoint this instance signed (or since it started, before one).
    pub age: Duration,
    /// Older than twice the checkpoint interval.
    pub stale: bool,
    /// The refusal that stopped signing, until a checkpoint succeeds again.
    pub alarm: Option<String>,
    /// Why the last append to the witness sink failed, until one succeeds again.
    pub witness_failure: Option<String>,
}

impl SignerHealth {
    pub fn ok(&self) -> bool {
        !self.stale && self.alarm.is_none() && self.witness_failure.is_none()
    }
}

/// Hook for the health monitor: the signer's newest checkpoint's age and alarms. The
/// signer id is the label (`sgn_…`, one per instance), so instances sharing a recorder (and
/// a dashboard) stay apart.
pub fn record_checkpoint_health(health: &SignerHealth) {
    let signer = health.signer.clone();
    gauge!("pdvault_audit_checkpoint_age_seconds", "signer" => signer.clone())
        .set(health.age.as_secs_f64());
    gauge!("pdvault_audit_checkpoint_stale", "signer" => signer.clone())
        .set(f64::from(u8::from(health.stale)));
    gauge!("pdvault_audit_signer_alarm", "signer" => signer.clone())
        .set(f64::from(u8::from(health.alarm.is_some())));
    gauge!("pdvault_audit_witness_failing", "signer" => signer)
        .set(f64::from(u8::from(health.witness_failure.is_some())));
}

/// Serves `GET /metrics` on `listener` until the task is dropped. HTTP/1 with one request
/// per connection: all a Prometheus scraper needs, without another HTTP stack.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let exchange = answer(stream, &handle);
            if tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .is_err()
            {
                tracing::debug!("metrics scrape timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) {
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_HTTP_REQUEST {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let request_line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, content_type, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            handle.run_upkeep();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            )
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_collapse_to_one_label() {
        assert_eq!(
            method_label("/pdvault.v1.Vault/GetRecord"),
            "/pdvault.v1.Vault/GetRecord"
        );
        assert_eq!(method_label("/pdvault.v1.Vault/zhangsan"), "unknown");
    }

    #[test]
    fn hooks_render_in_prometheus_format() {
        let handle = install();
        record_audit_batch(7);
        record_audit_flush(Duration::from_millis(3));
        record_rewrap_progress(5, 95);
        record_key_versions(2, &[(1, 95), (2, 5)]);
        record_checkpoint_refused("sgn_unit", "chain_cut");
        record_checkpoint_health(&SignerHealth {
            signer: "sgn_unit".into(),
            age: Duration::from_secs(150),
            stale: true,
            alarm: Some("chain cut".into()),
            witness_failure: None,
        });
        let text = handle.render();
        for expected in [
            "pdvault_audit_batch_size_bucket{le=\"8\"}",
            "pdvault_audit_flush_duration_seconds_bucket",
            "pdvault_rewrapped_records_total",
            "pdvault_rewrap_records_remaining 95",
            "pdvault_key_version_records{version=\"1\"} 95",
            "pdvault_active_key_version 2",
            "pdvault_audit_checkpoint_refusals_total{signer=\"sgn_unit\",reason=\"chain_cut\"} 1",
            "pdvault_audit_checkpoint_age_seconds{signer=\"sgn_unit\"} 150",
            "pdvault_audit_checkpoint_stale{signer=\"sgn_unit\"} 1",
            "pdvault_audit_signer_alarm{signer=\"sgn_unit\"} 1",
            "pdvault_audit_witness_failing{signer=\"sgn_unit\"} 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}
