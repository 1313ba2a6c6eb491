//! What a benchmark run found, as data (serialised by `--json`) and as the text table
//! `pdvault bench` prints. Percentiles are exact (nearest rank over every latency kept), not
//! estimated from buckets; a run keeps at most a few million `u32`s, which is cheap.
//!
//! Nothing here can hold an identity value: requests are summarised by RPC name, count,
//! latency and gRPC status code only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub target: TargetInfo,
    pub settings: Settings,
    pub seed: Option<SeedReport>,
    pub phases: Vec<PhaseReport>,
    /// With `--export`: one export over every seeded record.
    pub export: Option<ExportReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub os: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// `in-process` or `external`.
    pub kind: &'static str,
    /// `sqlite`, `postgresql`, or `external` when the vault was already running.
    pub database: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub connections: usize,
    pub in_flight: usize,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub seed: u64,
    pub baseline: bool,
    pub purpose: String,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub requested: u64,
    pub created: u64,
    /// Failed creates by gRPC status code.
    pub failures: BTreeMap<String, u64>,
    pub seconds: f64,
    pub per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub mix: String,
    /// Total requests per second the phase was paced at; `None` ran flat out.
    pub rate_limit: Option<f64>,
    pub rpcs: Vec<RpcReport>,
    /// The vault's audit group commit during the phase (warm-up included), when it runs here.
    pub audit: Option<AuditReport>,
}

/// What the audit writer did: how many events each flush carried and what a flush cost.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub batches: u64,
    pub events: u64,
    pub mean_batch: f64,
    pub mean_flush_ms: f64,
    /// Bytes this process caused to be written to storage during the phase (`write_bytes`
    /// of `/proc/self/io`: WAL, checkpoints and anything else), when the kernel reports it.
    pub write_bytes: Option<u64>,
    /// `write_bytes` divided by the audit events appended in the phase.
    pub bytes_per_event: Option<f64>,
}

impl AuditReport {
    /// The difference of two `BatchStats::snapshot`s.
    /// `io_before`/`io_after` are `write_bytes` readings taken at the same moments.
    pub fn between(
        before: (u64, u64, u64, u64),
        after: (u64, u64, u64, u64),
        io_before: Option<u64>,
        io_after: Option<u64>,
    ) -> AuditReport {
        let batches = after.0.saturating_sub(before.0);
        let events = after.1.saturating_sub(before.1);
        let flush_us = after.3.saturating_sub(before.3);
        let write_bytes = io_before
            .zip(io_after)
            .map(|(before, after)| after.saturating_sub(before));
        AuditReport {
            batches,
            events,
            mean_batch: events as f64 / batches.max(1) as f64,
            mean_flush_ms: flush_us as f64 / 1000.0 / batches.max(1) as f64,
            write_bytes,
            bytes_per_event: write_bytes
                .filter(|_| events > 0)
                .map(|bytes| bytes as f64 / events as f64),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RpcReport {
    pub rpc: &'static str,
    pub vault: Stats,
    /// The echo service driven the same way, with `--baseline`.
    pub echo: Option<Stats>,
    /// Vault req/s over echo req/s.
    pub ratio: Option<f64>,
    /// Records each call reads or creates (100 for the batch calls, else 1).
    pub records_per_call: usize,
    /// Vault records per second: req/s times `records_per_call`.
    pub records_per_sec: f64,
}

impl RpcReport {
    pub fn new(rpc: &'static str, vault: Stats, echo: Option<Stats>) -> RpcReport {
        let ratio = echo
            .as_ref()
            .filter(|e| e.req_per_sec > 0.0)
            .map(|e| vault.req_per_sec / e.req_per_sec);
        RpcReport {
            records_per_call: 1,
            records_per_sec: vault.req_per_sec,
            rpc,
            vault,
            echo,
            ratio,
        }
    }

    /// The same report for a call that reads or creates `records` records.
    pub fn per_call(mut self, records: usize) -> RpcReport {
        self.records_per_call = records;
        self.records_per_sec = self.vault.req_per_sec * records as f64;
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Successful requests completed in the measured window.
    pub requests: u64,
    /// Failed requests by gRPC status code (or `EMPTY_RESULT` for a lookup finding nothing).
    pub failures: BTreeMap<String, u64>,
    pub req_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    /// Summarises latencies in microseconds (sorted in place) over a window.
    pub fn from_latencies(
        latencies: &mut [u32],
        failures: BTreeMap<String, u64>,
        window: Duration,
    ) -> Stats {
        latencies.sort_unstable();
        let ms = |q: f64| percentile(latencies, q).map_or(0.0, |us| f64::from(us) / 1000.0);
        Stats {
            requests: latencies.len() as u64,
            failures,
            req_per_sec: latencies.len() as f64 / window.as_secs_f64().max(f64::MIN_POSITIVE),
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: ms(1.0),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Report {
    /// The text table: one line per (phase, RPC), the echo ceiling and ratio when measured.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(
            out,
            "machine: {} CPU(s), {}, {}\ntarget: {} vault, {}\nload: {} connection(s), {} in flight, \
             {:.0}s measured after {:.0}s warm-up; reads for {:?} asking {} field(s)",
            m.cpus,
            m.cpu_model,
            m.os,
            self.target.kind,
            self.target.database,
            s.connections,
            s.in_flight,
            s.duration_secs,
            s.warmup_secs,
            s.purpose,
            if s.fields.is_empty() {
                "all".to_owned()
            } else {
                s.fields.len().to_string()
            },
        );
        if let Some(seed) = &self.seed {
            let _ = writeln!(
                out,
                "seed: {} of {} identities created in {:.1}s ({:.0}/s){}",
                seed.created,
                seed.requested,
                seed.seconds,
                seed.per_sec,
                failures_note(&seed.failures),
            );
        }
        let _ = writeln!(
            out,
            "\n{:<16} {:<13} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>8} {:>6}",
            "phase",
            "rpc",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "echo req/s",
            "echo p99",
            "ratio"
        );
        for phase in &self.phases {
            for rpc in &phase.rpcs {
                let v = &rpc.vault;
                let (echo_rate, echo_p99) = match &rpc.echo {
                    Some(e) => (format!("{:.0}", e.req_per_sec), format!("{:.2}", e.p99_ms)),
                    None => ("-".into(), "-".into()),
                };
                let ratio = rpc.ratio.map_or("-".into(), |r| format!("{r:.2}"));
                let _ = writeln!(
                    out,
                    "{:<16} {:<13} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>8} {:>6}{}",
                    phase.name,
                    rpc.rpc,
                    v.req_per_sec,
                    v.p50_ms,
                    v.p90_ms,
                    v.p99_ms,
                    v.max_ms,
                    echo_rate,
                    echo_p99,
                    ratio,
                    failures_note(&v.failures),
                );
            }
            for rpc in phase.rpcs.iter().filter(|rpc| rpc.records_per_call > 1) {
                let _ = writeln!(
                    out,
                    "{:<16}   records: {:.0}/s ({} per call)",
                    "", rpc.records_per_sec, rpc.records_per_call
                );
            }
            if let Some(audit) = phase.audit.as_ref().filter(|a| a.batches > 0) {
                let _ = writeln!(
                    out,
                    "{:<16}   audit: {} events in {} group commits, mean batch {:.1}, mean flush {:.2} ms",
                    "", audit.events, audit.batches, audit.mean_batch, audit.mean_flush_ms
                );
                if let (Some(bytes), Some(per_event)) = (audit.write_bytes, audit.bytes_per_event) {
                    let _ = writeln!(
                        out,
                        "{:<16}   disk: {:.1} MiB written, {:.0} bytes per audit event",
                        "",
                        bytes as f64 / (1024.0 * 1024.0),
                        per_event
                    );
                }
            }
        }
        for (single, batch) in [
            ("GetRecord", "BatchGetRecords"),
            ("CreateRecord", "BatchCreateRecords"),
        ] {
            if let (Some(one), Some(many)) =
                (self.records_per_sec(single), self.records_per_sec(batch))
                && one > 0.0
            {
                let _ = writeln!(
                    out,
                    "records/s of {batch} over {single}: {:.1} (target: at least 5)",
                    many / one
                );
            }
        }
        if let Some(export) = &self.export {
            let _ = writeln!(
                out,
                "export of {}: {} rows ({} suppressed) in {:.1}s = {:.0} rows/s; {}",
                export.purpose,
                export.rows,
                export.suppressed,
                export.seconds,
                export.rows_per_sec,
                match (export.peak_rss_mib, export.rss_of) {
                    (Some(mib), Some(of)) => format!("peak RSS {mib:.0} MiB ({of})"),
                    _ => "RSS not measured (vault elsewhere; --server-pid names it)".to_owned(),
                },
            );
        }
        out
    }

    /// Records per second of the unpaced phase that ran `rpc` alone.
    fn records_per_sec(&self, rpc: &str) -> Option<f64> {
        self.phases
            .iter()
            .filter(|phase| phase.rate_limit.is_none())
            .flat_map(|phase| phase.rpcs.iter())
            .find(|report| report.rpc == rpc)
            .map(|report| report.records_per_sec)
    }
}

/// One `ExportRecords` over every seeded record (`--export`).
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub purpose: String,
    pub rows: u64,
    pub suppressed: u64,
    pub seconds: f64,
    pub rows_per_sec: f64,
    /// The most resident memory seen while the export ran, sampled every 100 ms, of the
    /// process `rss_of` names (`None`: not measured).
    pub peak_rss_mib: Option<f64>,
    /// Whose memory: "vault process" (`--server-pid`), or "server and load generator" (the
    /// one process of an in-process run, an upper bound for the vault's).
    pub rss_of: Option<&'static str>,
}

fn failures_note(failures: &BTreeMap<String, u64>) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let listed: Vec<String> = failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("  (failed: {})", listed.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut latencies: Vec<u32> = (1..=100).rev().map(|ms| ms * 1000).collect();
        let stats = Stats::from_latencies(&mut latencies, BTreeMap::new(), Duration::from_secs(2));
        assert_eq!(stats.requests, 100);
        assert_eq!(stats.req_per_sec, 50.0);
        assert_eq!(stats.p50_ms, 50.0);
        assert_eq!(stats.p90_ms, 90.0);
        assert_eq!(stats.p99_ms, 99.0);
        assert_eq!(stats.max_ms, 100.0);
    }

    #[test]
    fn empty_latencies_give_zeros_not_a_panic() {
        let stats = Stats::from_latencies(&mut [], BTreeMap::new(), Duration::from_secs(1));
        assert_eq!((stats.requests, stats.p99_ms), (0, 0.0));
    }

    #[test]
    fn ratio_is_vault_over_echo() {
        let stats = |rate: f64| Stats {
            requests: 1,
            failures: BTreeMap::new(),
            req_per_sec: rate,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
        };
        let report = RpcReport::new("GetRecord", stats(500.0), Some(stats(2000.0)));
        assert_eq!(report.ratio, Some(0.25));
        assert_eq!(RpcReport::new("GetRecord", stats(1.0), None).ratio, None);
    }
}
