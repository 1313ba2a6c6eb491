//! What tests do to a SQLite database behind the vault's back, on rusqlite connections of
//! their own, run on blocking threads (never on the runtime's).

use std::path::PathBuf;

use rusqlite::types::FromSql;

fn path(url: &str) -> PathBuf {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .expect("a sqlite: URL");
    PathBuf::from(rest.split_once('?').map_or(rest, |(path, _)| path))
}

async fn with<T: Send + 'static>(
    url: &str,
    work: impl FnOnce(&rusqlite::Connection) -> T + Send + 'static,
) -> T {
    let path = path(url);
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(&path).expect("opens the SQLite file");
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        work(&conn)
    })
    .await
    .expect("the SQLite work ran")
}

/// Runs one or more statements.
pub async fn execute(url: &str, sql: &str) {
    let sql = sql.to_owned();
    with(url, move |conn| conn.execute_batch(&sql).unwrap()).await
}

/// The first column of every row.
pub async fn column<T: FromSql + Send + 'static>(url: &str, sql: &str) -> Vec<T> {
    let sql = sql.to_owned();
    with(url, move |conn| {
        let mut statement = conn.prepare(&sql).unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<Vec<T>, _>>()
            .unwrap()
    })
    .await
}

/// The one value a query returns.
pub async fn scalar<T: FromSql + Send + 'static>(url: &str, sql: &str) -> T {
    let sql = sql.to_owned();
    with(url, move |conn| {
        conn.query_row(&sql, [], |row| row.get(0)).unwrap()
    })
    .await
}

/// SQLite's plan for `sql`, one line per step.
pub async fn plan(url: &str, sql: &str) -> String {
    let sql = format!("EXPLAIN QUERY PLAN {sql}");
    with(url, move |conn| {
        let mut statement = conn.prepare(&sql).unwrap();
        statement
            .query_map([], |row| row.get::<_, String>("detail"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .join("\n")
    })
    .await
}
