//! Runs one test in a process of its own: this test binary started again, running only that
//! test, for the few tests whose assertions are about state a process has once and every
//! other test of the binary would share with them — the metrics recorder every app records
//! into, the PKCS#11 library whose login and sessions belong to the whole process.
//!
//! When each area was a binary of its own these tests shared their process only with their
//! own area's tests, which were written around them; in one binary they would share it with
//! all the others. A process per test keeps their assertions exact instead of loosening
//! them. The child inherits the environment, so it runs under the same suite, key provider
//! and PostgreSQL server as the run that started it.

use std::process::Command;

/// Names, in the child, the one test it was started for.
const CHILD: &str = "PDVAULT_TEST_OWN_PROCESS";

/// Whether the calling test runs its body here. In the process started for it: yes. In any
/// other: starts that process, fails with its output unless exactly this test passed there,
/// and answers no. `module` is the caller's `module_path!()`, `test` its function's name.
pub fn run_here(module: &str, test: &str) -> bool {
    // Test names start below the crate: `it::ops` holds `ops::<test>`.
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    let name = if module.is_empty() {
        test.to_owned()
    } else {
        format!("{module}::{test}")
    };
    if std::env::var(CHILD).is_ok_and(|child| child == name) {
        return true;
    }
    let output = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([name.as_str(), "--exact", "--test-threads=1"])
        .env(CHILD, &name)
        .output()
        .expect("the test binary starts again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed;"),
        "{name}, in a process of its own, did not pass alone ({}):\n{stdout}\n{stderr}",
        output.status
    );
    false
}
