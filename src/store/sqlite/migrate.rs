//! The SQLite schema migrations: the files of `migrations/sqlite`, embedded at build time
//! (`build.rs` lists them), applied in version order, each in one transaction of its own
//! together with the row that records it.
//!
//! The bookkeeping is sqlx's table, `_sqlx_migrations`, with sqlx's columns and checksums
//! (SHA-384 of the file): databases made by earlier releases, which ran sqlx's migrator,
//! are adopted as they are, and nothing they applied is applied twice. A database is
//! refused when it records a migration this build does not have (it is newer than the
//! code), one whose file changed since it was applied, or one that failed half-way.
//!
//! Foreign keys are off while migrations run (SQLite's procedure for rebuilding a table,
//! which a migration may need: `PRAGMA foreign_keys` cannot change inside a transaction),
//! and each migration commits only if `PRAGMA foreign_key_check` then finds nothing; they
//! are switched back on afterwards, whatever happened.

use rusqlite::Connection;
use sha2::{Digest, Sha384};

use super::driver::{execute, rows};
use crate::store::StoreError;

/// (version, description, SQL) of every migration, in version order.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] =
    include!(concat!(env!("OUT_DIR"), "/sqlite_migrations.rs"));

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "migration {version} is recorded but not known to this build: the database is newer than the code"
    )]
    Unknown { version: i64 },
    #[error("migration {version} was changed since it was applied")]
    Changed { version: i64 },
    #[error("migration {version} failed half-way earlier; repair the database by hand")]
    Dirty { version: i64 },
    #[error("migration {version} leaves rows whose foreign keys point nowhere")]
    ForeignKeys { version: i64 },
    #[error("migration {version} failed")]
    Apply {
        version: i64,
        #[source]
        source: Box<StoreError>,
    },
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations ( \
     version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
     installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, \
     checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)";

const APPLIED: &str = "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version";

const IS_APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE version = $1";

const RECORD: &str = "INSERT INTO _sqlx_migrations \
     (version, description, success, checksum, execution_time) VALUES ($1, $2, 1, $3, $4)";

fn checksum(sql: &str) -> Vec<u8> {
    Sha384::digest(sql.as_bytes()).to_vec()
}

/// Applies every migration the database lacks; returns how many it applied. Runs on the
/// writer thread, the one connection that writes.
pub(super) fn run(conn: &mut Connection) -> Result<usize, StoreError> {
    run_list(conn, MIGRATIONS)
}

/// [`run`] over a given list of migrations.
pub(super) fn run_list(
    conn: &mut Connection,
    migrations: &[(i64, &str, &str)],
) -> Result<usize, StoreError> {
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let applied = apply_pending(conn, migrations);
    let restored = conn.pragma_update(None, "foreign_keys", "ON");
    let applied = applied?;
    restored?;
    Ok(applied)
}

fn apply_pending(
    conn: &mut Connection,
    migrations: &[(i64, &str, &str)],
) -> Result<usize, StoreError> {
    execute(conn, CREATE_TABLE, &[])?;
    let applied: Vec<(i64, bool, Vec<u8>)> = rows(conn, APPLIED, &[], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })?;
    for (version, success, recorded) in &applied {
        let version = *version;
        if !success {
            return Err(MigrationError::Dirty { version }.into());
        }
        match migrations.iter().find(|(known, _, _)| *known == version) {
            None => return Err(MigrationError::Unknown { version }.into()),
            Some((_, _, sql)) if checksum(sql) != *recorded => {
                return Err(MigrationError::Changed { version }.into());
            }
            Some(_) => {}
        }
    }
    let mut count = 0;
    for (version, description, sql) in migrations {
        if applied.iter().any(|(done, _, _)| done == version) {
            continue;
        }
        let apply = |conn: &mut Connection| -> Result<bool, StoreError> {
            let started = std::time::Instant::now();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Another process may have applied it since the list was read.
            if !rows(&tx, IS_APPLIED, &[version], |_| Ok(()))?.is_empty() {
                return Ok(false);
            }
            tx.execute_batch(sql)?;
            let dangling = rows(&tx, "PRAGMA foreign_key_check", &[], |_| Ok(()))?;
            if !dangling.is_empty() {
                return Err(MigrationError::ForeignKeys { version: *version }.into());
            }
            let nanos = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
            execute(&tx, RECORD, &[version, description, &checksum(sql), &nanos])?;
            tx.commit()?;
            Ok(true)
        };
        match apply(conn) {
            Ok(true) => count += 1,
            Ok(false) => {}
            Err(refused @ StoreError::SqliteMigration(_)) => return Err(refused),
            Err(source) => {
                return Err(MigrationError::Apply {
                    version: *version,
                    source: Box::new(source),
                }
                .into());
            }
        }
    }
    Ok(count)
}
