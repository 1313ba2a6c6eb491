//! Runs the real `pdvault serve` binary as a child process, for what only a process shows:
//! signals (SIGTERM, SIGHUP), the exit code, and the log lines it writes.
//!
//! Logs are JSON so the harness can read the listening address out of them; every line is
//! kept for the test to inspect.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// Long enough for a cold debug binary on a loaded 2-core machine; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(120);

pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
}

impl ServerProcess {
    /// Writes `config` (TOML, without `listen`, `data_dir` or `[log]`, which the harness
    /// sets) to a file and serves it.
    pub async fn start(config: &str, log_filter: &str) -> ServerProcess {
        ServerProcess::start_with_open_files(config, log_filter, None).await
    }

    /// As [`ServerProcess::start`], with the soft limit on open files (`ulimit -n`) lowered
    /// to `max_open_files` when given, as a systemd unit's `LimitNOFILE` would.
    pub async fn start_with_open_files(
        config: &str,
        log_filter: &str,
        max_open_files: Option<u32>,
    ) -> ServerProcess {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pdvault.toml");
        std::fs::write(&file, full_config(&dir, config, log_filter)).unwrap();
        ServerProcess::serve(dir, max_open_files).await
    }

    /// Serves again on the same configuration file and data (after a crash or a stop), as
    /// the same instance. The previous process must have exited.
    pub async fn restart(self) -> ServerProcess {
        let ServerProcess { child, dir, .. } = self;
        drop(child);
        ServerProcess::serve(dir, None).await
    }

    async fn serve(dir: tempfile::TempDir, max_open_files: Option<u32>) -> ServerProcess {
        let file = dir.path().join("pdvault.toml");
        let binary = env!("CARGO_BIN_EXE_pdvault");
        let mut command = match max_open_files {
            None => Command::new(binary),
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(binary);
                shell
            }
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&file)
            // Relative paths (the default data_dir of an emptied file) stay in the test's
            // directory, never the repository's.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The test's own PDVAULT_TEST_* variables are not configuration keys.
        for (key, _) in std::env::vars() {
            if key.starts_with("PDVAULT_") {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().expect("the pdvault binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let stderr = child.stderr.take().unwrap();
        {
            let logs = Arc::clone(&logs);
            let new_line = Arc::clone(&new_line);
            tokio::spawn(async move {
                // Split on bytes, not UTF-8 lines, so a stray byte cannot end the capture.
                let mut lines = BufReader::new(stderr).split(b'\n');
                while let Ok(Some(line)) = lines.next_segment().await {
                    logs.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&line).into_owned());
                    new_line.notify_waiters();
                }
                // End of output: wake waiters so they can see the process is gone.
                logs.lock().unwrap().push(String::new());
                new_line.notify_waiters();
            });
        }
        let mut process = ServerProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            dir,
            logs,
            new_line,
        };
        let line = process
            .wait_for_log(0, |line| line.contains("pdvault listening"))
            .await;
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        process.addr = value["fields"]["addr"].as_str().unwrap().parse().unwrap();
        process
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pdvault.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Replaces the config file (the harness-owned keys are kept).
    pub fn rewrite_config(&self, config: &str, log_filter: &str) {
        std::fs::write(
            self.config_path(),
            full_config(&self.dir, config, log_filter),
        )
        .unwrap();
    }

    /// Sends `signal` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn log_count(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The first line at or after index `from` that satisfies `matches`; waits for it.
    pub async fn wait_for_log(&self, from: usize, matches: impl Fn(&str) -> bool) -> String {
        let search = async {
            loop {
                let notified = self.new_line.notified();
                {
                    let logs = self.logs.lock().unwrap();
                    if let Some(line) = logs.iter().skip(from).find(|l| matches(l)) {
                        return line.clone();
                    }
                    if logs.last().is_some_and(String::is_empty) {
                        panic!("the server exited; its log:\n{}", logs.join("\n"));
                    }
                }
                notified.await;
            }
        };
        match tokio::time::timeout(PATIENCE, search).await {
            Ok(line) => line,
            Err(_) => panic!("log line never came; log:\n{}", self.logs().join("\n")),
        }
    }

    /// Waits for the process to exit, and for its log to be read to the end (the exit can
    /// be seen before the capture has read the last lines), and returns its status.
    pub async fn wait(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the server exits")
            .unwrap();
        let drained = async {
            loop {
                let notified = self.new_line.notified();
                if self
                    .logs
                    .lock()
                    .unwrap()
                    .last()
                    .is_some_and(String::is_empty)
                {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(PATIENCE, drained)
            .await
            .expect("the server's log reaches its end");
        status
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

fn full_config(dir: &tempfile::TempDir, config: &str, log_filter: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n{config}\n[log]\nformat = \"json\"\nfilter = {log_filter:?}\n",
        dir.path().join("data")
    )
}
