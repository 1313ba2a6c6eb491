//! `CliError`: why a command failed, the one error type of the command line. Each variant
//! keeps its cause as a `#[source]` (the lower layer's own typed error), so nothing is
//! flattened into a string before [`CliError::report`] prints the one line a failed command
//! writes: the message, then every cause.

use std::error::Error as _;
use std::path::{Path, PathBuf};

use crate::app::StartupError;
use crate::audit::CheckpointError;
use crate::config::ConfigError;
use crate::keys::KeyringError;
use crate::store::StoreError;

use super::client::ClientError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A refusal the command words itself (a contradiction in its arguments, an audit trail
    /// that does not verify, a stream that ended early).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The connection flags, or the connection they describe.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The vault refused or failed a call: its code and message; the transport's cause, when
    /// the call never reached it, is the source.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[source] tonic::Status),
    /// A call the transport failed before the vault answered, where the connection flags
    /// suggest why ([`super::ClientArgs::closed_connection_hint`]).
    #[error("the call did not reach the vault; {hint}")]
    Unreached {
        hint: &'static str,
        #[source]
        call: Box<CliError>,
    },
    /// A file the command reads or writes.
    #[error("cannot {doing} {}", path.display())]
    File {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `audit verify` could not open the database it is to verify.
    #[error("cannot verify")]
    CannotVerify(#[source] StartupError),
    #[error("witness file {}", path.display())]
    Witness {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An export stream broke after rows were written: the state file lets it continue.
    #[error("{cause}; continue with --resume (state in {})", state.display())]
    Interrupted {
        #[source]
        cause: Box<CliError>,
        state: PathBuf,
    },
    #[error("progress bar")]
    Progress(#[source] indicatif::style::TemplateError),
    /// Another failure, named by what was being done.
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `pdvault bench`: the load generator is the binary's, so its error type is not named here.
    #[error(transparent)]
    Bench(Box<dyn std::error::Error + Send + Sync>),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        CliError::Rpc(status)
    }
}

impl From<String> for CliError {
    fn from(message: String) -> CliError {
        CliError::Refused(message)
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> CliError {
        CliError::Refused(message.to_owned())
    }
}

impl CliError {
    /// This error, with `hint` (what the connection flags leave out) when it is a call or a
    /// connection the transport failed; a status the vault sent has no source.
    pub fn explained(self, hint: Option<&'static str>) -> CliError {
        let unreached = match &self {
            CliError::Rpc(status) => status.source().is_some(),
            CliError::Client(ClientError::Connect { .. }) => true,
            _ => false,
        };
        match hint {
            Some(hint) if unreached => CliError::Unreached {
                hint,
                call: Box::new(self),
            },
            _ => self,
        }
    }

    /// A failure to `doing` (read, write, ...) `path`.
    pub fn file(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.to_owned();
        move |source| CliError::File {
            doing,
            path,
            source,
        }
    }

    /// The message and every cause, for the one line a failed command prints. A cause whose
    /// text the line holds already (some errors, tonic's among them, repeat their own cause
    /// in their message) is said once.
    pub fn report(&self) -> String {
        let mut line = self.to_string();
        let mut cause = self.source();
        while let Some(inner) = cause {
            let text = inner.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = inner.source();
        }
        line
    }
}
