//! SQLite SQL of the key-versions aggregate: the states of KEK and index versions, the
//! checks every write makes against them, and the steps of key administration (run by
//! `KeyAdminTx` inside one write transaction held on the writer thread).

use rusqlite::{Connection, ToSql};

use super::driver::{execute, first, rows, scalar};
use crate::store::rules;
use crate::store::{KeyVersionRow, RecordIndexes, StoreError, queries};

/// Whether `version` is still the active KEK. Inside a write transaction, which holds
/// SQLite's one write lock from its first statement, it stays so until commit.
pub(super) fn kek_active(conn: &Connection, version: u32) -> Result<bool, StoreError> {
    Ok(
        first(conn, super::LOCK_ACTIVE_KEK, &[&i64::from(version)], |_| {
            Ok(())
        })?
        .is_some(),
    )
}

pub(super) fn index_active(conn: &Connection, version: u32) -> Result<bool, StoreError> {
    Ok(first(
        conn,
        super::LOCK_ACTIVE_INDEX,
        &[&i64::from(version)],
        |_| Ok(()),
    )?
    .is_some())
}

/// Whether a write's blind indexes may be stored: its index version is still active, no
/// other version is live that it did not compute for, and no other live record holds the
/// document under another live version. `Some` is the refusal.
pub(super) fn index_refusal(
    conn: &Connection,
    record_id: &str,
    indexes: &RecordIndexes,
) -> Result<Option<StoreError>, StoreError> {
    index_refusal_in(conn, record_id, indexes, &mut VersionChecks::default())
}

/// The key-version checks of one writer job, each read once: the writer holds SQLite's one
/// write lock for the whole job, and key administration runs in jobs of its own, so what
/// the job's first write read stays true for its later ones (a batch create's hundred
/// items read the key versions once instead of three times each).
#[derive(Default)]
pub(super) struct VersionChecks {
    kek: Vec<(u32, bool)>,
    index: Vec<(u32, bool)>,
    live_index: Option<Vec<i64>>,
}

impl VersionChecks {
    pub(super) fn kek_active(
        &mut self,
        conn: &Connection,
        version: u32,
    ) -> Result<bool, StoreError> {
        remembered(&mut self.kek, version, || kek_active(conn, version))
    }

    fn index_active(&mut self, conn: &Connection, version: u32) -> Result<bool, StoreError> {
        remembered(&mut self.index, version, || index_active(conn, version))
    }

    fn live_index(&mut self, conn: &Connection) -> Result<&[i64], StoreError> {
        if self.live_index.is_none() {
            let live = rows(conn, queries::SELECT_LIVE_INDEX_VERSIONS, &[], |row| {
                Ok(row.get(0)?)
            })?;
            self.live_index = Some(live);
        }
        Ok(self.live_index.as_deref().unwrap_or_default())
    }
}

/// Whether `version` is active, read once per job (`read`) and then from `seen`.
fn remembered(
    seen: &mut Vec<(u32, bool)>,
    version: u32,
    read: impl FnOnce() -> Result<bool, StoreError>,
) -> Result<bool, StoreError> {
    if let Some((_, active)) = seen.iter().find(|(v, _)| *v == version) {
        return Ok(*active);
    }
    let active = read()?;
    seen.push((version, active));
    Ok(active)
}

/// [`index_refusal`] with the job's [`VersionChecks`].
pub(super) fn index_refusal_in(
    conn: &Connection,
    record_id: &str,
    indexes: &RecordIndexes,
    checks: &mut VersionChecks,
) -> Result<Option<StoreError>, StoreError> {
    if !checks.index_active(conn, indexes.version)? {
        return Ok(Some(StoreError::StaleIndexVersion(indexes.version)));
    }
    if let Some(refused) = rules::index_versions_refusal(indexes, checks.live_index(conn)?) {
        return Ok(Some(refused));
    }
    if indexes.document.is_none() || indexes.document_elsewhere.is_empty() {
        return Ok(None);
    }
    let sql = queries::document_held_elsewhere(indexes.document_elsewhere.len());
    let mut params: Vec<&dyn ToSql> = vec![&record_id];
    params.extend(indexes.document_elsewhere.iter().map(|i| i as &dyn ToSql));
    let held: i64 = scalar(conn, &sql, &params)?;
    Ok((held > 0).then_some(StoreError::DuplicateDocument))
}

pub(super) fn active(conn: &Connection, kind: &str) -> Result<Option<u32>, StoreError> {
    first(conn, queries::SELECT_ACTIVE_KEY_VERSION, &[&kind], |row| {
        rules::to_version(row.get(0)?)
    })
}

pub(super) fn states(conn: &Connection, kind: &str) -> Result<Vec<(u32, String)>, StoreError> {
    rows(conn, queries::SELECT_KEY_VERSION_STATES, &[&kind], |row| {
        Ok((rules::to_version(row.get(0)?)?, row.get(1)?))
    })
}

pub(super) fn versions(conn: &Connection, kind: &str) -> Result<Vec<KeyVersionRow>, StoreError> {
    rows(conn, queries::SELECT_KEY_VERSIONS, &[&kind], |row| {
        rules::key_version(row)
    })
}

pub(super) fn state(conn: &Connection, kind: &str, version: u32) -> Result<String, StoreError> {
    first(
        conn,
        queries::SELECT_KEY_VERSION_STATE,
        &[&kind, &i64::from(version)],
        |row| Ok(row.get(0)?),
    )?
    .ok_or(StoreError::NotFound)
}

pub(super) fn max_version(conn: &Connection, kind: &str) -> Result<i64, StoreError> {
    Ok(scalar::<Option<i64>>(conn, queries::SELECT_MAX_KEY_VERSION, &[&kind])?.unwrap_or(0))
}

pub(super) fn set_state(
    conn: &Connection,
    kind: &str,
    version: u32,
    state: &str,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::SET_KEY_VERSION_STATE,
        &[&kind, &i64::from(version), &state],
    )?;
    Ok(())
}

pub(super) fn insert(
    conn: &Connection,
    kind: &str,
    version: u32,
    state: &str,
    provider: &str,
    now: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::INSERT_KEY_VERSION,
        &[&kind, &i64::from(version), &state, &provider, &now],
    )?;
    Ok(())
}

pub(super) fn records_under(
    conn: &Connection,
    kind: &str,
    version: u32,
) -> Result<i64, StoreError> {
    scalar(conn, rules::count_under(kind), &[&i64::from(version)])
}

pub(super) fn retire(
    conn: &Connection,
    kind: &str,
    version: u32,
    now: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::RETIRE_KEY_VERSION,
        &[&kind, &i64::from(version), &now],
    )?;
    Ok(())
}

pub(super) fn destroy(
    conn: &Connection,
    kind: &str,
    version: u32,
    now: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        queries::DESTROY_KEY_VERSION,
        &[&kind, &i64::from(version), &now],
    )?;
    Ok(())
}

pub(super) fn count(conn: &Connection, kind: &str) -> Result<i64, StoreError> {
    scalar(conn, queries::COUNT_KEY_VERSIONS, &[&kind])
}
