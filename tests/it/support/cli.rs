//! Running the `pdvault` binary as an operator would: one way for every test that drives a
//! command (client or server-side) rather than the library. The test process's own
//! `PDVAULT_*` variables (the suite's cipher suite and KEK provider, a developer's exported
//! `PDVAULT_ADDR` or `PDVAULT_TOKEN`) are cleared, so that a command sees only what its test
//! gives it; standard input is closed, so a command that waits for it fails instead.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How long a command may take before the test fails: bounds a hang, measures nothing.
const BOUND: Duration = Duration::from_secs(120);

/// `pdvault` with the words of `line` as its arguments; add more with [`Pdvault::arg`].
pub fn cli(line: &str) -> Pdvault {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pdvault"));
    command
        .args(line.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PDVAULT_") {
            command.env_remove(key);
        }
    }
    Pdvault(command)
}

/// A `pdvault` command line being put together.
pub struct Pdvault(std::process::Command);

/// What a command did: whether it exited 0, and what it printed.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Standard output, then standard error: for assertions that do not care which.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl Pdvault {
    /// One more argument, taken whole (a path with spaces stays one argument).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Pdvault {
        self.0.arg(arg);
        self
    }

    /// More arguments, each taken whole.
    pub fn args<I, S>(mut self, args: I) -> Pdvault
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0.args(args);
        self
    }

    /// An environment variable of this command (a `PDVAULT_*` one included).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Pdvault {
        self.0.env(key, value);
        self
    }

    /// Runs in `dir` (relative defaults such as `pdvault-data` land there).
    pub fn current_dir(mut self, dir: &Path) -> Pdvault {
        self.0.current_dir(dir);
        self
    }

    /// Runs the command to its exit, off the async workers (the vault under test may be on
    /// them), bounded so that a hang fails the test instead of holding it.
    pub async fn run(self) -> Ran {
        let mut command = tokio::process::Command::from(self.0);
        command.kill_on_drop(true);
        let output = tokio::time::timeout(BOUND, command.output())
            .await
            .expect("the pdvault command exits")
            .expect("the pdvault binary runs");
        Ran {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}
