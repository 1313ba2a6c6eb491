//! Language neutrality: the Python client in `examples/python`, with stubs generated from
//! `proto/` at run time, creates a record, reads it for a granted purpose and is refused
//! for a purpose the vault does not define, against the real server. It runs as a newcomer
//! runs it (with the administrator token the vault creates, as its header and the README
//! say) and as a least-privilege service.
//!
//! Needs a Python with `grpcio` and `grpcio-tools` (`examples/python/requirements.txt`):
//! `PDVAULT_TEST_PYTHON` names it (default `python3`), and the check before any test
//! (`support::environment`) fails the run when it cannot import them. Like PostgreSQL, it is
//! mandatory: skipping takes an explicit `PDVAULT_TEST_SKIP_PYTHON=1`, which CI never sets.

use crate::support::{Backend, CLAIMS, TestApp};

fn skipped() -> bool {
    let skip = std::env::var("PDVAULT_TEST_SKIP_PYTHON").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("Python interoperability test skipped: PDVAULT_TEST_SKIP_PYTHON=1");
    }
    skip
}

/// Runs `interop.py` against `app` with `token`; asserts every step passed and that the
/// server audited exactly its three calls under `caller`.
async fn run_interop(app: &TestApp, token: &str, caller: &str) {
    let python = std::env::var("PDVAULT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/interop.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .env("PDVAULT_ADDR", app.addr.to_string())
        .env("PDVAULT_TOKEN", token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "interop.py as {caller} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [
        "create: ok",
        "granted read: ok",
        "refused read: ok (PERMISSION_DENIED)",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    // The server saw exactly those calls, from the Python client's request id, and
    // refused the last one for its purpose.
    let audited = app
        .count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE caller = '{caller}' \
             AND request_id = 'python-interop'"
        ))
        .await;
    assert_eq!(audited, 3);
    let refused = app
        .count(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE caller = '{caller}' \
             AND request_id = 'python-interop' AND reason = 'PURPOSE_NOT_GRANTED'"
        ))
        .await;
    assert_eq!(refused, 1);
}

/// The README's newcomer: the only token they have is the administrator's, which holds
/// every purpose the vault defines, so the refused step must not depend on a grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_passes_with_the_administrator_token() {
    if skipped() {
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    let admin_token = app.admin_token.clone();
    run_interop(&app, &admin_token, pdvault::app::ADMIN_CALLER).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_passes_as_a_least_privilege_service() {
    if skipped() {
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite).await.unwrap();
    run_interop(&app, CLAIMS.token, CLAIMS.name).await;
    app.stop().await;
}
