//! Language neutrality: the Python client in `examples/python`, with stubs generated from
//! `proto/` at run time, creates a record, reads it for a granted purpose and is refused
//! for another, against the real server.
//!
//! Needs a Python with `grpcio` and `grpcio-tools` (`examples/python/requirements.txt`):
//! `PDVAULT_TEST_PYTHON` names it (default `python3`). Like PostgreSQL, it is mandatory:
//! skipping takes an explicit `PDVAULT_TEST_SKIP_PYTHON=1`, which CI never sets.

mod support;

use support::{Backend, CLAIMS, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_creates_reads_and_is_refused() {
    if std::env::var("PDVAULT_TEST_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("Python interoperability test skipped: PDVAULT_TEST_SKIP_PYTHON=1");
        return;
    }
    let python = std::env::var("PDVAULT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .await;
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        panic!(
            "{python} cannot import grpc and grpc_tools. Create a venv with \
             examples/python/requirements.txt and set PDVAULT_TEST_PYTHON to its python, \
             or set PDVAULT_TEST_SKIP_PYTHON=1 to skip explicitly."
        );
    }
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/interop.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .env("PDVAULT_ADDR", app.addr.to_string())
        .env("PDVAULT_TOKEN", CLAIMS.token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "interop.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in ["create: ok", "granted read: ok", "refused read: ok"] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    // The server saw exactly those calls, from the Python client's request id.
    let audited = app
        .count(
            "SELECT COUNT(*) FROM audit_events WHERE caller = 'claims' \
             AND request_id = 'python-interop'",
        )
        .await;
    assert_eq!(audited, 3);
    app.stop().await;
}
