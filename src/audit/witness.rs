//! The witness: a copy of every chained checkpoint kept where the database's administrators
//! cannot rewrite it, and the reader that hands those copies to verification.
//!
//! The vault appends one JSON line per checkpoint to its sink (`audit.checkpoint_sink`):
//! standard output by default (logs go to standard error, so the line stands alone for the
//! journal or a log shipper), or a file opened with `O_APPEND` and synced after every line.
//! A file meant as a witness belongs on other storage (another volume, a host the database
//! administrators do not control, a file with the append-only attribute): whoever can
//! rewrite it can hide what it would show.
//!
//! Reading accepts what a capture of standard output looks like: lines that do not carry
//! the `pdvault_checkpoint` key are skipped (other log lines), and a line that does but is
//! not a checkpoint is a problem, unless it is a torn write: the process died mid-line, so
//! the fragment is the last line, or (a file sink ends it with a newline before appending
//! again) the start of a later line, the same checkpoint written again. The same checkpoint
//! appearing twice is fine: after a crash the signer writes its last checkpoint again rather
//! than risk it missing.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::audit_chain::{ChainHead, Checkpoint, CheckpointLink, Problem};

/// The key every witness line carries, with the checkpoint format as its value.
const MARKER: &str = "pdvault_checkpoint";
/// The longest line read; a checkpoint adopting thousands of legacy chains stays far below.
const MAX_LINE: u64 = 16 * 1024 * 1024;

/// Where checkpoints are witnessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointSink {
    Stdout,
    File(PathBuf),
}

impl CheckpointSink {
    /// `stdout`, or the path of a file. `None` for an empty value.
    pub fn parse(value: &str) -> Option<CheckpointSink> {
        match value.trim() {
            "" => None,
            "stdout" => Some(CheckpointSink::Stdout),
            path => Some(CheckpointSink::File(PathBuf::from(path))),
        }
    }

    /// The witness file verification can read back, when the sink is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            CheckpointSink::Stdout => None,
            CheckpointSink::File(path) => Some(path),
        }
    }

    /// Appends `checkpoint` as one line and makes it durable (blocking I/O).
    pub fn append(&self, checkpoint: &Checkpoint) -> std::io::Result<()> {
        let mut line = witness_line(checkpoint)?;
        line.push('\n');
        match self {
            CheckpointSink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            CheckpointSink::File(path) => append_durably(path, line.as_bytes()),
        }
    }
}

impl std::fmt::Display for CheckpointSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointSink::Stdout => f.write_str("stdout"),
            CheckpointSink::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One checkpoint as a witness line (and as the signer keeps its last one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WitnessLine {
    pdvault_checkpoint: u8,
    signer: String,
    counter: i64,
    key_id: String,
    #[serde(with = "crate::domain::audit_chain::hex_bytes")]
    prev: Vec<u8>,
    created_at: i64,
    heads: Vec<ChainHead>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    closed: Vec<String>,
    #[serde(with = "crate::domain::audit_chain::hex_bytes")]
    signature: Vec<u8>,
}

impl WitnessLine {
    /// `None` for a format-1 checkpoint, which has no place in a signer's chain to witness.
    pub(crate) fn of(checkpoint: &Checkpoint) -> Option<WitnessLine> {
        let link = checkpoint.link.as_ref()?;
        Some(WitnessLine {
            pdvault_checkpoint: checkpoint.format(),
            signer: link.signer.clone(),
            counter: link.counter,
            key_id: link.key_id.clone(),
            prev: link.prev.clone(),
            created_at: checkpoint.created_at,
            heads: checkpoint.heads.clone(),
            closed: link.closed.clone(),
            signature: checkpoint.signature.clone(),
        })
    }

    pub(crate) fn into_checkpoint(self) -> Option<Checkpoint> {
        (self.pdvault_checkpoint == crate::domain::audit_chain::CHECKPOINT_FORMAT_CHAINED)
            .then_some(Checkpoint {
                id: 0,
                created_at: self.created_at,
                heads: self.heads,
                signature: self.signature,
                link: Some(CheckpointLink {
                    signer: self.signer,
                    counter: self.counter,
                    key_id: self.key_id,
                    prev: self.prev,
                    closed: self.closed,
                }),
            })
    }
}

fn witness_line(checkpoint: &Checkpoint) -> std::io::Result<String> {
    let line = WitnessLine::of(checkpoint).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "only chained checkpoints are witnessed",
        )
    })?;
    serde_json::to_string(&line).map_err(std::io::Error::other)
}

/// Opens with `O_APPEND` (every write lands at the end, whatever else appends), creates the
/// file private to the vault's user, and syncs the line (and a new file's directory entry).
/// A file not ending in a newline (a write torn by a crash) gets one first, so the torn
/// fragment stays a line of its own.
fn append_durably(path: &Path, line: &[u8]) -> std::io::Result<()> {
    let existed = path.exists();
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    if ends_mid_line(&file)? {
        file.write_all(b"\n")?;
    }
    file.write_all(line)?;
    file.sync_data()?;
    if !existed && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(unix)]
fn ends_mid_line(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, length - 1)?;
    Ok(last[0] != b'\n')
}

#[cfg(not(unix))]
fn ends_mid_line(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(false)
}

/// The checkpoints a witness file holds, and what was wrong with it.
#[derive(Debug, Default, Clone)]
pub struct Witness {
    pub checkpoints: Vec<Checkpoint>,
    pub problems: Vec<Problem>,
}

impl Witness {
    /// Reads the file at `path` (blocking I/O).
    pub fn read(path: &Path) -> std::io::Result<Witness> {
        Ok(Witness::from_reader(std::io::BufReader::new(
            std::fs::File::open(path)?,
        )))
    }

    /// A witness that could not be read: verification reports it instead of passing
    /// without it.
    pub fn unreadable(error: &std::io::Error) -> Witness {
        Witness {
            checkpoints: Vec::new(),
            problems: vec![Problem::Witness {
                detail: format!("cannot be read ({})", error.kind()),
            }],
        }
    }

    pub fn from_reader(mut reader: impl BufRead) -> Witness {
        let mut witness = Witness::default();
        // Lines that are no checkpoint: (line number, text, index of the next checkpoint).
        let mut unreadable: Vec<(usize, String, usize)> = Vec::new();
        let mut line = Vec::new();
        for number in 1usize.. {
            line.clear();
            let read = match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
                Ok(read) => read,
                Err(error) => {
                    witness.problems.push(Problem::Witness {
                        detail: format!("reading line {number} failed ({})", error.kind()),
                    });
                    break;
                }
            };
            if read == 0 {
                break;
            }
            let complete = line.last() == Some(&b'\n');
            if !complete && read as u64 == MAX_LINE {
                witness.problems.push(Problem::Witness {
                    detail: format!("line {number} is longer than {MAX_LINE} bytes"),
                });
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if !text.contains(MARKER) {
                continue;
            }
            match serde_json::from_str::<WitnessLine>(text.trim())
                .ok()
                .and_then(WitnessLine::into_checkpoint)
            {
                Some(checkpoint) => witness.checkpoints.push(checkpoint),
                // A torn last line: the process died in the middle of writing it.
                None if !complete => {}
                None => {
                    unreadable.push((number, text.trim().to_owned(), witness.checkpoints.len()))
                }
            }
        }
        for (number, text, next) in unreadable {
            let torn = witness.checkpoints[next..].iter().any(|checkpoint| {
                witness_line(checkpoint).is_ok_and(|line| line.starts_with(&text))
            });
            if !torn {
                witness.problems.push(Problem::Witness {
                    detail: format!("line {number} is not a checkpoint this build can read"),
                });
            }
        }
        witness
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(counter: i64) -> Checkpoint {
        Checkpoint {
            id: 7,
            created_at: 1_780_000_000_000_000,
            heads: vec![ChainHead {
                chain_id: "chn_a".into(),
                seq: 3,
                hash: vec![0xab; 32],
            }],
            signature: vec![0xcd; 64],
            link: Some(CheckpointLink {
                signer: "sgn_a".into(),
                counter,
                key_id: "0011223344556677".into(),
                prev: vec![0xef; 32],
                closed: vec!["chn_a".into()],
            }),
        }
    }

    #[test]
    fn a_file_sink_appends_lines_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.jsonl");
        let sink = CheckpointSink::parse(path.to_str().unwrap()).unwrap();
        sink.append(&checkpoint(1)).unwrap();
        sink.append(&checkpoint(2)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let witness = Witness::read(&path).unwrap();
        assert!(witness.problems.is_empty(), "{:?}", witness.problems);
        let read: Vec<Checkpoint> = witness.checkpoints;
        let expected: Vec<Checkpoint> = [checkpoint(1), checkpoint(2)]
            .into_iter()
            .map(|c| Checkpoint { id: 0, ..c })
            .collect();
        assert_eq!(read, expected);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            2,
            "one line per checkpoint"
        );
    }

    #[test]
    fn other_lines_are_skipped_a_torn_last_line_too_but_a_bad_checkpoint_is_reported() {
        let good = witness_line(&checkpoint(1)).unwrap();
        let text = format!(
            "starting up\n{good}\n{{\"pdvault_checkpoint\":2,\"signer\":\"sgn_a\"}}\n{}",
            &good[..20]
        );
        let witness = Witness::from_reader(text.as_bytes());
        assert_eq!(witness.checkpoints.len(), 1);
        assert_eq!(
            witness.problems,
            [Problem::Witness {
                detail: "line 3 is not a checkpoint this build can read".into()
            }]
        );
    }

    #[test]
    fn a_write_torn_by_a_crash_is_ended_and_the_fragment_ignored_once_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.jsonl");
        let sink = CheckpointSink::File(path.clone());
        sink.append(&checkpoint(1)).unwrap();
        let torn = witness_line(&checkpoint(2)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn.as_bytes()[..30])
            .unwrap();
        // The signer writes the checkpoint again after the crash.
        sink.append(&checkpoint(2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        let witness = Witness::read(&path).unwrap();
        assert!(witness.problems.is_empty(), "{:?}", witness.problems);
        assert_eq!(witness.checkpoints.len(), 2);
        // A fragment nothing completes is reported (60 bytes reach the counter, 2, where the
        // next line has 3).
        let text = format!(
            "{}\n{}\n",
            &torn[..60],
            witness_line(&checkpoint(3)).unwrap()
        );
        assert_eq!(Witness::from_reader(text.as_bytes()).problems.len(), 1);
    }

    #[test]
    fn format_1_checkpoints_are_not_witnessed() {
        let legacy = Checkpoint {
            link: None,
            ..checkpoint(1)
        };
        let dir = tempfile::tempdir().unwrap();
        let sink = CheckpointSink::File(dir.path().join("w"));
        assert!(sink.append(&legacy).is_err());
        assert_eq!(CheckpointSink::parse(" "), None);
        assert_eq!(
            CheckpointSink::parse("stdout"),
            Some(CheckpointSink::Stdout)
        );
    }
}
