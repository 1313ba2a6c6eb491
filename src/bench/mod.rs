//! `pdvault bench`: a load generator for a vault over gRPC, in the manner of `pgbench`.
//!
//! It owns everything about a benchmark run: where the vault comes from (a running one at
//! `--addr`, or one started in this process on a temporary data directory), seeding it with
//! synthetic identities, driving it with a mix of RPCs from many requests in flight over a
//! few HTTP/2 connections, and, with `--baseline`, driving a do-nothing service on the same
//! tonic stack ([`echo`]) with the same client so every figure can be stated as a ratio to
//! that ceiling. Absolute numbers on shared machines drift; ratios measured in the same run
//! mostly do not.
//!
//! Servers started here run on their own tokio runtime in their own OS threads, as a
//! separate `pdvault serve` process would, so the load generator's tasks and the server's
//! do not share a scheduler queue. Latency is measured per request from the moment it was
//! due: in closed loop (the default) that is when it was sent; with `--rate` it is its slot
//! in the schedule, so a stalled server shows up as latency rather than as fewer requests.
//!
//! A module of the `pdvault` binary (`main.rs` hands it `pdvault bench`'s parsed flags), not
//! of the server library: everything it uses of the vault is the library's public API.
//! `tests/it/bench.rs` compiles it in too, to check its report as typed values.

mod echo;
mod identities;
pub mod report;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

pub use identities::IdentityGenerator;
pub use report::{PhaseReport, Report, RpcReport, Stats};

use pdvault::app::{Application, generate_token};
use pdvault::cli::client::ClientError;
use pdvault::cli::{BenchArgs, CliError, ClientArgs};
use pdvault::config::{Config, FlagOverrides};
use pdvault::policy::{CallerConfig, token_sha256_hex};
use pdvault::proto;
use pdvault::proto::vault_client::VaultClient;

/// The caller name of the credential an in-process vault is started with.
pub const BENCH_CALLER: &str = "bench";
/// Worker threads of a server runtime started here, as `pdvault serve` gets on this machine.
const SERVER_THREADS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot start the vault: {0}")]
    Startup(String),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection flags of `--addr` do not make a usable endpoint or credential.
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("seeding failed: {0}")]
    Seed(String),
    /// Not one seeding call got through: the first refusal says why (a vault that requires a
    /// client certificate, a token it does not know, a grant missing).
    #[error("seeding failed: no identity was created (failures: {failures})")]
    Refused {
        failures: String,
        #[source]
        first: Refusal,
    },
    /// Not one seeding call reached the vault: the connection is refused after it opened
    /// (TLS 1.3 servers check the client certificate after the client's handshake is done).
    #[error(
        "no call reached the vault at {addr}{}",
        hint.map(|hint| format!("; {hint}")).unwrap_or_default()
    )]
    Unreachable {
        addr: String,
        /// What the flags leave out that would explain it.
        hint: Option<&'static str>,
        #[source]
        first: Refusal,
    },
}

/// A call the vault, or the connection to it, refused: its code and message, and the
/// transport's cause (a TLS alert, a reset) as the source.
#[derive(Debug)]
pub struct Refusal(tonic::Status);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl Refusal {
    /// Whether the call failed on the way (the connection, TLS) rather than being answered:
    /// a status the vault sent has no source; one the transport made carries its cause.
    fn never_reached(&self) -> bool {
        std::error::Error::source(&self.0).is_some()
    }
}

/// The RPCs the load generator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rpc {
    Create,
    Get,
    Find,
    Check,
    /// `BatchGetRecords` of [`BATCH`] distinct seeded records.
    BatchGet,
    /// `BatchCreateRecords` of [`BATCH`] new identities.
    BatchCreate,
}

/// Records per batch call: the "batch get (100 ids), batch create (100)".
pub const BATCH: usize = 100;

impl Rpc {
    pub const ALL: [Rpc; 6] = [
        Rpc::Get,
        Rpc::Create,
        Rpc::Find,
        Rpc::Check,
        Rpc::BatchGet,
        Rpc::BatchCreate,
    ];

    /// The short name used on the command line.
    pub fn short(self) -> &'static str {
        match self {
            Rpc::Create => "create",
            Rpc::Get => "get",
            Rpc::Find => "find",
            Rpc::Check => "check",
            Rpc::BatchGet => "batch-get",
            Rpc::BatchCreate => "batch-create",
        }
    }

    /// The gRPC method name.
    pub fn method(self) -> &'static str {
        match self {
            Rpc::Create => "CreateRecord",
            Rpc::Get => "GetRecord",
            Rpc::Find => "FindRecords",
            Rpc::Check => "CheckAccount",
            Rpc::BatchGet => "BatchGetRecords",
            Rpc::BatchCreate => "BatchCreateRecords",
        }
    }

    /// Records one call reads or creates.
    pub fn records_per_call(self) -> usize {
        match self {
            Rpc::BatchGet | Rpc::BatchCreate => BATCH,
            _ => 1,
        }
    }

    fn parse(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|rpc| rpc.short() == name)
    }

    fn reads_seeded_records(self) -> bool {
        !matches!(self, Rpc::Create | Rpc::BatchCreate)
    }
}

/// Weighted RPCs, e.g. `get=70,find=10,check=15,create=5`; a bare name weighs 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix(Vec<(Rpc, u32)>);

impl Mix {
    pub fn only(rpc: Rpc) -> Mix {
        Mix(vec![(rpc, 1)])
    }

    pub fn parse(text: &str) -> Result<Mix, BenchError> {
        let mut weights: BTreeMap<Rpc, u32> = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
            let rpc = Rpc::parse(name.trim()).ok_or_else(|| {
                BenchError::Invalid(format!(
                    "--mix: unknown RPC {name:?} (use create, get, find, check, batch-get, \
                     batch-create)"
                ))
            })?;
            let weight: u32 = weight.trim().parse().map_err(|_| {
                BenchError::Invalid(format!("--mix: weight of {name} is not a whole number"))
            })?;
            *weights.entry(rpc).or_default() += weight;
        }
        weights.retain(|_, w| *w > 0);
        if weights.is_empty() {
            return Err(BenchError::Invalid("--mix names no RPC".into()));
        }
        Ok(Mix(weights.into_iter().collect()))
    }

    pub fn rpcs(&self) -> impl Iterator<Item = Rpc> + '_ {
        self.0.iter().map(|(rpc, _)| *rpc)
    }

    /// Canonical text, e.g. `get=70,create=5`.
    pub fn describe(&self) -> String {
        if let [(rpc, _)] = self.0.as_slice() {
            return rpc.short().to_owned();
        }
        self.0
            .iter()
            .map(|(rpc, w)| format!("{}={w}", rpc.short()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn pick(&self, rng: &mut SplitMix) -> Rpc {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut draw = rng.below(total);
        for (rpc, weight) in &self.0 {
            if draw < u64::from(*weight) {
                return *rpc;
            }
            draw -= u64::from(*weight);
        }
        self.0[0].0
    }
}

/// Where the vault under test is. `Debug` leaves the token out ([`ClientArgs`]'s does).
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// A running vault, reached as every client command reaches one: `--addr`, a token (or
    /// a client certificate the vault maps to a caller) allowed to call the RPCs of the mix,
    /// and TLS or mTLS when the flags say so.
    External { connection: ClientArgs },
    /// A vault started here on a fresh temporary data directory; `database_url` overrides
    /// the embedded SQLite default (e.g. a throw-away PostgreSQL database).
    InProcess { database_url: Option<String> },
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub target: TargetSpec,
    /// HTTP/2 connections the requests are spread over.
    pub connections: usize,
    /// Requests in flight at once, over all connections.
    pub in_flight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// `None`: one phase per RPC (get, create, find, check), then `GetRecord` at half the
    /// peak it reached. `Some`: one phase with this mix.
    pub mix: Option<Mix>,
    /// Total requests per second to pace a `mix` phase at (open loop); `None` runs flat out.
    pub rate: Option<f64>,
    /// Identities created before measuring.
    pub seed: u64,
    pub baseline: bool,
    pub purpose: String,
    pub fields: Vec<String>,
    /// After the phases, one `ExportRecords` over every record under this export purpose.
    pub export: Option<String>,
    /// The external vault's process id on this machine, whose memory the export samples.
    pub server_pid: Option<u32>,
}

impl BenchOptions {
    fn validate(&self) -> Result<(), BenchError> {
        if self.connections == 0 || self.in_flight == 0 {
            return Err(BenchError::Invalid(
                "--connections and --in-flight must be at least 1".into(),
            ));
        }
        if self.duration.is_zero() {
            return Err(BenchError::Invalid("--duration must be positive".into()));
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(BenchError::Invalid("--rate must be positive".into()));
        }
        if self.server_pid.is_some() && matches!(self.target, TargetSpec::InProcess { .. }) {
            return Err(BenchError::Invalid(
                "--server-pid names a vault started elsewhere (--addr); the vault started \
                 here is measured as this process"
                    .into(),
            ));
        }
        if self.rate.is_some() && self.mix.is_none() {
            return Err(BenchError::Invalid("--rate needs --mix".into()));
        }
        let reads = match &self.mix {
            Some(mix) => mix.rpcs().any(Rpc::reads_seeded_records),
            None => true,
        };
        if reads && self.seed == 0 {
            return Err(BenchError::Invalid(
                "get, find and check read seeded records: give --seed N with N >= 1".into(),
            ));
        }
        Ok(())
    }
}

/// Runs the whole benchmark and returns its report. Progress goes to standard error.
pub async fn run(options: BenchOptions) -> Result<Report, BenchError> {
    options.validate()?;
    let (vault, database) = match &options.target {
        TargetSpec::External { connection } => {
            (Server::external(connection)?, "external".to_owned())
        }
        TargetSpec::InProcess { database_url } => {
            let database = match database_url.as_deref() {
                Some(url) if url.starts_with("postgres") => "postgresql",
                _ => "sqlite",
            };
            (
                Server::start_vault(database_url.clone()).await?,
                database.to_owned(),
            )
        }
    };
    let outcome = drive(&options, &vault).await;
    vault.stop().await;
    let (seed, phases, export) = outcome?;
    Ok(Report {
        machine: report::Machine::this(),
        target: report::TargetInfo {
            kind: match options.target {
                TargetSpec::External { .. } => "external",
                TargetSpec::InProcess { .. } => "in-process",
            },
            database,
        },
        settings: report::Settings {
            connections: options.connections,
            in_flight: options.in_flight,
            duration_secs: options.duration.as_secs_f64(),
            warmup_secs: options.warmup.as_secs_f64(),
            seed: options.seed,
            baseline: options.baseline,
            purpose: options.purpose.clone(),
            fields: options.fields.clone(),
        },
        seed,
        phases,
        export,
    })
}

type Outcome = (
    Option<report::SeedReport>,
    Vec<PhaseReport>,
    Option<report::ExportReport>,
);

async fn drive(options: &BenchOptions, vault: &Server) -> Result<Outcome, BenchError> {
    let vault_clients = connect(&vault.endpoint, options.connections).await?;
    let workload = Arc::new(Workload::new(vault.bearer.clone(), options));
    let seed = if options.seed > 0 {
        match seed_records(options, &vault_clients, &workload).await {
            Err(BenchError::Refused { first, .. }) if first.never_reached() => {
                return Err(BenchError::Unreachable {
                    addr: vault.endpoint.uri().to_string(),
                    hint: vault.hint,
                    first,
                });
            }
            seeded => Some(seeded?),
        }
    } else {
        None
    };
    if let TargetSpec::InProcess {
        database_url: Some(url),
    } = &options.target
        && url.starts_with("postgres")
    {
        analyze_postgres(url).await?;
    }
    let echo = if options.baseline {
        Some(Server::start_echo().await?)
    } else {
        None
    };
    let echo_clients = match &echo {
        Some(echo) => Some(connect(&echo.endpoint, options.connections).await?),
        None => None,
    };
    let mut phases = Vec::new();
    let specs: Vec<(String, Mix, Option<f64>)> = match &options.mix {
        Some(mix) => vec![(mix.describe(), mix.clone(), options.rate)],
        None => Rpc::ALL
            .into_iter()
            .map(|rpc| (rpc.short().to_owned(), Mix::only(rpc), None))
            .collect(),
    };
    let mut result = Ok(());
    for (name, mix, rate) in specs {
        let spec = PhaseSpec {
            name: &name,
            mix: &mix,
            rate,
        };
        match run_phase(
            options,
            spec,
            vault,
            &vault_clients,
            echo_clients.as_deref(),
            &workload,
        )
        .await
        {
            Ok(phase) => phases.push(phase),
            Err(error) => {
                result = Err(error);
                break;
            }
        }
    }
    // The latency target is stated at half the peak rate `GetRecord` reached.
    if result.is_ok() && options.mix.is_none() {
        let peak = phases
            .iter()
            .find(|p| p.name == Rpc::Get.short())
            .and_then(|p| p.rpcs.first())
            .map(|r| r.vault.req_per_sec)
            .unwrap_or(0.0);
        if peak > 0.0 {
            let mix = Mix::only(Rpc::Get);
            let spec = PhaseSpec {
                name: "get@half-peak",
                mix: &mix,
                rate: Some(peak / 2.0),
            };
            match run_phase(options, spec, vault, &vault_clients, None, &workload).await {
                Ok(phase) => phases.push(phase),
                Err(error) => result = Err(error),
            }
        }
    }
    if let Some(echo) = echo {
        echo.stop().await;
    }
    result?;
    let export = match &options.export {
        Some(purpose) => Some(
            export_all(
                purpose,
                vault,
                options.server_pid,
                &vault_clients[0],
                &workload,
            )
            .await?,
        ),
        None => None,
    };
    Ok((seed, phases, export))
}

/// One `ExportRecords` of `purpose`, read to its summary, timed, with resident memory
/// sampled while it runs: the vault's own process when `server_pid` names it (a vault
/// started with `pdvault serve`), else this process when it holds the vault (server and load
/// generator together, an upper bound), else none.
async fn export_all(
    purpose: &str,
    vault: &Server,
    server_pid: Option<u32>,
    client: &VaultClient<Channel>,
    workload: &Workload,
) -> Result<report::ExportReport, BenchError> {
    progress(&format!("export of {purpose}"));
    let failed = |status: tonic::Status| {
        BenchError::Io(format!("export failed: {}", code_name(status.code())))
    };
    let (status_file, rss_of) = match server_pid {
        Some(pid) => (format!("/proc/{pid}/status"), Some("vault process")),
        None if vault.audit.is_some() => (
            "/proc/self/status".to_owned(),
            Some("server and load generator"),
        ),
        None => (String::new(), None),
    };
    if rss_of.is_some() && resident_bytes(&status_file).is_none() {
        return Err(BenchError::Io(format!(
            "cannot read the resident memory in {status_file}"
        )));
    }
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        let status_file = status_file.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            while sampling.load(Ordering::Relaxed) && !status_file.is_empty() {
                peak = peak.max(resident_bytes(&status_file).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let mut stream = client
        .clone()
        .export_records(workload.request(proto::ExportRecordsRequest {
            purpose: purpose.to_owned(),
            justification: String::new(),
            resume_cursor: String::new(),
        }))
        .await
        .map_err(failed)?
        .into_inner();
    let mut rows = 0u64;
    let mut summary = None;
    while let Some(message) = stream.message().await.map_err(failed)? {
        match message.item {
            Some(proto::export_records_response::Item::Row(_)) => rows += 1,
            Some(proto::export_records_response::Item::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await.unwrap_or(0);
    let summary =
        summary.ok_or_else(|| BenchError::Io("the export ended without its summary".into()))?;
    Ok(report::ExportReport {
        purpose: purpose.to_owned(),
        rows,
        suppressed: summary.rows_suppressed,
        seconds,
        rows_per_sec: rows as f64 / seconds.max(f64::MIN_POSITIVE),
        peak_rss_mib: (rss_of.is_some() && peak > 0).then(|| peak as f64 / (1024.0 * 1024.0)),
        rss_of,
    })
}

/// `VmRSS` of a `/proc/<pid>/status` file, in bytes.
fn resident_bytes(status_file: &str) -> Option<u64> {
    let status = std::fs::read_to_string(status_file).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One measured phase: its name, mix and optional pacing.
struct PhaseSpec<'a> {
    name: &'a str,
    mix: &'a Mix,
    rate: Option<f64>,
}

async fn run_phase(
    options: &BenchOptions,
    PhaseSpec { name, mix, rate }: PhaseSpec<'_>,
    server: &Server,
    vault: &[VaultClient<Channel>],
    echo: Option<&[VaultClient<Channel>]>,
    workload: &Arc<Workload>,
) -> Result<PhaseReport, BenchError> {
    let describe = match rate {
        Some(rate) => format!("{name} at {rate:.0} req/s"),
        None => name.to_owned(),
    };
    // Echo first, while the vault idles; a paced phase has no ceiling to compare with.
    let echo_results = match echo.filter(|_| rate.is_none()) {
        Some(echo) => {
            progress(&format!("phase {describe}: echo baseline"));
            Some(drive_load(options, mix, rate, echo, workload).await)
        }
        None => None,
    };
    progress(&format!("phase {describe}: vault"));
    let before = server.audit.as_ref().map(|s| s.snapshot());
    let io_before = process_write_bytes();
    let vault_results = drive_load(options, mix, rate, vault, workload).await;
    let io_after = process_write_bytes();
    let audit = server.audit.as_ref().zip(before).map(|(stats, before)| {
        report::AuditReport::between(before, stats.snapshot(), io_before, io_after)
    });
    let rpcs = mix
        .rpcs()
        .map(|rpc| {
            let vault = vault_results.stats(rpc);
            let echo = echo_results.as_ref().map(|r| r.stats(rpc));
            RpcReport::new(rpc.method(), vault, echo).per_call(rpc.records_per_call())
        })
        .collect();
    Ok(PhaseReport {
        name: name.to_owned(),
        mix: mix.describe(),
        rate_limit: rate,
        rpcs,
        audit,
    })
}

/// `write_bytes` of `/proc/self/io`: what this process has caused to be written to storage.
/// With the vault in this process, the difference over a phase is the vault's disk traffic
/// (the load generator writes nothing). `None` where the kernel does not report it.
fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
}

fn progress(message: &str) {
    eprintln!("pdvault bench: {message}");
}

/// What every request needs: the credential, the seeded records and how to make identities.
struct Workload {
    /// `None` when a client certificate alone names the caller.
    bearer: Option<MetadataValue<Ascii>>,
    generator: IdentityGenerator,
    /// Seeded records: (generator index, record id). Filled once before any phase runs.
    records: std::sync::OnceLock<Vec<(u64, String)>>,
    next_identity: AtomicU64,
    purpose: String,
    fields: Vec<String>,
}

impl Workload {
    fn new(bearer: Option<MetadataValue<Ascii>>, options: &BenchOptions) -> Workload {
        Workload {
            bearer,
            generator: IdentityGenerator::new(random_u64()),
            records: std::sync::OnceLock::new(),
            next_identity: AtomicU64::new(0),
            purpose: options.purpose.clone(),
            fields: options.fields.clone(),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
    }

    fn seeded(&self) -> &[(u64, String)] {
        self.records.get().map(Vec::as_slice).unwrap_or_default()
    }

    /// One call; the error is the status code's name (never a message: messages could in
    /// principle describe input).
    async fn call(
        &self,
        client: &mut VaultClient<Channel>,
        rpc: Rpc,
        rng: &mut SplitMix,
    ) -> Result<(), &'static str> {
        let code = |status: tonic::Status| code_name(status.code());
        match rpc {
            Rpc::Create => {
                let index = self.next_identity.fetch_add(1, Ordering::Relaxed);
                client
                    .create_record(self.request(proto::CreateRecordRequest {
                        identity: Some(self.generator.identity(index)),
                        ..Default::default()
                    }))
                    .await
                    .map_err(code)?;
            }
            Rpc::Get => {
                let (_, record_id) = self.pick(rng);
                client
                    .get_record(self.request(proto::GetRecordRequest {
                        record_id: record_id.clone(),
                        purpose: self.purpose.clone(),
                        justification: String::new(),
                        fields: self.fields.clone(),
                    }))
                    .await
                    .map_err(code)?;
            }
            Rpc::Check => {
                let (_, record_id) = self.pick(rng);
                client
                    .check_account(self.request(proto::CheckAccountRequest {
                        record_id: record_id.clone(),
                    }))
                    .await
                    .map_err(code)?;
            }
            Rpc::BatchGet => {
                let seeded = self.seeded();
                let start = rng.below(seeded.len() as u64) as usize;
                // Consecutive seeded records from a random start: distinct ids, as the call
                // requires, and a different set each call.
                let record_ids = (0..BATCH.min(seeded.len()))
                    .map(|i| seeded[(start + i) % seeded.len()].1.clone())
                    .collect();
                let response = client
                    .batch_get_records(self.request(proto::BatchGetRecordsRequest {
                        record_ids,
                        purpose: self.purpose.clone(),
                        justification: String::new(),
                        fields: self.fields.clone(),
                    }))
                    .await
                    .map_err(code)?;
                if response.into_inner().results.iter().any(|r| {
                    !matches!(
                        r.result,
                        Some(proto::batch_get_record_result::Result::Record(_))
                    )
                }) {
                    return Err("ITEM_FAILED");
                }
            }
            Rpc::BatchCreate => {
                let first = self
                    .next_identity
                    .fetch_add(BATCH as u64, Ordering::Relaxed);
                let response = client
                    .batch_create_records(
                        self.request(proto::BatchCreateRecordsRequest {
                            requests: (first..first + BATCH as u64)
                                .map(|index| proto::CreateRecordRequest {
                                    identity: Some(self.generator.identity(index)),
                                    ..Default::default()
                                })
                                .collect(),
                        }),
                    )
                    .await
                    .map_err(code)?;
                if response.into_inner().results.iter().any(|r| {
                    !matches!(
                        r.result,
                        Some(proto::batch_create_record_result::Result::Record(_))
                    )
                }) {
                    return Err("ITEM_FAILED");
                }
            }
            Rpc::Find => {
                let (index, _) = self.pick(rng);
                let key = if rng.below(2) == 0 {
                    proto::find_records_request::Key::Document(proto::DocumentKey {
                        id_type: proto::IdType::ResidentId as i32,
                        id_number: self.generator.id_number(*index),
                    })
                } else {
                    proto::find_records_request::Key::Phone(self.generator.phone(*index))
                };
                let found = client
                    .find_records(self.request(proto::FindRecordsRequest {
                        purpose: self.purpose.clone(),
                        justification: String::new(),
                        key: Some(key),
                    }))
                    .await
                    .map_err(code)?;
                if found.into_inner().record_ids.is_empty() {
                    return Err("EMPTY_RESULT");
                }
            }
        }
        Ok(())
    }

    fn pick(&self, rng: &mut SplitMix) -> &(u64, String) {
        let seeded = self.seeded();
        &seeded[rng.below(seeded.len() as u64) as usize]
    }
}

/// PostgreSQL plans lookups from table statistics. On a production server autovacuum
/// gathers them as tables grow; a database seeded seconds ago may have none yet (or run with
/// autovacuum off), and then a lookup by blind index can be planned as a scan of a whole
/// partial index (measured: `FindRecords` at 600 instead of 4 500 req/s). So the harness
/// gathers them once after seeding, and measures the plans production gets.
async fn analyze_postgres(url: &str) -> Result<(), BenchError> {
    use sqlx::Connection;
    let failed = |e: sqlx::Error| BenchError::Seed(format!("ANALYZE after seeding failed: {e}"));
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(failed)?;
    sqlx::query("ANALYZE")
        .execute(&mut conn)
        .await
        .map_err(failed)?;
    conn.close().await.map_err(failed)
}

/// Identities per seeding call: seeding is set-up, not measurement, so it uses the batch call
/// (one group commit per hundred records instead of one per few).
const SEED_BATCH: u64 = 100;

/// Creates `options.seed` identities with every request slot busy, and remembers their ids.
async fn seed_records(
    options: &BenchOptions,
    clients: &[VaultClient<Channel>],
    workload: &Arc<Workload>,
) -> Result<report::SeedReport, BenchError> {
    let total = options.seed;
    progress(&format!("seeding {total} identities"));
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for slot in 0..options.in_flight {
        let mut client = clients[slot % clients.len()].clone();
        let workload = Arc::clone(workload);
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let mut created = Vec::new();
            let mut failures: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut refused = None;
            loop {
                let first = next.fetch_add(SEED_BATCH, Ordering::Relaxed);
                if first >= total {
                    break;
                }
                let indexes = first..(first + SEED_BATCH).min(total);
                let count = indexes.end - indexes.start;
                let response = client
                    .batch_create_records(
                        workload.request(proto::BatchCreateRecordsRequest {
                            requests: indexes
                                .clone()
                                .map(|index| proto::CreateRecordRequest {
                                    identity: Some(workload.generator.identity(index)),
                                    ..Default::default()
                                })
                                .collect(),
                        }),
                    )
                    .await;
                match response {
                    Ok(response) => {
                        for (index, result) in indexes.zip(response.into_inner().results) {
                            use proto::batch_create_record_result::Result as Item;
                            match result.result {
                                Some(Item::Record(record)) => {
                                    created.push((index, record.record_id));
                                }
                                Some(Item::Error(status)) => {
                                    *failures
                                        .entry(code_name(tonic::Code::from_i32(status.code)))
                                        .or_default() += 1;
                                }
                                None => *failures.entry("EMPTY_RESULT").or_default() += 1,
                            }
                        }
                    }
                    Err(status) => {
                        *failures.entry(code_name(status.code())).or_default() += count;
                        refused.get_or_insert(status);
                    }
                }
                done.fetch_add(count, Ordering::Relaxed);
            }
            (created, failures, refused)
        }));
    }
    let reporter = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(10));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                progress(&format!(
                    "seeded {}/{total}",
                    done.load(Ordering::Relaxed).min(total)
                ));
            }
        })
    };
    let mut records = Vec::with_capacity(total as usize);
    let mut failures: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut first_refusal = None;
    for task in tasks {
        let (created, failed, refused) = task
            .await
            .map_err(|e| BenchError::Seed(format!("a seeding task failed: {e}")))?;
        records.extend(created);
        first_refusal = first_refusal.or(refused);
        for (code, n) in failed {
            *failures.entry(code).or_default() += n;
        }
    }
    reporter.abort();
    let seconds = started.elapsed().as_secs_f64();
    // A few collisions with an earlier run's records are tolerable; a vault refusing
    // everything is not.
    if records.is_empty() {
        return Err(match first_refusal {
            Some(status) => BenchError::Refused {
                failures: format!("{failures:?}"),
                first: Refusal(status),
            },
            None => BenchError::Seed(format!("no identity was created (failures: {failures:?})")),
        });
    }
    records.sort_unstable_by_key(|(index, _)| *index);
    let created = records.len() as u64;
    workload.next_identity.store(total, Ordering::Relaxed);
    let _ = workload.records.set(records);
    Ok(report::SeedReport {
        requested: total,
        created,
        failures: failures
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        seconds,
        per_sec: created as f64 / seconds,
    })
}

/// Latencies (µs) and failures of one target in one phase, per RPC.
#[derive(Default)]
struct LoadResults {
    latencies: BTreeMap<Rpc, Vec<u32>>,
    failures: BTreeMap<Rpc, BTreeMap<&'static str, u64>>,
    window: Duration,
}

impl LoadResults {
    fn merge(&mut self, other: LoadResults) {
        for (rpc, mut latencies) in other.latencies {
            self.latencies
                .entry(rpc)
                .or_default()
                .append(&mut latencies);
        }
        for (rpc, failures) in other.failures {
            let mine = self.failures.entry(rpc).or_default();
            for (code, n) in failures {
                *mine.entry(code).or_default() += n;
            }
        }
    }

    fn stats(&self, rpc: Rpc) -> Stats {
        let mut latencies = self.latencies.get(&rpc).cloned().unwrap_or_default();
        let failures = self
            .failures
            .get(&rpc)
            .map(|f| f.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
            .unwrap_or_default();
        Stats::from_latencies(&mut latencies, failures, self.window)
    }
}

/// Runs `mix` against `clients` for warm-up plus duration and collects what completed inside
/// the measured window.
async fn drive_load(
    options: &BenchOptions,
    mix: &Mix,
    rate: Option<f64>,
    clients: &[VaultClient<Channel>],
    workload: &Arc<Workload>,
) -> LoadResults {
    let start = Instant::now();
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    // Paced: each request slot sends every `in_flight / rate`, slots staggered evenly.
    let pace = rate.map(|rate| Duration::from_secs_f64(options.in_flight as f64 / rate));
    let mut tasks = Vec::new();
    for slot in 0..options.in_flight {
        let mut client = clients[slot % clients.len()].clone();
        let workload = Arc::clone(workload);
        let mix = mix.clone();
        let mut rng = SplitMix::new(random_u64());
        let offset = pace.map(|p| p.mul_f64(slot as f64 / options.in_flight as f64));
        tasks.push(tokio::spawn(async move {
            let mut results = LoadResults::default();
            for k in 0u32.. {
                let due = match (pace, offset) {
                    (Some(pace), Some(offset)) => {
                        let due = start + offset + pace * k;
                        if due >= end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        now
                    }
                };
                let rpc = mix.pick(&mut rng);
                let outcome = workload.call(&mut client, rpc, &mut rng).await;
                let finished = Instant::now();
                if due < measure_from || finished > end {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        let micros = finished.duration_since(due).as_micros();
                        results
                            .latencies
                            .entry(rpc)
                            .or_default()
                            .push(u32::try_from(micros).unwrap_or(u32::MAX));
                    }
                    Err(code) => {
                        *results
                            .failures
                            .entry(rpc)
                            .or_default()
                            .entry(code)
                            .or_default() += 1
                    }
                }
            }
            results
        }));
    }
    let mut all = LoadResults {
        window: options.duration,
        ..LoadResults::default()
    };
    for task in tasks {
        if let Ok(results) = task.await {
            all.merge(results);
        }
    }
    all
}

/// `connections` HTTP/2 connections (each its own TCP connection and, for a TLS endpoint,
/// handshake) to `endpoint`, one client each.
async fn connect(
    endpoint: &Endpoint,
    connections: usize,
) -> Result<Vec<VaultClient<Channel>>, BenchError> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| BenchError::Connect {
                addr: endpoint.uri().to_string(),
                source,
            })?;
        clients.push(VaultClient::new(channel));
    }
    Ok(clients)
}

/// The plaintext endpoint of a server started here.
fn local_endpoint(addr: SocketAddr) -> Result<Endpoint, BenchError> {
    Endpoint::from_shared(format!("http://{addr}")).map_err(|source| BenchError::Connect {
        addr: addr.to_string(),
        source,
    })
}

/// A server under test: where it is, the credentials to call it with and, when started
/// here, the thread running it.
struct Server {
    endpoint: Endpoint,
    bearer: Option<MetadataValue<Ascii>>,
    /// Said when no call reaches it: what the connection flags leave out.
    hint: Option<&'static str>,
    running: Option<Running>,
    /// Group-commit counters of a vault started here.
    audit: Option<Arc<pdvault::audit::BatchStats>>,
}

struct Running {
    shutdown: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    data_dir: Option<PathBuf>,
}

impl Server {
    /// A running vault, at the endpoint and with the credentials of the shared connection
    /// flags (plaintext, TLS or mTLS).
    fn external(connection: &ClientArgs) -> Result<Server, BenchError> {
        Ok(Server {
            endpoint: connection.endpoint()?,
            bearer: connection.bearer()?,
            hint: connection.closed_connection_hint(),
            running: None,
            audit: None,
        })
    }

    /// A vault on a fresh temporary data directory with a `bench` caller, on its own runtime.
    async fn start_vault(database_url: Option<String>) -> Result<Server, BenchError> {
        let data_dir = std::env::temp_dir().join(format!("pdvault-bench-{:016x}", random_u64()));
        let flags = FlagOverrides {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            data_dir: Some(data_dir.clone()),
            database_url,
        };
        let mut config =
            Config::load(None, &flags).map_err(|e| BenchError::Startup(e.to_string()))?;
        let token =
            Zeroizing::new(generate_token().map_err(|e| BenchError::Startup(e.to_string()))?);
        let mut bearer: MetadataValue<Ascii> = format!("Bearer {}", token.as_str())
            .parse()
            .map_err(|_| BenchError::Startup("the generated token is not a header value".into()))?;
        bearer.set_sensitive(true);
        config.admin.enabled = false;
        // The load generator is one caller with --in-flight calls at once: its own cap
        // would measure the flag, not the vault.
        config.limits.max_in_flight_per_caller = 0;
        // Standard output carries the report (`--json`): checkpoints go to a file.
        config.audit.checkpoint_sink = data_dir.join("checkpoints.jsonl").display().to_string();
        config.callers.push(CallerConfig {
            name: BENCH_CALLER.to_owned(),
            token_sha256: token_sha256_hex(&token),
            rpcs: Rpc::ALL
                .iter()
                .map(|rpc| rpc.method())
                .chain(["ExportRecords"])
                .map(str::to_owned)
                .collect(),
            purposes: config.purposes.keys().cloned().collect(),
            ..CallerConfig::default()
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread = spawn_server_thread("pdvault-bench-vault", async move {
            match Application::build(config).await {
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                }
                Ok(app) => {
                    let stats = app.vault().audit().shared_stats();
                    let _ = ready_tx.send(Ok((app.local_addr(), stats)));
                    let stopped = app
                        .run_until(async {
                            let _ = shutdown_rx.await;
                        })
                        .await;
                    if let Err(error) = stopped {
                        eprintln!("pdvault bench: the vault stopped with an error: {error}");
                    }
                }
            }
        })?;
        let running = Running {
            shutdown,
            thread,
            data_dir: Some(data_dir),
        };
        match ready_rx.await {
            Ok(Ok((addr, stats))) => Ok(Server {
                endpoint: local_endpoint(addr)?,
                bearer: Some(bearer),
                hint: None,
                running: Some(running),
                audit: Some(stats),
            }),
            Ok(Err(error)) => {
                Server::finish(running).await;
                Err(BenchError::Startup(error))
            }
            Err(_) => {
                Server::finish(running).await;
                Err(BenchError::Startup("the server thread died".into()))
            }
        }
    }

    async fn start_echo() -> Result<Server, BenchError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread = spawn_server_thread("pdvault-bench-echo", async move {
            let shutdown = async {
                let _ = shutdown_rx.await;
            };
            match echo::bind(shutdown).await {
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                }
                Ok((addr, serve)) => {
                    let _ = ready_tx.send(Ok(addr));
                    if let Err(error) = serve.await {
                        eprintln!("pdvault bench: the echo server stopped with an error: {error}");
                    }
                }
            }
        })?;
        let running = Running {
            shutdown,
            thread,
            data_dir: None,
        };
        match ready_rx.await {
            Ok(Ok(addr)) => Ok(Server {
                endpoint: local_endpoint(addr)?,
                bearer: None,
                hint: None,
                running: Some(running),
                audit: None,
            }),
            Ok(Err(error)) => {
                Server::finish(running).await;
                Err(BenchError::Startup(error))
            }
            Err(_) => {
                Server::finish(running).await;
                Err(BenchError::Startup("the echo thread died".into()))
            }
        }
    }

    async fn stop(self) {
        if let Some(running) = self.running {
            Server::finish(running).await;
        }
    }

    async fn finish(running: Running) {
        let _ = running.shutdown.send(());
        let thread = running.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Some(dir) = running.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `server` to completion on a runtime of its own in a thread of its own.
fn spawn_server_thread(
    name: &str,
    server: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_THREADS)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Io(format!("server runtime: {e}")))?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || runtime.block_on(server))
        .map_err(|e| BenchError::Io(format!("server thread: {e}")))
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // Only spreads load and salts synthetic data; the clock will do if the OS cannot.
    if getrandom::fill(&mut bytes).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_le_bytes(bytes)
}

/// SplitMix64: a tiny, fast, non-cryptographic generator for picking RPCs and records.
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..bound` for load spreading (`bound` > 0).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// `pdvault bench`: the flags the library's command line parsed, made into options; runs the
/// load generator and prints its report (a table, or JSON with `--json`).
pub async fn command(connection: ClientArgs, args: BenchArgs) -> Result<(), CliError> {
    let seconds = |flag: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value).map_err(|_| {
            CliError::Refused(format!("--{flag} must be a non-negative number of seconds"))
        })
    };
    let target = match &connection.addr {
        Some(_) => {
            if args.database_url.is_some() {
                return Err(CliError::Refused(
                    "--database-url is for the vault started here, not with --addr".into(),
                ));
            }
            // The same flags, TLS and mTLS included, as every client command; with neither a
            // token nor a client certificate, a local vault's admin token.
            let connection = connection
                .or_token_file(std::path::Path::new(pdvault::cli::client::BENCH_TOKEN_FILE))?;
            TargetSpec::External { connection }
        }
        None => TargetSpec::InProcess {
            database_url: args.database_url,
        },
    };
    let options = BenchOptions {
        target,
        connections: args.connections,
        in_flight: args.in_flight,
        duration: seconds("duration", args.duration)?,
        warmup: seconds("warmup", args.warmup)?,
        mix: args
            .mix
            .as_deref()
            .map(Mix::parse)
            .transpose()
            .map_err(|e| CliError::Bench(Box::new(e)))?,
        rate: args.rate,
        seed: args.seed,
        baseline: args.baseline,
        purpose: args.purpose,
        fields: args.fields.into_iter().filter(|f| !f.is_empty()).collect(),
        export: args.export,
        server_pid: args.server_pid,
    };
    let report = run(options)
        .await
        .map_err(|e| CliError::Bench(Box::new(e)))?;
    if args.json {
        let json =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Bench(Box::new(e)))?;
        println!("{json}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_debug_output_redacts_the_token() {
        let target = TargetSpec::External {
            connection: ClientArgs {
                addr: Some("http://127.0.0.1:1".into()),
                token: Some("s3cr3t-bearer-token".into()),
                ..ClientArgs::default()
            },
        };
        let shown = format!("{target:?} {target:#?}");
        assert!(!shown.contains("s3cr3t-bearer-token"), "{shown}");
        assert!(shown.contains("127.0.0.1:1"), "{shown}");
    }

    #[test]
    fn mix_parses_weights_and_bare_names() {
        let mix = Mix::parse("get=70, find=10,check=15,create=5").unwrap();
        assert_eq!(mix.describe(), "create=5,get=70,find=10,check=15");
        assert_eq!(Mix::parse("get").unwrap(), Mix::only(Rpc::Get));
        assert!(Mix::parse("get=x").is_err());
        assert!(Mix::parse("delete").is_err());
        assert!(Mix::parse("get=0").is_err());
    }

    #[test]
    fn mix_picks_in_proportion() {
        let mix = Mix::parse("get=3,check=1").unwrap();
        let mut rng = SplitMix::new(7);
        let gets = (0..40_000)
            .filter(|_| mix.pick(&mut rng) == Rpc::Get)
            .count();
        assert!((29_000..31_000).contains(&gets), "{gets}");
    }

    #[test]
    fn reads_without_a_seed_are_refused() {
        let options = BenchOptions {
            target: TargetSpec::InProcess { database_url: None },
            connections: 1,
            in_flight: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            mix: Some(Mix::only(Rpc::Check)),
            rate: None,
            seed: 0,
            baseline: false,
            purpose: pdvault::cli::DEFAULT_BENCH_PURPOSE.into(),
            fields: Vec::new(),
            export: None,
            server_pid: None,
        };
        assert!(options.validate().is_err());
        let creates_only = BenchOptions {
            mix: Some(Mix::only(Rpc::Create)),
            ..options
        };
        assert!(creates_only.validate().is_ok());
        // The vault started here is this process: another pid would measure something else.
        let in_process_pid = BenchOptions {
            server_pid: Some(std::process::id()),
            export: Some("business-analytics".into()),
            ..creates_only
        };
        assert!(in_process_pid.validate().is_err());
        let external_pid = BenchOptions {
            target: TargetSpec::External {
                connection: ClientArgs {
                    addr: Some("http://127.0.0.1:1".into()),
                    token: Some("t".into()),
                    ..ClientArgs::default()
                },
            },
            ..in_process_pid
        };
        assert!(external_pid.validate().is_ok());
    }

    #[test]
    fn resident_memory_is_read_from_a_named_process() {
        let own = format!("/proc/{}/status", std::process::id());
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(resident_bytes(&own).is_some_and(|bytes| bytes > 0));
        }
        assert_eq!(resident_bytes("/proc/not-a-process/status"), None);
    }
}
