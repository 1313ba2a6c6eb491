//! Seeds a vault's SQLite database with synthetic records, for measuring the rewrap job on
//! a realistic volume: `cargo run --release --example seed_records -- <data_dir> <count>`.
//!
//! Each record is made the way the vault makes one (a fresh data key, two sealed fields,
//! the key wrapped under the active KEK), but inserted many per transaction, because
//! creating 100 000 records one durable commit at a time through the API is a benchmark of
//! fsync, not of anything this tool is for. The identities are synthetic.

use std::path::PathBuf;

use pdvault::app::{open_keys, open_store};
use pdvault::config::Config;
use pdvault::crypto::DataKey;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(
        args.next()
            .ok_or("usage: seed_records <data_dir> <count>")?,
    );
    let count: usize = args
        .next()
        .ok_or("usage: seed_records <data_dir> <count>")?
        .parse()?;
    std::fs::create_dir_all(&data_dir)?;
    let config = Config {
        data_dir: data_dir.clone(),
        ..Config::default()
    };
    let store = open_store(&config).await?;
    store.migrate().await?;
    let keys = open_keys(&config, &store, chrono::Utc::now().timestamp_micros()).await?;
    let url = config.database_url();
    // The vault is not running: this tool is the database's only writer. Blocking SQLite
    // work runs off the runtime's threads.
    let path = PathBuf::from(url.trim_start_matches("sqlite://"));
    tokio::task::spawn_blocking(
        move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let mut conn = rusqlite::Connection::open(&path)?;
            let now = chrono::Utc::now().timestamp_micros();
            let mut done = 0;
            while done < count {
                let tx = conn.transaction()?;
                for i in done..(done + 1_000).min(count) {
                    let mut id = [0u8; 16];
                    getrandom::fill(&mut id)?;
                    let record_id = format!(
                        "rec_{}",
                        data_encoding::BASE32_NOPAD.encode(&id).to_lowercase()
                    );
                    let dek = DataKey::generate()?;
                    let (wrapped, version) = keys.wrap(&dek, &record_id)?;
                    tx.execute(
                        "INSERT INTO records (record_id, version, created_at, updated_at, \
                     wrapped_key, kek_version) VALUES (?1, 1, ?2, ?2, ?3, ?4)",
                        rusqlite::params![record_id, now, wrapped, i64::from(version)],
                    )?;
                    for (field, value) in [
                        ("name", "张三".to_owned()),
                        ("email", format!("p{i}@example.com")),
                    ] {
                        tx.execute(
                            "INSERT INTO record_fields (record_id, field, ciphertext) \
                         VALUES (?1, ?2, ?3)",
                            rusqlite::params![
                                record_id,
                                field,
                                dek.seal_field(&record_id, field, value.as_bytes())?
                            ],
                        )?;
                    }
                }
                tx.commit()?;
                done = (done + 1_000).min(count);
            }
            Ok(())
        },
    )
    .await?
    .map_err(|error| error.to_string())?;
    store.close().await;
    println!("seeded {count} records into {url}");
    Ok(())
}
