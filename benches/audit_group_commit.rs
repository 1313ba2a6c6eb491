//! Group commit versus one flush per event, on the same store in the same run.
//!
//! `cargo bench --bench audit_group_commit` appends audit events to a fresh SQLite database
//! (WAL, `synchronous = FULL`: every commit is an fsync) first one event per transaction,
//! then through `AuditLog` with many concurrent writers, and prints events/s for both and
//! their ratio. Set `PDVAULT_BENCH_POSTGRES_URL` to measure a PostgreSQL database as well.

// A benchmark crate stops at the first broken expectation: unwrapping is how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pdvault::audit::{AuditEvent, AuditLog, genesis};
use pdvault::store::{PostgresStore, SqliteStore, Store};

const SEQUENTIAL_EVENTS: usize = 400;
const CONCURRENT_WRITERS: usize = 64;
const EVENTS_PER_WRITER: usize = 100;

fn event(chain_id: &str, i: usize) -> AuditEvent {
    AuditEvent {
        event_id: format!("evt_bench_{chain_id}_{i}"),
        occurred_at: i as i64,
        chain_id: chain_id.to_owned(),
        caller: "bench".into(),
        peer: Some("127.0.0.1:1".into()),
        rpc: "GetRecord".into(),
        record_ids: vec!["rec_aaaaaaaaaaaaaaaaaaaaaaaaaa".into()],
        purpose: Some("service-delivery".into()),
        justification: None,
        released: vec![
            ("name".into(), "PLAIN".into()),
            ("phone".into(), "PLAIN".into()),
        ],
        outcome: "OK".into(),
        reason: None,
        request_id: None,
        trace_id: None,
    }
}

async fn one_flush_per_event(store: &dyn Store) -> f64 {
    let chain_id = pdvault::domain::ids::ChainId::generate();
    let chain = chain_id.as_str();
    store
        .register_chain(&chain_id, 0, &genesis(chain))
        .await
        .unwrap();
    let started = Instant::now();
    for i in 0..SEQUENTIAL_EVENTS {
        store.append_audit(&[event(chain, i)]).await.unwrap();
    }
    SEQUENTIAL_EVENTS as f64 / started.elapsed().as_secs_f64()
}

async fn group_commit(store: Arc<dyn Store>) -> (f64, (u64, u64, u64, u64)) {
    let (log, writer) = AuditLog::start(store, 0).await.unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT_WRITERS)
        .map(|w| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..EVENTS_PER_WRITER {
                    let mut e = event(log.chain_id().as_str(), w * EVENTS_PER_WRITER + i);
                    e.event_id = format!("evt_group_{w}_{i}");
                    log.record(e).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = (CONCURRENT_WRITERS * EVENTS_PER_WRITER) as f64 / started.elapsed().as_secs_f64();
    let stats = log.stats().snapshot();
    drop(log);
    writer.await.unwrap();
    (rate, stats)
}

async fn measure(name: &str, store: Arc<dyn Store>) {
    store.migrate().await.unwrap();
    let sequential = one_flush_per_event(store.as_ref()).await;
    let (grouped, (batches, events, largest, flush_us)) = group_commit(store).await;
    let mean_flush = Duration::from_micros(flush_us / batches.max(1));
    println!("{name}:");
    println!("  one flush per event : {sequential:>10.0} events/s");
    println!(
        "  group commit        : {grouped:>10.0} events/s  ({:.1}x)  {CONCURRENT_WRITERS} writers, \
         {batches} batches, mean batch {:.1}, largest {largest}, mean flush {mean_flush:?}",
        grouped / sequential,
        events as f64 / batches.max(1) as f64,
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("bench.db"), 4)
        .await
        .unwrap();
    measure("SQLite (WAL, synchronous=FULL)", Arc::new(sqlite)).await;
    if let Ok(url) = std::env::var("PDVAULT_BENCH_POSTGRES_URL") {
        let postgres = PostgresStore::connect(&url, 4).await.unwrap();
        measure("PostgreSQL", Arc::new(postgres)).await;
    }
}
