//! The PKCS#11 KEK provider against SoftHSM2, on both backends: KEKs are created, used and
//! destroyed inside the token, never leave it, and two instances share them through it.
//! (`PDVAULT_TEST_KEK_PROVIDER=pkcs11` runs the other integration tests on it too.)

mod support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use pdvault::proto::key_management_client::KeyManagementClient;
use pdvault::proto::{
    CreateRecordRequest, DestroyKeyVersionRequest, GetKeyStatusRequest, GetRecordRequest, Identity,
    RekeyRecordRequest, RetireKeyVersionRequest, RewrapRecordsRequest,
    RotateKeyEncryptionKeyRequest,
};
use support::{Backend, CLAIMS, TestApp, authed, softhsm};
use tonic::transport::Channel;

async fn spawn(
    backend: Backend,
    url: Option<String>,
    token: Option<std::path::PathBuf>,
) -> TestApp {
    TestApp::spawn_with(backend, move |config| {
        config.keys.provider = "pkcs11".into();
        if let Some(url) = url {
            config.database.url = Some(url);
        }
        if let Some(token) = token {
            config.admin.token_path = Some(token);
        }
    })
    .await
    .expect("spawns")
}

async fn keys(app: &TestApp) -> KeyManagementClient<Channel> {
    KeyManagementClient::new(
        Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

async fn create(app: &TestApp, i: usize) -> String {
    app.client()
        .await
        .create_record(authed(
            CLAIMS.token,
            CreateRecordRequest {
                identity: Some(Identity {
                    email: format!("h{i}@example.com"),
                    ..Identity::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_id
}

async fn email(app: &TestApp, id: &str) -> String {
    app.client()
        .await
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: id.into(),
                purpose: "service-delivery".into(),
                justification: String::new(),
                fields: vec!["email".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .fields["email"]
        .value
        .clone()
}

/// A session of the test's own on the token, to look at what the vault left there.
fn token_session(config: &pdvault::config::Pkcs11Config) -> Session {
    let module = Pkcs11::new(&config.module).unwrap();
    // The vault in this process initialised the library already.
    let _ = module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| module.get_token_info(*slot).unwrap().label().trim_end() == config.token_label)
        .unwrap();
    let session = module.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from("1234".to_owned())));
    session
}

fn kek_objects(session: &Session, prefix: &str, version: u32) -> usize {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(format!("{prefix}{version}").into_bytes()),
        ])
        .unwrap()
        .len()
}

async fn hsm_lifecycle(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, |c| c.keys.provider = "pkcs11".into()).await
    else {
        return;
    };
    let config = softhsm::config(&app.database_url);
    let session = token_session(&config);
    let prefix = config.key_label_prefix.clone();
    assert_eq!(
        kek_objects(&session, &prefix, 1),
        1,
        "first start made version 1"
    );

    // The KEK never leaves the module: its value cannot be read, by design of its attributes.
    let kek = session
        .find_objects(&[Attribute::Label(format!("{prefix}1").into_bytes())])
        .unwrap()[0];
    let attributes = session
        .get_attributes(kek, &[AttributeType::Sensitive, AttributeType::Extractable])
        .unwrap();
    assert!(attributes.contains(&Attribute::Sensitive(true)));
    assert!(attributes.contains(&Attribute::Extractable(false)));
    assert!(
        session
            .get_attributes(kek, &[AttributeType::Value])
            .map(|values| values.iter().all(|a| !matches!(a, Attribute::Value(_))))
            .unwrap_or(true)
    );

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(create(&app, i).await);
    }
    // Wrapped keys name the module, not the keyring file.
    let stored = pdvault::startup::open_store(&{
        let mut c = pdvault::config::Config::default();
        c.database.url = Some(app.database_url.clone());
        c
    })
    .await
    .unwrap();
    let wrapped = stored
        .get_record(&ids[0])
        .await
        .unwrap()
        .unwrap()
        .wrapped_key;
    assert_eq!(
        pdvault::crypto::parse_wrap_header(&wrapped)
            .unwrap()
            .0
            .key_id,
        "hsm"
    );

    // A second instance rotates; the first learns of version 2 through the database and
    // finds its key in the token by label.
    let other = spawn(
        backend,
        Some(app.database_url.clone()),
        Some(app.data_dir.path().join("data/admin.token")),
    )
    .await;
    let rotated = keys(&other)
        .await
        .rotate_key_encryption_key(authed(
            &app.admin_token,
            RotateKeyEncryptionKeyRequest {
                expected_active_version: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.created);
    assert_eq!(kek_objects(&session, &prefix, 2), 1);
    let fresh = create(&app, 100).await;
    assert_eq!(email(&other, &fresh).await, "h100@example.com");

    let mut stream = keys(&app)
        .await
        .rewrap_records(authed(
            &app.admin_token,
            RewrapRecordsRequest { batch_size: 6 },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(progress) = stream.message().await.unwrap() {
        last = Some(progress);
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(last.rewrapped, 20);

    let mut client = keys(&app).await;
    client
        .retire_key_version(authed(
            &app.admin_token,
            RetireKeyVersionRequest {
                version: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    client
        .destroy_key_version(authed(
            &app.admin_token,
            DestroyKeyVersionRequest {
                version: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        kek_objects(&session, &prefix, 1),
        0,
        "destroyed inside the token"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(email(&app, id).await, format!("h{i}@example.com"));
        assert_eq!(email(&other, id).await, format!("h{i}@example.com"));
    }
    let rekeyed = client
        .rekey_record(authed(
            &app.admin_token,
            RekeyRecordRequest {
                record_id: ids[0].clone(),
                reason: "exposure drill".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rekeyed.kek_version, 2);
    assert_eq!(email(&other, &ids[0]).await, "h0@example.com");
    let status = client
        .get_key_status(authed(&app.admin_token, GetKeyStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(status.versions.iter().all(|v| v.provider == "hsm"));
    other.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_hsm_lifecycle() {
    hsm_lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hsm_lifecycle() {
    hsm_lifecycle(Backend::Postgres).await;
}

/// A PIN file group or others can read is refused before the module is asked anything; the
/// same file made private opens the token.
#[cfg(unix)]
#[test]
fn a_pin_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = softhsm::config("pin-file-test");
    config.pin_file = dir.path().join("pin");
    std::fs::write(&config.pin_file, "1234\n").unwrap();
    std::fs::set_permissions(&config.pin_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    match pdvault::hsm::Pkcs11KekProvider::open(&config) {
        Err(pdvault::keys::KeyError::SecretFile(pdvault::keys::SecretFileError::Exposed {
            mode,
            ..
        })) => assert_eq!(mode, 0o640),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("opened with a PIN file others can read"),
    }
    std::fs::set_permissions(&config.pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(pdvault::hsm::Pkcs11KekProvider::open(&config).is_ok());
}

/// The golden HSM-wrapped data keys (`tests/fixtures/golden/2026-11/hsm.json`): data keys
/// the PKCS#11 provider wrapped today (AES-256-GCM inside the module, the layout of format
/// 1 with KEK id `hsm`), under a KEK whose value the fixture records because it was
/// imported, for the fixture only, instead of generated inside the module.
const HSM_GOLDEN: &str = "tests/fixtures/golden/2026-11/hsm.json";

/// Imports `value` as KEK `version` under `prefix`, as non-extractable as the KEKs the
/// vault generates, and returns a provider configured for that prefix.
fn provider_with_kek(prefix: &str, version: u32, value: &[u8]) -> pdvault::hsm::Pkcs11KekProvider {
    let mut config = softhsm::config("golden");
    config.key_label_prefix = prefix.to_owned();
    // Opening the provider first initialises the library and logs the application in.
    let provider = pdvault::hsm::Pkcs11KekProvider::open(&config).unwrap();
    let module = Pkcs11::new(&config.module).unwrap();
    let _ = module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| module.get_token_info(*slot).unwrap().label().trim_end() == config.token_label)
        .unwrap();
    let session = module.open_rw_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from("1234".to_owned())));
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(cryptoki::object::KeyType::AES),
            Attribute::Value(value.to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(format!("{prefix}{version}").into_bytes()),
        ])
        .unwrap();
    provider
}

fn unique_prefix(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("pdvault-{what}-{nanos}-kek-v")
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(value: &serde_json::Value) -> Vec<u8> {
    data_encoding::HEXLOWER
        .decode(value.as_str().unwrap().as_bytes())
        .unwrap()
}

#[test]
fn hsm_wrapped_keys_of_format_1_still_unwrap() {
    use pdvault::keys::KekProvider;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(HSM_GOLDEN);
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let version = golden["kek_version"].as_u64().unwrap() as u32;
    let provider = provider_with_kek(&unique_prefix("golden"), version, &unhex(&golden["kek"]));
    let keys = golden["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "one per suite");
    for key in keys {
        let record_id = key["record_id"].as_str().unwrap();
        let wrapped = unhex(&key["wrapped_key"]);
        assert_eq!(wrapped[0], 1, "format 1");
        let dek = provider.unwrap(&wrapped, record_id).unwrap();
        assert_eq!(dek.suite().as_str(), key["suite"].as_str().unwrap());
        assert_eq!(
            hex(dek.secret().expose()),
            key["data_key"].as_str().unwrap()
        );
        assert!(provider.unwrap(&wrapped, "rec_someoneelse").is_err());
    }
}

/// Writes `hsm.json` (`PDVAULT_GOLDEN_HSM` names the file, which must not exist): run once
/// per new format, like `tests/golden.rs`'s generator.
#[test]
#[ignore]
fn write_hsm_golden_vectors() {
    use pdvault::crypto::{DataKey, SecretKey, Suite};
    use pdvault::keys::KekProvider;
    let out = std::path::PathBuf::from(std::env::var("PDVAULT_GOLDEN_HSM").unwrap());
    assert!(!out.exists(), "fixtures are never rewritten");
    let kek = SecretKey::generate().unwrap();
    let version = 1;
    let provider = provider_with_kek(&unique_prefix("golden-write"), version, kek.expose());
    let keys: Vec<serde_json::Value> = [
        (Suite::Aes256GcmHmacSha256, "rec_goldenhsmaes00000000000000"),
        (Suite::Sm4GcmHmacSm3, "rec_goldenhsmsm400000000000000"),
    ]
    .into_iter()
    .map(|(suite, record_id)| {
        let dek = DataKey::generate_for(suite).unwrap();
        let wrapped = provider.wrap(version, &dek, record_id).unwrap();
        serde_json::json!({
            "suite": suite.as_str(),
            "record_id": record_id,
            "data_key": hex(dek.secret().expose()),
            "wrapped_key": hex(&wrapped),
        })
    })
    .collect();
    let golden = serde_json::json!({
        "kek_version": version,
        "kek": hex(kek.expose()),
        "keys": keys,
    });
    let mut text = serde_json::to_string_pretty(&golden).unwrap();
    text.push('\n');
    std::fs::write(out, text).unwrap();
}
