//! Logging setup; the metrics (the recorder, its listener and the hooks every layer calls)
//! in `metrics.rs`. The per-call layer that gives a gRPC call its request id, span,
//! completion log line and request metrics is one of the layers a call passes, so it lives
//! with the others in `grpc/admission.rs` and calls the hooks here.
//!
//! Low in the module graph, so that every layer that counts something (audit, vault, grpc,
//! app) can reach the metric hooks.
//!
//! Logs carry caller names, record ids, purposes, reasons and request ids: never identity
//! values, which no code path formats into a log line (identity types redact their `Debug`),
//! and never request or response bodies, which no layer logs.

pub mod metrics;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

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
