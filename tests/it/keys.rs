//! End-to-end tests of `pdvault.v1.KeyManagement`: rotation, rewrap, retirement and
//! destruction, on both backends, with several instances sharing one database where the
//! scenario is about instances; re-keying and the retention purge.

use crate::support::fixtures::{create_request, get, reason};
use crate::support::{Backend, CLAIMS, TestApp, authed, join_all};
use pdvault::proto::{
    self, CreateRecordRequest, DeleteRecordRequest, DestroyKeyVersionRequest, GetKeyStatusRequest,
    GetRecordRequest, Identity, KeyVersionState, PurgeExpiredRecordsRequest, RekeyRecordRequest,
    RetireKeyVersionRequest, RewrapRecordsRequest, RotateKeyEncryptionKeyRequest,
    UpdateRecordRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

/// A record id from a response, as the store takes it.
fn record_id(raw: &str) -> pdvault::domain::ids::RecordId {
    pdvault::domain::ids::RecordId::parse("record_id", raw).unwrap()
}

fn person(i: usize) -> Identity {
    Identity {
        name: "张三".into(),
        email: format!("person{i}@example.com"),
        ..Identity::default()
    }
}

async fn create(app: &TestApp, i: usize) -> String {
    app.client()
        .await
        .create_record(authed(CLAIMS.token, create_request(person(i), "")))
        .await
        .expect("create succeeds")
        .into_inner()
        .record_id
}

async fn email_of(app: &TestApp, record_id: &str) -> Result<String, tonic::Status> {
    let response = app
        .client()
        .await
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: record_id.into(),
                purpose: "service-delivery".into(),
                justification: String::new(),
                fields: vec!["email".into()],
            },
        ))
        .await?
        .into_inner();
    Ok(response.fields["email"].value.clone())
}

async fn status(app: &TestApp) -> proto::KeyStatus {
    app.keys_client()
        .await
        .get_key_status(authed(&app.admin_token, GetKeyStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// (state, record count) of one version.
async fn version_state(app: &TestApp, version: u32) -> (KeyVersionState, i64) {
    let status = status(app).await;
    let v = status
        .versions
        .iter()
        .find(|v| v.version == version)
        .unwrap_or_else(|| panic!("version {version} listed"));
    (v.state(), v.record_count)
}

async fn rotate(app: &TestApp, expected: u32) -> proto::RotateKeyEncryptionKeyResponse {
    app.keys_client()
        .await
        .rotate_key_encryption_key(authed(
            &app.admin_token,
            RotateKeyEncryptionKeyRequest {
                expected_active_version: expected,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Runs a rewrap job to its end and returns every progress message.
async fn rewrap(
    app: &TestApp,
    batch_size: u32,
) -> Result<Vec<proto::RewrapProgress>, tonic::Status> {
    let mut stream = app
        .keys_client()
        .await
        .rewrap_records(authed(
            &app.admin_token,
            RewrapRecordsRequest { batch_size },
        ))
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(progress) = stream.message().await? {
        all.push(progress);
    }
    Ok(all)
}

async fn retire(app: &TestApp, version: u32) -> Result<proto::KeyVersion, tonic::Status> {
    app.keys_client()
        .await
        .retire_key_version(authed(
            &app.admin_token,
            RetireKeyVersionRequest {
                version,
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn destroy(app: &TestApp, version: u32) -> Result<proto::KeyVersion, tonic::Status> {
    app.keys_client()
        .await
        .destroy_key_version(authed(
            &app.admin_token,
            DestroyKeyVersionRequest {
                version,
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

fn keyring_path(app: &TestApp) -> std::path::PathBuf {
    app.data_dir.path().join("data").join("keyring.json")
}

/// A second vault instance on the same database and keyring file, as a deployment with
/// several instances behind a load balancer would run.
async fn sibling(app: &TestApp) -> TestApp {
    let url = app.database_url.clone();
    let keyring = keyring_path(app);
    let token = app.data_dir.path().join("data").join("admin.token");
    TestApp::spawn_with(app.backend, move |config| {
        config.database.url = Some(url);
        config.keys.keyring_path = Some(keyring);
        config.admin.token_path = Some(token);
    })
    .await
    .expect("a sibling starts wherever its first instance did")
}

async fn lifecycle_rotate_rewrap_retire_destroy(app: &TestApp) {
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(create(app, i).await);
    }
    let before = status(app).await;
    assert_eq!(before.active_version, 1);
    assert_eq!(version_state(app, 1).await, (KeyVersionState::Active, 30));

    let rotated = rotate(app, 0).await;
    assert!(rotated.created);
    let active = rotated.active.unwrap();
    assert_eq!(
        (active.version, active.state()),
        (2, KeyVersionState::Active)
    );
    assert_eq!(
        version_state(app, 1).await,
        (KeyVersionState::DecryptOnly, 30)
    );

    // Nothing may be retired or destroyed while it still wraps keys, nor out of order.
    let refused = retire(app, 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "KEY_VERSION_IN_USE");
    let refused = destroy(app, 1).await.unwrap_err();
    assert_eq!(reason(&refused), "KEY_VERSION_STATE");
    let refused = retire(app, 2).await.unwrap_err();
    assert_eq!(
        reason(&refused),
        "KEY_VERSION_STATE",
        "the active one stays"
    );
    let refused = retire(app, 9).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);

    // New records go under the new version; old ones still read.
    let fresh = create(app, 100).await;
    assert_eq!(version_state(app, 2).await, (KeyVersionState::Active, 1));
    assert_eq!(email_of(app, &ids[0]).await.unwrap(), "person0@example.com");

    let progress = rewrap(app, 7).await.unwrap();
    let last = progress.last().unwrap();
    assert!(last.done);
    assert_eq!((last.total, last.rewrapped, last.remaining), (30, 30, 0));
    assert_eq!(last.target_version, 2);
    // 30 records in batches of 7: a first report, five batches, and the final one.
    assert_eq!(progress.len(), 7, "{progress:?}");
    assert_eq!(
        version_state(app, 1).await,
        (KeyVersionState::DecryptOnly, 0)
    );
    assert_eq!(version_state(app, 2).await, (KeyVersionState::Active, 31));

    // A second run finds nothing to do.
    let again = rewrap(app, 7).await.unwrap();
    assert_eq!(again.last().unwrap().rewrapped, 0);

    assert_eq!(
        retire(app, 1).await.unwrap().state(),
        KeyVersionState::Retired
    );
    assert_eq!(
        destroy(app, 1).await.unwrap().state(),
        KeyVersionState::Destroyed
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            email_of(app, id).await.unwrap(),
            format!("person{i}@example.com")
        );
    }
    assert_eq!(
        email_of(app, &fresh).await.unwrap(),
        "person100@example.com"
    );

    // The material is gone from the keyring file, not only marked.
    let keyring = std::fs::read_to_string(keyring_path(app)).unwrap();
    let file: serde_json::Value = serde_json::from_str(&keyring).unwrap();
    let versions: Vec<u64> = file["keks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2]);

    // Each key operation is an audit event naming the version and no key material.
    for rpc in [
        "RotateKeyEncryptionKey",
        "RewrapRecords",
        "RetireKeyVersion",
        "DestroyKeyVersion",
    ] {
        let n = app
            .count(&format!(
                "SELECT COUNT(*) FROM audit_events WHERE rpc = '{rpc}' AND caller = 'admin'"
            ))
            .await;
        assert!(n >= 1, "{rpc} audited");
    }
}

async fn key_management_needs_the_keys_rotate_grant(app: &TestApp) {
    let mut client = app.keys_client().await;
    let denied = client
        .rotate_key_encryption_key(authed(
            CLAIMS.token,
            RotateKeyEncryptionKeyRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");
    let denied = client
        .get_key_status(authed(CLAIMS.token, GetKeyStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");
    let mut stream = client
        .rewrap_records(authed(CLAIMS.token, RewrapRecordsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let denied = stream.message().await.unwrap_err();
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");
    let denied = client
        .destroy_key_version(authed(
            CLAIMS.token,
            DestroyKeyVersionRequest {
                version: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");
    let unauthenticated = client
        .get_key_status(authed("wrong-token", GetKeyStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    assert_eq!(status(app).await.versions.len(), 1, "nothing changed");
}

async fn concurrent_rotations_on_two_instances_make_one_version(app: &TestApp) {
    let other = sibling(app).await;
    let record = create(app, 1).await;
    let mut calls = Vec::new();
    for i in 0..8 {
        let target = if i % 2 == 0 { app } else { &other };
        calls.push(rotate(target, 1));
    }
    let outcomes = join_all(calls.into_iter().map(Box::pin).collect()).await;
    assert_eq!(outcomes.iter().filter(|o| o.created).count(), 1);
    assert!(
        outcomes
            .iter()
            .all(|o| o.active.as_ref().unwrap().version == 2)
    );
    let status = status(app).await;
    assert_eq!(status.active_version, 2);
    assert_eq!(status.versions.len(), 2);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM key_versions WHERE key_kind = 'kek' AND state = 'ACTIVE'")
            .await,
        1
    );

    // Without an expected version, rotations in a row each create one.
    assert!(rotate(&other, 0).await.created);
    assert_eq!(status_of(app).await, 3);

    // The first instance never rotated to 3 itself: its next write learns of the new
    // version, and the record lands under it.
    let written_by_first = create(app, 2).await;
    assert_eq!(version_state(app, 3).await.1, 1);
    // And the second instance reads it, and the first reads what the second wrote.
    assert_eq!(
        email_of(&other, &written_by_first).await.unwrap(),
        "person2@example.com"
    );
    let written_by_second = create(&other, 3).await;
    assert_eq!(
        email_of(app, &written_by_second).await.unwrap(),
        "person3@example.com"
    );
    assert_eq!(
        email_of(&other, &record).await.unwrap(),
        "person1@example.com"
    );
    other.stop().await;
}

async fn status_of(app: &TestApp) -> u32 {
    status(app).await.active_version
}

/// Two rewrap jobs, on two instances, while clients keep creating, updating and reading.
async fn rewrap_alongside_traffic_and_a_second_job(app: &TestApp) {
    const RECORDS: usize = 300;
    let other = sibling(app).await;
    let mut ids = Vec::new();
    for i in 0..RECORDS {
        ids.push(create(app, i).await);
    }
    assert!(rotate(app, 1).await.created);

    let traffic = async {
        let mut created = Vec::new();
        for round in 0..40 {
            let id = &ids[round * 7 % RECORDS];
            // Reads during the rewrap see the data whichever version wraps it.
            let email = email_of(app, id).await.unwrap();
            assert!(email.ends_with("@example.com"));
            let record = app
                .client()
                .await
                .get_record(authed(
                    CLAIMS.token,
                    GetRecordRequest {
                        record_id: id.clone(),
                        purpose: "service-delivery".into(),
                        justification: String::new(),
                        fields: vec![],
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            other
                .client()
                .await
                .update_record(authed(
                    CLAIMS.token,
                    UpdateRecordRequest {
                        record_id: id.clone(),
                        identity: Some(Identity {
                            name: "李四".into(),
                            ..Identity::default()
                        }),
                        update_mask: None,
                        etag: record.etag,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            created.push(create(&other, 1000 + round).await);
        }
        created
    };
    let (first, second, created) = tokio::join!(rewrap(app, 16), rewrap(&other, 16), traffic);
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(first.last().unwrap().done && second.last().unwrap().done);
    // Between them the jobs rewrapped every record exactly once.
    assert_eq!(
        first.last().unwrap().rewrapped + second.last().unwrap().rewrapped,
        RECORDS as i64
    );
    assert_eq!(
        app.count("SELECT CAST(COALESCE(SUM(rewrapped), 0) AS BIGINT) FROM rewrap_jobs")
            .await,
        RECORDS as i64
    );
    assert_eq!(
        version_state(app, 1).await,
        (KeyVersionState::DecryptOnly, 0)
    );
    retire(app, 1).await.unwrap();
    destroy(app, 1).await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            email_of(&other, id).await.unwrap(),
            format!("person{i}@example.com")
        );
    }
    for (round, id) in created.iter().enumerate() {
        assert_eq!(
            email_of(app, id).await.unwrap(),
            format!("person{}@example.com", 1000 + round)
        );
    }
    other.stop().await;
}

/// A KEK version destroyed through one instance is refused by every other instance within
/// `keys.state_cache_ms`, even one that still holds its material, or (with a hardware
/// module) a data key it unwrapped in its cache: here an old row, still wrapped under the
/// destroyed version, put back into the live database (a restored backup, or the database
/// administrator). The other instance drops the material too.
async fn destruction_reaches_every_instance(app: &TestApp) {
    let other = sibling(app).await;
    let record = create(app, 1).await;
    let select = format!("SELECT wrapped_key FROM records WHERE record_id = '{record}'");
    let under_v1 = app.bytes(&select).await;
    // Read through the other instance: a hardware module's cache now holds its data key.
    assert_eq!(
        email_of(&other, &record).await.unwrap(),
        "person1@example.com"
    );
    assert!(rotate(app, 1).await.created);
    rewrap(app, 0).await.unwrap();
    retire(app, 1).await.unwrap();
    assert!(other.vault.keys().provider_versions().unwrap().contains(&1));

    destroy(app, 1).await.unwrap();
    let destroyed_at = std::time::Instant::now();
    let old_key = match app.backend {
        Backend::Sqlite => format!("X'{}'", hex(&under_v1)),
        Backend::Postgres => format!("'\\x{}'::bytea", hex(&under_v1)),
    };
    app.execute_sql(&format!(
        "UPDATE records SET wrapped_key = {old_key}, kek_version = 1 \
         WHERE record_id = '{record}'"
    ))
    .await;
    assert_eq!(app.bytes(&select).await, under_v1);

    // The destroying instance refuses at once...
    let refused = email_of(app, &record).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "KEY_VERSION_DESTROYED");
    // ...and the other one within the state cache's lifetime (plus scheduling slack on a
    // loaded machine), whatever it still held when the version was destroyed.
    let window = std::time::Duration::from_millis(app.config.keys.state_cache_ms);
    let refused_after = loop {
        match email_of(&other, &record).await {
            Err(status) if reason(&status) == "KEY_VERSION_DESTROYED" => {
                break destroyed_at.elapsed();
            }
            outcome => assert!(
                destroyed_at.elapsed() < window + std::time::Duration::from_secs(3),
                "still answered {outcome:?} {:?} after the destruction",
                destroyed_at.elapsed()
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    eprintln!("the other instance refused {refused_after:?} after the destruction");
    // Its background task dropped the material (with the local provider, the KEK it held).
    let dropped_by = std::time::Instant::now() + window + std::time::Duration::from_secs(3);
    while other.vault.keys().provider_versions().unwrap().contains(&1) {
        assert!(
            std::time::Instant::now() < dropped_by,
            "material still held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Both refusals are audited as such.
    let audited = app
        .count(
            "SELECT COUNT(*) FROM audit_events \
             WHERE rpc = 'GetRecord' AND reason = 'KEY_VERSION_DESTROYED'",
        )
        .await;
    assert!(audited >= 2, "{audited}");
    other.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deletion reaches backups once every KEK version that wrapped the deleted key is gone.
async fn crypto_shredding_reaches_an_old_copy_of_the_database(app: &TestApp) {
    let deleted = create(app, 1).await;
    let kept = create(app, 2).await;
    let backup = Backup::take(app).await;

    app.client()
        .await
        .delete_record(authed(
            CLAIMS.token,
            DeleteRecordRequest {
                record_id: deleted.clone(),
                reason: "erasure request".into(),
            },
        ))
        .await
        .unwrap();
    assert!(rotate(app, 1).await.created);
    rewrap(app, 0).await.unwrap();
    retire(app, 1).await.unwrap();
    destroy(app, 1).await.unwrap();

    // The old copy still holds the deleted person's ciphertexts and wrapped key...
    let old = backup.store().await;
    let old_deleted = old
        .get_record(&record_id(&deleted))
        .await
        .unwrap()
        .expect("in the copy");
    let old_kept = old
        .get_record(&record_id(&kept))
        .await
        .unwrap()
        .expect("in the copy");
    assert!(!old_deleted.fields.is_empty());

    // ...but no key that still exists opens them: the copy's wrapped key names version 1,
    // whose material is destroyed, and the live database holds no key for that record.
    let keyring = pdvault::keys::Keyring::load(&keyring_path(app)).unwrap();
    assert!(matches!(
        keyring.unwrap(&old_deleted.wrapped_key, &deleted),
        Err(pdvault::crypto::CryptoError::UnknownKey { version: 1, .. })
    ));
    let live = backup.live_store(app).await;
    assert!(
        live.get_record(&record_id(&deleted))
            .await
            .unwrap()
            .is_none()
    );

    // A record that still exists keeps its data key across the rewrap: the live wrapped key
    // opens the copy's ciphertexts, so restoring from the copy loses nobody who exists.
    let live_kept = live.get_record(&record_id(&kept)).await.unwrap().unwrap();
    let dek = keyring.unwrap(&live_kept.wrapped_key, &kept).unwrap();
    let email = old_kept.fields.iter().find(|f| f.field == "email").unwrap();
    let plain = dek.open_field(&kept, "email", &email.ciphertext).unwrap();
    assert_eq!(plain.as_slice(), b"person2@example.com");
    assert_eq!(email_of(app, &kept).await.unwrap(), "person2@example.com");
    backup.drop().await;
}

/// A copy of the vault's database taken at one moment: the SQLite file, or a PostgreSQL
/// database cloned with pg_dump.
struct Backup {
    url: String,
    admin_url: Option<String>,
    _dir: tempfile::TempDir,
}

impl Backup {
    async fn take(app: &TestApp) -> Backup {
        let dir = tempfile::tempdir().unwrap();
        match app.backend {
            Backend::Sqlite => {
                // Fold the WAL into the main file first so one file is the whole database.
                app.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").await;
                let copy = dir.path().join("backup.db");
                std::fs::copy(app.sqlite_path(), &copy).unwrap();
                // Should a reader have kept the checkpoint from finishing, the WAL holds
                // the rest: copy it too, as a file-level backup tool would.
                let wal = format!("{}-wal", app.sqlite_path().display());
                if std::path::Path::new(&wal).exists() {
                    std::fs::copy(&wal, dir.path().join("backup.db-wal")).unwrap();
                }
                Backup {
                    url: format!("sqlite://{}", copy.display()),
                    admin_url: None,
                    _dir: dir,
                }
            }
            Backend::Postgres => {
                let dump = tokio::process::Command::new("pg_dump")
                    .arg("--no-owner")
                    .arg(&app.database_url)
                    .output()
                    .await
                    .expect("pg_dump runs");
                assert!(dump.status.success());
                let (base, _) = app.database_url.rsplit_once('/').unwrap();
                let name = format!("{}_backup", app.database_url.rsplit_once('/').unwrap().1);
                let admin_url = format!("{base}/postgres");
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
                    .await
                    .unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let url = format!("{base}/{name}");
                let mut restore = tokio::process::Command::new("psql")
                    .arg("--quiet")
                    .arg("--set=ON_ERROR_STOP=1")
                    .arg(&url)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("psql runs");
                use tokio::io::AsyncWriteExt;
                let mut stdin = restore.stdin.take().unwrap();
                stdin.write_all(&dump.stdout).await.unwrap();
                drop(stdin);
                assert!(restore.wait().await.unwrap().success());
                Backup {
                    url,
                    admin_url: Some(admin_url),
                    _dir: dir,
                }
            }
        }
    }

    async fn store(&self) -> std::sync::Arc<dyn pdvault::store::Store> {
        open(&self.url).await
    }

    async fn live_store(&self, app: &TestApp) -> std::sync::Arc<dyn pdvault::store::Store> {
        open(&app.database_url).await
    }

    async fn drop(self) {
        if let Some(admin_url) = &self.admin_url {
            let name = self.url.rsplit_once('/').unwrap().1;
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url)
                .await
                .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
}

async fn open(url: &str) -> std::sync::Arc<dyn pdvault::store::Store> {
    let mut config = pdvault::config::Config::default();
    config.database.url = Some(url.to_owned());
    pdvault::app::open_store(&config).await.unwrap()
}

async fn rekey_replaces_the_data_key_and_every_ciphertext(app: &TestApp) {
    let id = create(app, 7).await;
    assert!(rotate(app, 1).await.created);
    let store = open(&app.database_url).await;
    let before = store.get_record(&record_id(&id)).await.unwrap().unwrap();
    let keyring = pdvault::keys::Keyring::load(&keyring_path(app)).unwrap();
    let old_key = keyring.unwrap(&before.wrapped_key, &id).unwrap();
    let etag_before = get(app, CLAIMS.token, &id, "service-delivery", "")
        .await
        .unwrap()
        .etag;

    let denied = app
        .keys_client()
        .await
        .rekey_record(authed(
            CLAIMS.token,
            RekeyRecordRequest {
                record_id: id.clone(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");

    let rekeyed = app
        .keys_client()
        .await
        .rekey_record(authed(
            &app.admin_token,
            RekeyRecordRequest {
                record_id: id.clone(),
                reason: "INC-2026-0042 key suspected exposed".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rekeyed.kek_version, 2, "moves to the active KEK version");
    assert_ne!(rekeyed.etag, etag_before);

    let after = store.get_record(&record_id(&id)).await.unwrap().unwrap();
    assert_ne!(after.wrapped_key, before.wrapped_key);
    assert_eq!(after.fields.len(), before.fields.len());
    for (new, old) in after.fields.iter().zip(&before.fields) {
        assert_eq!(new.field, old.field);
        assert_ne!(new.ciphertext, old.ciphertext);
        // The old data key opens nothing the record now holds.
        assert!(
            old_key
                .open_field(&id, &new.field, &new.ciphertext)
                .is_err()
        );
    }
    assert_eq!(email_of(app, &id).await.unwrap(), "person7@example.com");
    assert_eq!(version_state(app, 1).await.1, 0);

    // An update made with the etag from before the re-key is refused, not written under
    // the old key.
    let stale = app
        .client()
        .await
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: id.clone(),
                identity: Some(Identity {
                    name: "李四".into(),
                    ..Identity::default()
                }),
                update_mask: None,
                etag: etag_before,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM audit_events WHERE rpc = 'RekeyRecord' AND outcome = 'OK'")
            .await,
        1
    );
    // The refused attempt is on record too.
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'RekeyRecord' \
             AND reason = 'OPERATION_NOT_GRANTED' AND caller = 'claims'"
        )
        .await,
        1
    );
    let missing = app
        .keys_client()
        .await
        .rekey_record(authed(
            &app.admin_token,
            RekeyRecordRequest {
                record_id: "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

fn with_retention(config: &mut pdvault::config::Config) {
    config.retention = pdvault::config::RetentionConfig {
        default_days: 30,
        id_types: [("PASSPORT".to_owned(), 10)].into(),
        max_days: 365,
        ..pdvault::config::RetentionConfig::default()
    };
}

async fn retain_until(app: &TestApp, id: &str) -> i64 {
    app.count(&format!(
        "SELECT retain_until - created_at FROM records WHERE record_id = '{id}'"
    ))
    .await
}

async fn create_with(
    app: &TestApp,
    identity: Identity,
    retention_days: u32,
) -> Result<String, tonic::Status> {
    app.client()
        .await
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(identity),
                retention_days,
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner().record_id)
}

async fn retention_deadlines_and_the_purge(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, with_retention).await else {
        return;
    };
    const DAY: i64 = 86_400_000_000;
    let plain = create(&app, 1).await;
    let passport = create_with(
        &app,
        Identity {
            id_type: proto::IdType::Passport as i32,
            id_number: "E12345678".into(),
            ..person(2)
        },
        0,
    )
    .await
    .unwrap();
    let chosen = create_with(&app, person(3), 365).await.unwrap();
    assert_eq!(retain_until(&app, &plain).await, 30 * DAY);
    assert_eq!(retain_until(&app, &passport).await, 10 * DAY);
    assert_eq!(retain_until(&app, &chosen).await, 365 * DAY);
    let too_long = create_with(&app, person(4), 366).await.unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert_eq!(
        too_long.get_details_bad_request().unwrap().field_violations[0].field,
        "retention_days"
    );

    let mut client = app.keys_client().await;
    let purge = |limit| PurgeExpiredRecordsRequest { limit };
    let denied = client
        .purge_expired_records(authed(CLAIMS.token, purge(0)))
        .await
        .unwrap_err();
    assert_eq!(reason(&denied), "OPERATION_NOT_GRANTED");
    let nothing_due = client
        .purge_expired_records(authed(&app.admin_token, purge(0)))
        .await
        .unwrap()
        .into_inner();
    assert!(nothing_due.purged_record_ids.is_empty());

    // Time passes for two of them (the test clock stands still, so the deadlines move).
    app.execute_sql(&format!(
        "UPDATE records SET retain_until = 1 WHERE record_id = '{plain}'; \
         UPDATE records SET retain_until = 2 WHERE record_id = '{passport}'"
    ))
    .await;
    let first = client
        .purge_expired_records(authed(&app.admin_token, purge(1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.purged_record_ids,
        std::slice::from_ref(&plain),
        "the most overdue first"
    );
    let rest = client
        .purge_expired_records(authed(&app.admin_token, purge(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.purged_record_ids, std::slice::from_ref(&passport));

    for id in [&plain, &passport] {
        assert_eq!(email_of(&app, id).await.unwrap_err().code(), Code::NotFound);
        // A tombstone without key, ciphertexts or indexes remains.
        assert_eq!(
            app.count(&format!(
                "SELECT COUNT(*) FROM records WHERE record_id = '{id}' \
                 AND deleted_at IS NOT NULL AND wrapped_key IS NULL AND document_index IS NULL"
            ))
            .await,
            1
        );
        assert_eq!(
            app.count(&format!(
                "SELECT COUNT(*) FROM sealed_fields WHERE record_id = '{id}'"
            ))
            .await,
            0
        );
    }
    assert_eq!(
        email_of(&app, &chosen).await.unwrap(),
        "person3@example.com"
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM audit_events WHERE rpc = 'PurgeExpiredRecords' \
             AND reason = 'RETENTION_DEADLINE_PASSED'"
        )
        .await,
        2
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_deadlines_and_the_purge() {
    retention_deadlines_and_the_purge(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_deadlines_and_the_purge() {
    retention_deadlines_and_the_purge(Backend::Postgres).await;
}

/// The suite byte of a record's wrapped key and of each of its fields.
async fn suites_of(app: &TestApp, id: &str) -> (u8, Vec<u8>) {
    let stored = open(&app.database_url)
        .await
        .get_record(&record_id(id))
        .await
        .unwrap()
        .unwrap();
    (
        stored.wrapped_key[1],
        stored.fields.iter().map(|f| f.ciphertext[1]).collect(),
    )
}

/// A deployment whose second instance is switched to the other suite: both suites are read
/// side by side, lookups keep working, and re-keying moves a record to the other suite.
/// The first instance runs the default suite, the second SM4; under an SM4-wide test run
/// (`PDVAULT_TEST_SUITE`) the two trade places.
async fn suites_coexist_and_rekeying_migrates_a_record(app: &TestApp) {
    let sm4_first = std::env::var("PDVAULT_TEST_SUITE").is_ok_and(|s| s == "sm4gcm-hmacsm3");
    let (first, second, other_suite) = if sm4_first {
        (2u8, 1u8, "aes256gcm-hmacsha256")
    } else {
        (1u8, 2u8, "sm4gcm-hmacsm3")
    };
    let url = app.database_url.clone();
    let keyring = keyring_path(app);
    let token = app.data_dir.path().join("data").join("admin.token");
    let sm4 = TestApp::spawn_with(app.backend, move |config| {
        config.database.url = Some(url);
        config.keys.keyring_path = Some(keyring);
        config.admin.token_path = Some(token);
        config.keys.suite = other_suite.into();
    })
    .await
    .unwrap();
    let old = create(app, 1).await;
    let new = app_create_phone(&sm4, "13900001111").await;
    assert_eq!(suites_of(app, &old).await, (first, vec![first, first]));
    let (wrap, fields) = suites_of(app, &new).await;
    assert_eq!(wrap, second);
    assert!(fields.iter().all(|&s| s == second));
    assert_eq!(email_of(&sm4, &old).await.unwrap(), "person1@example.com");
    assert_eq!(email_of(app, &new).await.unwrap(), "new@example.com");
    // One index MAC for the whole deployment: either instance finds the record.
    for instance in [app, &sm4] {
        let found = instance
            .client()
            .await
            .find_records(authed(
                CLAIMS.token,
                proto::FindRecordsRequest {
                    purpose: "service-delivery".into(),
                    justification: String::new(),
                    key: Some(proto::find_records_request::Key::Phone(
                        "13900001111".into(),
                    )),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .record_ids;
        assert_eq!(found, std::slice::from_ref(&new));
    }
    sm4.keys_client()
        .await
        .rekey_record(authed(
            &sm4.admin_token,
            RekeyRecordRequest {
                record_id: old.clone(),
                reason: "migrate to second".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(suites_of(app, &old).await, (second, vec![second, second]));
    assert_eq!(email_of(app, &old).await.unwrap(), "person1@example.com");
    // A KEK rewrap keeps each record's suite.
    assert!(rotate(app, 1).await.created);
    let another = create(app, 2).await;
    rewrap(app, 0).await.unwrap();
    assert_eq!(suites_of(app, &new).await.0, second);
    assert_eq!(suites_of(app, &another).await.0, first);
    assert_eq!(email_of(&sm4, &new).await.unwrap(), "new@example.com");
    sm4.stop().await;
}

/// A blob literal of `bytes` in the backend's SQL.
fn blob(app: &TestApp, bytes: &[u8]) -> String {
    let hex = data_encoding::HEXLOWER.encode(bytes);
    match app.backend {
        Backend::Sqlite => format!("X'{hex}'"),
        Backend::Postgres => format!("'\\x{hex}'::bytea"),
    }
}

/// New wraps are format 2 (KW under the suite's derived KEK); a key wrapped the way earlier
/// versions wrapped it (format 1: GCM under the raw KEK) still opens, and the rewrap job
/// moves it to format 2 under the new version.
async fn old_format_wrapped_keys_open_and_rewrap_moves_them_to_kw(app: &TestApp) {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use pdvault::crypto::{Suite, random_nonce, wrap_aad, wrap_header_gcm};

    let id = create(app, 5).await;
    let store = open(&app.database_url).await;
    let stored = store
        .get_record(&record_id(&id))
        .await
        .unwrap()
        .unwrap()
        .wrapped_key;
    assert_eq!(stored[0], 2, "new wraps are format 2");
    assert_eq!(
        stored.len(),
        3 + "local".len() + 4 + 8 + 32 + 16,
        "KW, no nonce"
    );
    let (keks, _) = app.keyring().into_parts();
    let dek = keks[&1].unwrap(&stored, &id).unwrap();

    // Written as before format 2: the stored KEK itself as the GCM key.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keyring_path(app)).unwrap()).unwrap();
    let raw = data_encoding::BASE64
        .decode(file["keks"][0]["key"].as_str().unwrap().as_bytes())
        .unwrap();
    assert_eq!(file["keks"][0]["version"], 1);
    let header = wrap_header_gcm(dek.suite(), "local", 1).unwrap();
    let nonce = random_nonce().unwrap();
    let aad = wrap_aad(&header, &id);
    let payload = Payload {
        msg: dek.secret().expose(),
        aad: &aad,
    };
    let sealed = match dek.suite() {
        Suite::Aes256GcmHmacSha256 => aes_gcm::Aes256Gcm::new_from_slice(&raw)
            .unwrap()
            .encrypt(&nonce.into(), payload),
        Suite::Sm4GcmHmacSm3 => {
            aes_gcm::AesGcm::<pdvault::crypto::Sm4, aes_gcm::aead::consts::U12>::new_from_slice(
                &raw[..16],
            )
            .unwrap()
            .encrypt(&nonce.into(), payload)
        }
    }
    .unwrap();
    let mut legacy = header;
    legacy.extend_from_slice(&nonce);
    legacy.extend_from_slice(&sealed);
    app.execute_sql(&format!(
        "UPDATE records SET wrapped_key = {} WHERE record_id = '{id}'",
        blob(app, &legacy)
    ))
    .await;
    assert_eq!(
        store
            .get_record(&record_id(&id))
            .await
            .unwrap()
            .unwrap()
            .wrapped_key,
        legacy
    );
    assert_eq!(email_of(app, &id).await.unwrap(), "person5@example.com");

    assert!(rotate(app, 1).await.created);
    rewrap(app, 0).await.unwrap();
    let moved = store
        .get_record(&record_id(&id))
        .await
        .unwrap()
        .unwrap()
        .wrapped_key;
    assert_eq!(moved[0], 2, "the rewrap writes format 2");
    assert_eq!(moved[1], legacy[1], "and keeps the record's suite");
    assert_eq!(
        pdvault::crypto::parse_wrap_header(&moved)
            .unwrap()
            .0
            .version,
        2
    );
    assert_eq!(email_of(app, &id).await.unwrap(), "person5@example.com");
}

async fn app_create_phone(app: &TestApp, phone: &str) -> String {
    app.client()
        .await
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    phone: phone.into(),
                    email: "new@example.com".into(),
                    ..Identity::default()
                }),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_id
}

for_each_backend!(
    old_format_wrapped_keys_open_and_rewrap_moves_them_to_kw,
    suites_coexist_and_rekeying_migrates_a_record,
    rekey_replaces_the_data_key_and_every_ciphertext,
    lifecycle_rotate_rewrap_retire_destroy,
    key_management_needs_the_keys_rotate_grant,
    concurrent_rotations_on_two_instances_make_one_version,
    rewrap_alongside_traffic_and_a_second_job,
    crypto_shredding_reaches_an_old_copy_of_the_database,
    destruction_reaches_every_instance,
);
