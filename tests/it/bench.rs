//! The load generator, run briefly: against a vault it starts itself (with the echo
//! baseline), and against a running vault on each backend. These check the report's shape
//! and that every request the harness makes is one the vault accepts; they never look at
//! how fast anything was.

// The load generator is a module of the `pdvault` binary, not of the library: compiled in
// here too, so its report is checked as typed values rather than parsed back from text.
#[path = "../../src/bench/mod.rs"]
#[allow(dead_code)]
mod generator;

use std::time::Duration;

use crate::support::{CLAIMS, TestApp};
use generator::{BenchOptions, Mix, Report, TargetSpec};
use pdvault::cli::{
    DEFAULT_BENCH_FIELDS as DEFAULT_FIELDS, DEFAULT_BENCH_PURPOSE as DEFAULT_PURPOSE,
};

fn options(target: TargetSpec) -> BenchOptions {
    BenchOptions {
        target,
        connections: 2,
        in_flight: 4,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(50),
        mix: None,
        rate: None,
        seed: 25,
        baseline: false,
        purpose: DEFAULT_PURPOSE.into(),
        fields: DEFAULT_FIELDS.iter().map(|f| f.to_string()).collect(),
        export: None,
        server_pid: None,
    }
}

fn assert_all_succeeded(report: &Report) {
    let seed = report.seed.as_ref().expect("a seed report");
    assert_eq!(
        (seed.requested, seed.created),
        (25, 25),
        "{:?}",
        seed.failures
    );
    for phase in &report.phases {
        for rpc in &phase.rpcs {
            assert!(
                rpc.vault.failures.is_empty(),
                "{} in {}: {:?}",
                rpc.rpc,
                phase.name,
                rpc.vault.failures
            );
            assert!(rpc.vault.requests > 0, "{} in {} ran", rpc.rpc, phase.name);
            let v = &rpc.vault;
            assert!(v.p50_ms <= v.p90_ms && v.p90_ms <= v.p99_ms && v.p99_ms <= v.max_ms);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_run_with_baseline_reports_every_rpc_and_its_ratio() {
    let report = generator::run(BenchOptions {
        baseline: true,
        // A call counts only if it starts and ends inside the window; a debug-build batch of
        // 100 creates on a loaded machine can take longer than the other tests' 300 ms.
        duration: Duration::from_millis(1500),
        ..options(TargetSpec::InProcess { database_url: None })
    })
    .await
    .expect("the bench runs");
    assert_eq!(report.target.kind, "in-process");
    assert_eq!(report.target.database, "sqlite");
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "get",
            "create",
            "find",
            "check",
            "batch-get",
            "batch-create",
            "get@half-peak"
        ]
    );
    let methods: Vec<&str> = report.phases.iter().map(|p| p.rpcs[0].rpc).collect();
    assert_eq!(
        methods,
        [
            "GetRecord",
            "CreateRecord",
            "FindRecords",
            "CheckAccount",
            "BatchGetRecords",
            "BatchCreateRecords",
            "GetRecord"
        ]
    );
    for phase in &report.phases[..6] {
        let rpc = &phase.rpcs[0];
        let echo = rpc.echo.as_ref().expect("an echo figure");
        assert!(echo.failures.is_empty() && echo.requests > 0);
        assert!(
            rpc.ratio.is_some_and(|r| r > 0.0),
            "{} has a ratio",
            rpc.rpc
        );
        assert!(phase.rate_limit.is_none());
    }
    // Batch phases count records as well as calls.
    for phase in &report.phases[4..6] {
        let rpc = &phase.rpcs[0];
        assert_eq!(rpc.records_per_call, generator::BATCH);
        assert_eq!(rpc.records_per_sec, rpc.vault.req_per_sec * 100.0);
    }
    let half = &report.phases[6];
    assert!(half.rate_limit.is_some_and(|r| r > 0.0));
    assert!(half.rpcs[0].echo.is_none() && half.rpcs[0].ratio.is_none());
    // The in-process vault reports its group commit; reads were audited.
    let get_audit = report.phases[0].audit.as_ref().expect("audit figures");
    assert!(get_audit.events >= report.phases[0].rpcs[0].vault.requests);
    // Linux reports what the process wrote (`/proc/self/io`), so the bytes per audit event
    // are measured (zero only where the data directory is not on a block device).
    #[cfg(target_os = "linux")]
    assert!(get_audit.write_bytes.is_some() && get_audit.bytes_per_event.is_some());
    assert_all_succeeded(&report);

    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    for key in ["machine", "target", "settings", "seed", "phases"] {
        assert!(json.get(key).is_some(), "JSON has {key}");
    }
    let first = &json["phases"][0]["rpcs"][0];
    for key in ["req_per_sec", "p50_ms", "p90_ms", "p99_ms", "max_ms"] {
        assert!(first["vault"][key].is_number(), "vault.{key}");
        assert!(first["echo"][key].is_number(), "echo.{key}");
    }
    assert!(first["ratio"].is_number());
    #[cfg(target_os = "linux")]
    assert!(json["phases"][0]["audit"]["bytes_per_event"].is_number());
    let text = report.to_text();
    for header in [
        "req/s",
        "p50 ms",
        "p99 ms",
        "echo req/s",
        "ratio",
        "GetRecord",
    ] {
        assert!(text.contains(header), "table shows {header}:\n{text}");
    }
}

async fn a_mixed_run_against_a_running_vault(app: &TestApp) {
    let report = generator::run(BenchOptions {
        mix: Some(Mix::parse("get=4,find=2,check=2,create=1").unwrap()),
        ..options(TargetSpec::External {
            connection: pdvault::cli::ClientArgs {
                addr: Some(app.addr.to_string()),
                token: Some(CLAIMS.token.into()),
                ..pdvault::cli::ClientArgs::default()
            },
        })
    })
    .await
    .expect("the bench runs");
    assert_eq!(report.target.kind, "external");
    assert_eq!(report.phases.len(), 1);
    let methods: Vec<&str> = report.phases[0].rpcs.iter().map(|r| r.rpc).collect();
    assert_eq!(
        methods,
        ["CreateRecord", "GetRecord", "FindRecords", "CheckAccount"]
    );
    assert!(report.phases[0].audit.is_none());
    assert_all_succeeded(&report);
    // The seeded and created identities are real records of the vault.
    let records = app
        .count("SELECT COUNT(*) FROM records WHERE deleted_at IS NULL")
        .await;
    assert!(records > 25, "{records} records");
}

for_each_backend!(a_mixed_run_against_a_running_vault);
