//! The test suite's check of the machine (`tests/it/support/environment.rs`), compiled into the
//! library's unit-test binary: `cargo test` runs this binary first, so on a machine that
//! lacks a component the check's one sentence is the first thing the run prints. The check's
//! own tests live here rather than in that file so they run once, not in the
//! integration-test binary too.

#[path = "../tests/it/support/environment.rs"]
mod check;

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::check::{
        Missing, PROVISION_COMMAND, Report, SOFTHSM2_MODULE, check_postgres, check_python,
        check_softhsm,
    };

    /// A loopback port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// The Python the suite is configured with, which the start check proved has grpcio.
    fn provisioned_python() -> String {
        std::env::var("PDVAULT_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
    }

    fn assert_one_sentence(sentence: &str) {
        assert!(!sentence.contains('\n'), "one line: {sentence}");
        assert!(sentence.ends_with('.'), "one sentence: {sentence}");
        assert_eq!(
            sentence.matches(". ").count(),
            0,
            "one sentence: {sentence}"
        );
        assert!(
            sentence.contains(&format!("run {PROVISION_COMMAND}, which provisions")),
            "names the command that provisions: {sentence}"
        );
    }

    fn sentence(missing: Missing) -> String {
        Report {
            missing: vec![missing],
        }
        .to_string()
    }

    #[test]
    fn a_closed_postgres_port_is_named_without_the_password() {
        let port = closed_port();
        let url = format!("postgres://vault_role:secret-pw-123@127.0.0.1:{port}/postgres");
        let missing = check_postgres(&url).unwrap_err();
        assert!(
            matches!(missing, Missing::PostgresUnreachable { .. }),
            "{missing:?}"
        );
        let sentence = sentence(missing);
        assert_one_sentence(&sentence);
        assert!(
            sentence.starts_with("PostgreSQL is missing for pdvault's tests"),
            "{sentence}"
        );
        assert!(
            sentence.contains(&format!("vault_role@127.0.0.1:{port}")),
            "{sentence}"
        );
        assert!(!sentence.contains("secret-pw-123"), "{sentence}");
        assert_eq!(
            sentence.matches("Connection refused").count(),
            1,
            "each cause once: {sentence}"
        );
    }

    #[test]
    fn a_missing_softhsm2_util_is_named() {
        let missing =
            check_softhsm("softhsm2-util-not-installed", Path::new(SOFTHSM2_MODULE)).unwrap_err();
        assert!(matches!(missing, Missing::SoftHsmUtil(_)), "{missing:?}");
        let sentence = sentence(missing);
        assert_one_sentence(&sentence);
        assert!(
            sentence.starts_with(
                "SoftHSM2 is missing for pdvault's tests (softhsm2-util \
                 does not run: No such file or directory"
            ),
            "{sentence}"
        );
    }

    #[test]
    fn a_missing_softhsm2_module_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("libsofthsm2.so");
        let missing = check_softhsm("softhsm2-util", &module).unwrap_err();
        let sentence = sentence(missing);
        assert_one_sentence(&sentence);
        assert!(sentence.starts_with("SoftHSM2 is missing"), "{sentence}");
        assert!(
            sentence.contains(&module.display().to_string()),
            "{sentence}"
        );
    }

    #[test]
    fn a_python_without_grpc_is_named() {
        // A real interpreter with nothing installed: a fresh venv of the configured Python.
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("bare");
        let created = Command::new(provisioned_python())
            .args(["-m", "venv", "--without-pip"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(created.success());
        let python = venv.join("bin/python").display().to_string();
        let missing = check_python(&python).unwrap_err();
        let sentence = sentence(missing);
        assert_one_sentence(&sentence);
        assert!(
            sentence.starts_with("Python's grpcio is missing for pdvault's tests"),
            "{sentence}"
        );
        assert!(
            sentence.contains(&format!(
                "{python} cannot import grpc and grpc_tools (ModuleNotFoundError: No module \
                 named 'grpc')"
            )),
            "{sentence}"
        );
    }

    #[test]
    fn an_absent_python_is_named() {
        let missing = check_python("/nonexistent/bin/python3").unwrap_err();
        assert!(
            matches!(missing, Missing::PythonAbsent { .. }),
            "{missing:?}"
        );
        assert_one_sentence(&sentence(missing));
    }

    #[test]
    fn the_provisioned_components_pass() {
        check_softhsm("softhsm2-util", Path::new(SOFTHSM2_MODULE)).unwrap();
        check_python(&provisioned_python()).unwrap();
    }

    #[test]
    fn several_missing_components_make_one_sentence() {
        let report = Report {
            missing: vec![
                check_softhsm("softhsm2-util-not-installed", Path::new(SOFTHSM2_MODULE))
                    .unwrap_err(),
                check_python("/nonexistent/bin/python3").unwrap_err(),
            ],
        };
        let sentence = report.to_string();
        assert_one_sentence(&sentence);
        assert!(
            sentence.starts_with("SoftHSM2 and Python's grpcio are missing"),
            "{sentence}"
        );
        assert!(sentence.contains("which provisions them"), "{sentence}");
        assert!(
            sentence.contains("(SoftHSM2: softhsm2-util does not run"),
            "{sentence}"
        );
        assert!(
            sentence.contains("; Python's grpcio: /nonexistent/bin/python3"),
            "{sentence}"
        );
    }

    /// The check runs before the harness: this very binary, started with PostgreSQL pointed
    /// at a closed port, prints the sentence first and exits non-zero, without a panic or a
    /// backtrace, before it could list (let alone run) a test.
    #[test]
    fn the_test_binary_stops_before_the_harness_with_the_sentence_first() {
        let port = closed_port();
        let output = Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .env(
                "PDVAULT_TEST_POSTGRES_URL",
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            )
            .env_remove("PDVAULT_TEST_SKIP_POSTGRES")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(101), "{stderr}");
        assert!(stdout.is_empty(), "the harness never ran: {stdout}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("PostgreSQL is missing"), "{stderr}");
        assert_one_sentence(first);
        assert_eq!(
            stderr.lines().count(),
            1,
            "nothing but the sentence: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
