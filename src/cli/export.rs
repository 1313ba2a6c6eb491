//! `pdvault export`: streams `Vault.ExportRecords` for an export purpose into a CSV file
//! (UTF-8, a header row, one row per exported record: its row key, then every identity
//! field, empty when the row does not carry it), with a progress bar, resumable.
//!
//! Resuming: beside the file, `FILE.cursor` holds the last cursor the stream handed out and
//! the file's length when that row was written (written atomically, after the file is
//! flushed, every [`STATE_EVERY`] rows and when the stream ends). `--resume` cuts the file
//! back to that length and asks the vault to continue after that cursor, so rows written
//! after the last saved cursor are dropped and streamed again: no duplicates, no gaps. The
//! state file is removed once the summary arrived. Both files are created 0600: a data set
//! keyed by pseudonyms is still personal data.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::CliError;
use super::client::ClientArgs;
use crate::domain::FieldName;
use crate::proto;

/// Rows between two saves of the resume state.
const STATE_EVERY: u64 = 1000;

/// `pdvault export`: a caller granted `ExportRecords` and an export purpose.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The export purpose (configured with `export = true`).
    #[arg(long)]
    purpose: String,
    /// The CSV file to write.
    #[arg(long)]
    out: PathBuf,
    /// The justification, when the purpose requires one.
    #[arg(long, default_value = "")]
    justification: String,
    /// Continue an interrupted export of the same purpose into the same file.
    #[arg(long)]
    resume: bool,
}

/// Where an interrupted export stands.
struct ResumeState {
    cursor: String,
    length: u64,
}

fn state_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".cursor");
    PathBuf::from(name)
}

fn read_state(path: &Path) -> Result<ResumeState, CliError> {
    let text = std::fs::read_to_string(path).map_err(CliError::file("read", path))?;
    let (length, cursor) = text
        .trim_end()
        .split_once('\n')
        .ok_or_else(|| not_a_state_file(path))?;
    Ok(ResumeState {
        cursor: cursor.to_owned(),
        length: length.parse().map_err(|_| not_a_state_file(path))?,
    })
}

fn not_a_state_file(path: &Path) -> CliError {
    CliError::Refused(format!("{} is not an export state file", path.display()))
}

fn write_state(path: &Path, state: &ResumeState) -> Result<(), CliError> {
    let temporary = {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(CliError::file("write", &temporary))?;
    writeln!(file, "{}\n{}", state.length, state.cursor)
        .and_then(|()| file.sync_all())
        .map_err(CliError::file("write", &temporary))?;
    std::fs::rename(&temporary, path).map_err(CliError::file("write", path))
}

/// One CSV field (RFC 4180): quoted when it holds a separator, a quote or a line break.
fn csv_field(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\"")).into()
    } else {
        value.into()
    }
}

fn csv_row(row: &proto::ExportedRow) -> String {
    let mut line = csv_field(&row.row_key).into_owned();
    for field in FieldName::ALL {
        line.push(',');
        if let Some(released) = row.fields.get(field.as_str()) {
            line.push_str(&csv_field(&released.value));
        }
    }
    line.push('\n');
    line
}

fn header() -> String {
    let mut line = String::from("row_key");
    for field in FieldName::ALL {
        line.push(',');
        line.push_str(field.as_str());
    }
    line.push('\n');
    line
}

/// Opens the output: a new file with its header, or the interrupted one cut back to its
/// last saved row.
fn open_output(
    args: &ExportArgs,
    state_file: &Path,
) -> Result<(File, Option<ResumeState>), CliError> {
    let io = |e| CliError::file("write", &args.out)(e);
    if args.resume {
        let state = read_state(state_file)?;
        let mut file = OpenOptions::new().write(true).open(&args.out).map_err(io)?;
        file.set_len(state.length).map_err(io)?;
        file.seek(SeekFrom::End(0)).map_err(io)?;
        return Ok((file, Some(state)));
    }
    if state_file.exists() {
        return Err(CliError::Refused(format!(
            "{} holds an interrupted export: continue it with --resume, or remove it",
            state_file.display()
        )));
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&args.out)
        .map_err(io)?;
    file.write_all(header().as_bytes()).map_err(io)?;
    Ok((file, None))
}

pub async fn run(connection: &ClientArgs, args: ExportArgs) -> Result<(), CliError> {
    use crate::proto::vault_client::VaultClient;

    let state_file = state_path(&args.out);
    let (file, resumed) = open_output(&args, &state_file)?;
    let mut length = file
        .metadata()
        .map_err(CliError::file("read", &args.out))?
        .len();
    let mut out = BufWriter::new(file);
    let vault = connection.connect().await?;
    let mut client = VaultClient::new(vault.channel.clone());
    let mut cursor = resumed.map(|state| state.cursor).unwrap_or_default();
    let mut stream = client
        .export_records(vault.request(proto::ExportRecordsRequest {
            purpose: args.purpose.clone(),
            justification: args.justification.clone(),
            resume_cursor: cursor.clone(),
        }))
        .await?
        .into_inner();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} exported {pos} rows ({per_sec}, {elapsed})")
            .map_err(CliError::Progress)?,
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let io = |e| CliError::file("write", &args.out)(e);
    let mut since_save = 0u64;
    let outcome = loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break Err(CliError::from("the stream ended before its summary")),
            Err(status) => break Err(CliError::from(status)),
        };
        match message.item {
            Some(proto::export_records_response::Item::Row(row)) => {
                let line = csv_row(&row);
                out.write_all(line.as_bytes()).map_err(io)?;
                length += line.len() as u64;
                cursor = message.cursor;
                bar.inc(1);
                since_save += 1;
                if since_save >= STATE_EVERY {
                    out.flush().map_err(io)?;
                    write_state(
                        &state_file,
                        &ResumeState {
                            cursor: cursor.clone(),
                            length,
                        },
                    )?;
                    since_save = 0;
                }
            }
            Some(proto::export_records_response::Item::Summary(summary)) => break Ok(summary),
            None => break Err(CliError::from("the vault sent an empty message")),
        }
    };
    out.flush().map_err(io)?;
    out.get_ref().sync_all().map_err(io)?;
    match outcome {
        Ok(summary) => {
            bar.finish_and_clear();
            if state_file.exists() {
                std::fs::remove_file(&state_file).map_err(CliError::file("remove", &state_file))?;
            }
            println!(
                "export done: {} rows exported, {} suppressed (k = {}) into {}",
                summary.rows_exported,
                summary.rows_suppressed,
                summary.k_anonymity,
                args.out.display()
            );
            Ok(())
        }
        Err(error) => {
            bar.abandon();
            if !cursor.is_empty() {
                write_state(&state_file, &ResumeState { cursor, length })?;
                return Err(CliError::Interrupted {
                    cause: Box::new(error),
                    state: state_file,
                });
            }
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(csv_field("广西壮族自治区"), "广西壮族自治区");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        let mut row = proto::ExportedRow {
            row_key: "psn_x".into(),
            ..Default::default()
        };
        row.fields.insert(
            "gender".into(),
            proto::ReleasedField {
                value: "MALE".into(),
                level: proto::ReleaseLevel::Plain as i32,
            },
        );
        assert_eq!(csv_row(&row), "psn_x,,MALE,,,,,,,,\n");
        assert_eq!(header().split(',').count(), 11);
    }
}
