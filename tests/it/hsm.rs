//! The PKCS#11 KEK provider against SoftHSM2, on both backends: KEKs are created, used and
//! destroyed inside the token, never leave it, and two instances share them through it.
//! (`PDVAULT_TEST_KEK_PROVIDER=pkcs11` runs the other integration tests on it too.)

use crate::support::fixtures::create_request;
use crate::support::{Backend, CLAIMS, TestApp, authed, softhsm};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use pdvault::proto::{
    DestroyKeyVersionRequest, GetKeyStatusRequest, GetRecordRequest, Identity, RekeyRecordRequest,
    RetireKeyVersionRequest, RewrapRecordsRequest, RotateKeyEncryptionKeyRequest,
};

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

async fn create(app: &TestApp, i: usize) -> String {
    app.client()
        .await
        .create_record(authed(
            CLAIMS.token,
            create_request(
                Identity {
                    email: format!("h{i}@example.com"),
                    ..Identity::default()
                },
                "",
            ),
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

/// A read-write session of the test's own on the token: to look at what the vault left
/// there, or to change the token behind the vault's back.
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
    let session = module.open_rw_session(slot).unwrap();
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

/// The tests of this module share one PKCS#11 application (this process), and one of them
/// logs it out and closes its sessions: every test that talks to the module takes its turn.
/// That one runs in a process of its own ([`crate::support::own_process`]): under
/// `PDVAULT_TEST_KEK_PROVIDER=pkcs11` every other module's vaults keep their KEKs in this
/// process's token too, and a logout or a closed session would reach them mid-call.
static TOKEN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn hsm_lifecycle(backend: Backend) {
    let _turn = TOKEN.lock().await;
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
        .get_attributes(
            kek,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Modifiable,
                AttributeType::Copyable,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        )
        .unwrap();
    assert!(attributes.contains(&Attribute::Sensitive(true)));
    assert!(attributes.contains(&Attribute::Extractable(false)));
    // Its attributes cannot be loosened later, nor the key copied into a looser object.
    assert!(attributes.contains(&Attribute::Modifiable(false)));
    assert!(attributes.contains(&Attribute::Copyable(false)));
    // One key, one mechanism: it wraps (KW) and encrypts nothing.
    assert!(attributes.contains(&Attribute::Wrap(true)));
    assert!(attributes.contains(&Attribute::Unwrap(true)));
    assert!(attributes.contains(&Attribute::Encrypt(false)));
    assert!(attributes.contains(&Attribute::Decrypt(false)));
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
    let stored = pdvault::app::open_store(&{
        let mut c = pdvault::config::Config::default();
        c.database.url = Some(app.database_url.clone());
        c
    })
    .await
    .unwrap();
    let wrapped = stored
        .get_record(&pdvault::domain::ids::RecordId::parse("record_id", &ids[0]).unwrap())
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
    // Format 2: CKM_AES_KEY_WRAP in the module, no IV to lose.
    assert_eq!(wrapped[0], 2);
    assert_eq!(wrapped.len(), 3 + "hsm".len() + 4 + 8 + 32 + 16);

    // A second instance rotates; the first learns of version 2 through the database and
    // finds its key in the token by label.
    let other = spawn(
        backend,
        Some(app.database_url.clone()),
        Some(app.data_dir.path().join("data/admin.token")),
    )
    .await;
    let rotated = other
        .keys_client()
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

    let mut stream = app
        .keys_client()
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

    let mut client = app.keys_client().await;
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

/// Closes every session this process has on the token, the vault's included, the way a
/// module restart or a dropped connection to a network HSM ends them.
fn close_every_session(config: &pdvault::config::Pkcs11Config) {
    let module = Pkcs11::new(&config.module).unwrap();
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| module.get_token_info(*slot).unwrap().label().trim_end() == config.token_label)
        .unwrap();
    // SAFETY: loads the library the vault already loaded and initialised in this process (the
    // loader hands back the same instance), and calls C_CloseAllSessions with a slot id the
    // library itself listed. The test's attack on the vault's session needs the raw call the
    // safe binding does not offer.
    #[allow(unsafe_code)]
    let rv = unsafe {
        let raw = cryptoki_sys::Pkcs11::new(&config.module).unwrap();
        raw.C_CloseAllSessions(slot.id())
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

/// The module loses the vault's login (this process's own session logs out, which logs out
/// every session of the application) and then its session (every session of the process is
/// closed): each time the next call opens a session and logs in again, and succeeds, for
/// writes and reads alike.
async fn a_lost_session_or_login_is_recovered(backend: Backend) {
    let _turn = TOKEN.lock().await;
    let Some(app) = TestApp::spawn_with(backend, |c| c.keys.provider = "pkcs11".into()).await
    else {
        return;
    };
    let config = softhsm::config(&app.database_url);
    let before = create(&app, 1).await;
    token_session(&config).logout().unwrap();
    // Read for the first time: not in the unwrapped-key cache, so it reaches the module.
    assert_eq!(email(&app, &before).await, "h1@example.com");
    let after = create(&app, 2).await;
    assert_eq!(email(&app, &after).await, "h2@example.com");
    // And once more, with the session the vault opened anew.
    token_session(&config).logout().unwrap();
    let third = create(&app, 3).await;
    assert_eq!(email(&app, &third).await, "h3@example.com");
    // Now the session itself is gone.
    close_every_session(&config);
    let fourth = create(&app, 4).await;
    close_every_session(&config);
    assert_eq!(email(&app, &fourth).await, "h4@example.com");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_lost_session_or_login_is_recovered() {
    if crate::support::own_process::run_here(
        module_path!(),
        "sqlite_a_lost_session_or_login_is_recovered",
    ) {
        a_lost_session_or_login_is_recovered(Backend::Sqlite).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lost_session_or_login_is_recovered() {
    if crate::support::own_process::run_here(
        module_path!(),
        "postgres_a_lost_session_or_login_is_recovered",
    ) {
        a_lost_session_or_login_is_recovered(Backend::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_hsm_lifecycle() {
    hsm_lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hsm_lifecycle() {
    hsm_lifecycle(Backend::Postgres).await;
}

/// An SM4 deployment wraps data keys with SM4, and the module's KEKs are AES-256: the vault
/// refuses the combination before it opens the module or the keyring.
#[tokio::test]
async fn the_sm4_suite_is_refused_with_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = pdvault::config::Config {
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    config.keys.suite = "sm4gcm-hmacsm3".into();
    config.keys.provider = "pkcs11".into();
    let store = pdvault::app::open_store(&config).await.unwrap();
    let error = pdvault::app::open_keys(&config, &store, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(error, pdvault::app::StartupError::Sm4WithPkcs11),
        "{error}"
    );
    assert!(!config.keyring_path().exists(), "nothing was created");
}

/// A PIN file group or others can read is refused before the module is asked anything; the
/// same file made private opens the token.
#[cfg(unix)]
#[test]
fn a_pin_file_others_can_read_is_refused() {
    let _turn = TOKEN.blocking_lock();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = softhsm::config("pin-file-test");
    config.pin_file = dir.path().join("pin");
    std::fs::write(&config.pin_file, "1234\n").unwrap();
    std::fs::set_permissions(&config.pin_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    match pdvault::keys::pkcs11::Pkcs11KekProvider::open(&config) {
        Err(pdvault::keys::KeyError::SecretFile(pdvault::keys::SecretFileError::Exposed {
            mode,
            ..
        })) => assert_eq!(mode, 0o640),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("opened with a PIN file others can read"),
    }
    std::fs::set_permissions(&config.pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(pdvault::keys::pkcs11::Pkcs11KekProvider::open(&config).is_ok());
}

/// The golden HSM-wrapped data keys (`tests/fixtures/golden/2026-11/hsm.json`): data keys
/// the PKCS#11 provider wrapped today (AES-256-GCM inside the module, the layout of format
/// 1 with KEK id `hsm`), under a KEK whose value the fixture records because it was
/// imported, for the fixture only, instead of generated inside the module.
const HSM_GOLDEN: &str = "tests/fixtures/golden/2026-11/hsm.json";

/// Imports `value` as KEK `version` under `prefix`, as non-extractable as the KEKs the
/// vault generates, allowed to encrypt (as KEKs were made before KW), and returns a
/// provider configured for that prefix.
fn provider_with_kek(
    prefix: &str,
    version: u32,
    value: &[u8],
) -> pdvault::keys::pkcs11::Pkcs11KekProvider {
    provider_with_imported_kek(
        prefix,
        version,
        value,
        &[Attribute::Encrypt(true), Attribute::Decrypt(true)],
    )
}

/// The same, for a KEK that wraps with KW (as the vault makes them now).
fn provider_with_kw_kek(
    prefix: &str,
    version: u32,
    value: &[u8],
) -> pdvault::keys::pkcs11::Pkcs11KekProvider {
    provider_with_imported_kek(
        prefix,
        version,
        value,
        &[
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
        ],
    )
}

fn provider_with_imported_kek(
    prefix: &str,
    version: u32,
    value: &[u8],
    usage: &[Attribute],
) -> pdvault::keys::pkcs11::Pkcs11KekProvider {
    let mut config = softhsm::config("golden");
    config.key_label_prefix = prefix.to_owned();
    // Opening the provider first initialises the library and logs the application in.
    let provider = pdvault::keys::pkcs11::Pkcs11KekProvider::open(&config).unwrap();
    let session = token_session(&config);
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(cryptoki::object::KeyType::AES),
        Attribute::Value(value.to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Label(format!("{prefix}{version}").into_bytes()),
    ];
    template.extend_from_slice(usage);
    session.create_object(&template).unwrap();
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
    let _turn = TOKEN.blocking_lock();
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
        assert!(matches!(
            provider.unwrap(&wrapped, "rec_someoneelse"),
            Err(pdvault::keys::KeyError::Crypto(
                pdvault::crypto::CryptoError::Integrity
            ))
        ));
        let mut tampered = wrapped.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(
            matches!(
                provider.unwrap(&tampered, record_id),
                Err(pdvault::keys::KeyError::Crypto(
                    pdvault::crypto::CryptoError::Integrity
                ))
            ),
            "a tampered GCM tag"
        );
    }
}

/// The golden data key the PKCS#11 provider wrapped with KW (format 2) under an imported
/// KW KEK. Only AES data keys: the module's KEKs are AES, so SM4 keys are not wrapped there.
const HSM_GOLDEN_FORMAT_2: &str = "tests/fixtures/golden/2026-11-format-2/hsm.json";

#[test]
fn hsm_wrapped_keys_of_format_2_still_unwrap() {
    let _turn = TOKEN.blocking_lock();
    use aes_kw::KeyInit;
    use pdvault::keys::KekProvider;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(HSM_GOLDEN_FORMAT_2);
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let version = golden["kek_version"].as_u64().unwrap() as u32;
    let provider =
        provider_with_kw_kek(&unique_prefix("golden-kw"), version, &unhex(&golden["kek"]));
    let keys = golden["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    for key in keys {
        let record_id = key["record_id"].as_str().unwrap();
        let wrapped = unhex(&key["wrapped_key"]);
        assert_eq!(wrapped[0], 2, "format 2");
        let dek = provider.unwrap(&wrapped, record_id).unwrap();
        assert_eq!(dek.suite().as_str(), key["suite"].as_str().unwrap());
        assert_eq!(
            hex(dek.secret().expose()),
            key["data_key"].as_str().unwrap()
        );
        assert!(provider.unwrap(&wrapped, "rec_someoneelse").is_err());
        // A changed wrap is the stored data failing authentication, not a module outage:
        // SoftHSM2's own error for it must still read as an integrity failure.
        for at in [wrapped.len() - 1, wrapped.len() - 20] {
            let mut tampered = wrapped.clone();
            tampered[at] ^= 1;
            assert!(
                matches!(
                    provider.unwrap(&tampered, record_id),
                    Err(pdvault::keys::KeyError::Crypto(
                        pdvault::crypto::CryptoError::Integrity
                    ))
                ),
                "a tampered KW wrap at byte {at}"
            );
        }
        // The module's CKM_AES_KEY_WRAP is RFC 3394 KW: software KW under the same KEK
        // unwraps it to the data key followed by its 16-byte context.
        let header_len = 3 + "hsm".len() + 4;
        let kek: [u8; 32] = unhex(&golden["kek"]).try_into().unwrap();
        let body = &wrapped[header_len..];
        assert_eq!(body.len(), aes_kw::IV_LEN + 48);
        let mut inner = [0u8; 48];
        aes_kw::KwAes256::new(&kek.into())
            .unwrap_key(body, &mut inner)
            .unwrap();
        assert_eq!(hex(&inner[..32]), key["data_key"].as_str().unwrap());
        // KW is deterministic: wrapping the key again gives the same bytes.
        assert_eq!(
            hex(&provider.wrap(version, &dek, record_id).unwrap()),
            hex(&wrapped)
        );
    }
}

/// Writes the HSM golden vectors of the current format (`PDVAULT_GOLDEN_HSM` names the file,
/// which must not exist): run once per new format, like `tests/it/golden.rs`'s generator.
/// `2026-11/hsm.json` (format 1, GCM, both suites) was written before KW by its predecessor.
#[test]
#[ignore]
fn write_hsm_golden_vectors() {
    let _turn = TOKEN.blocking_lock();
    use pdvault::crypto::{DataKey, SecretKey, Suite};
    use pdvault::keys::KekProvider;
    let out = std::path::PathBuf::from(std::env::var("PDVAULT_GOLDEN_HSM").unwrap());
    assert!(!out.exists(), "fixtures are never rewritten");
    let kek = SecretKey::generate().unwrap();
    let version = 1;
    let provider = provider_with_kw_kek(&unique_prefix("golden-write"), version, kek.expose());
    let keys: Vec<serde_json::Value> =
        [(Suite::Aes256GcmHmacSha256, "rec_goldenhsmkwaes000000000000")]
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

/// Listing a deployment's KEKs while other objects of the token come and go never fails.
/// The listing searches every secret-key object of the token (labels cannot be searched by
/// prefix) and then reads each one's label; an object destroyed in between, its handle
/// perhaps already reused by a new one, is not one of the listing's KEKs. Other processes
/// (vault instances of other deployments) change the token in production the way this
/// test's own session does here, outside the provider's serialisation of its calls. In a
/// process of its own, so with a token of its own: the churn must not reach the other
/// tests' vaults.
#[test]
fn listing_kek_versions_survives_other_objects_coming_and_going() {
    if crate::support::own_process::run_here(
        module_path!(),
        "listing_kek_versions_survives_other_objects_coming_and_going",
    ) {
        listing_survives_churn();
    }
}

fn listing_survives_churn() {
    use pdvault::keys::KekProvider;
    use pdvault::keys::pkcs11::Pkcs11KekProvider;
    use std::sync::atomic::{AtomicBool, Ordering};

    let _turn = TOKEN.blocking_lock();
    let mut config = softhsm::config("churn");
    config.key_label_prefix = unique_prefix("churn");
    let provider = Pkcs11KekProvider::open(&config).unwrap();
    provider.provision(1).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let churn = token_session(&config);
            let mut round = 0u64;
            while !done.load(Ordering::Relaxed) {
                // Labels of varying length, so a reused handle's label changes size.
                let label = format!("{}-{}", "x".repeat((round % 40) as usize), round);
                // SoftHSM2 itself now and then refuses a create racing a search of
                // another thread (CKR_GENERAL_ERROR, CKR_TEMPLATE_INCONSISTENT): this
                // thread only makes churn, so such a round is skipped.
                if let Ok(object) = churn.create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(cryptoki::object::KeyType::AES),
                    Attribute::Value(vec![7; 32]),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(label.into_bytes()),
                ]) {
                    let _ = churn.destroy_object(object);
                }
                round += 1;
            }
        });
        let failed: Vec<String> = (0..2000)
            .filter_map(|_| provider.versions().err())
            .map(|error| format!("{error:?}"))
            .collect();
        done.store(true, Ordering::Relaxed);
        assert!(
            failed.is_empty(),
            "{} of 2000 listings failed, first: {:?}",
            failed.len(),
            failed.first()
        );
    });
    assert_eq!(provider.versions().unwrap(), vec![1]);
    provider.destroy(1).unwrap();
}

/// A restart that finds none of the deployment's KEKs in the module while its database
/// names KEK versions is refused naming the newest, and creates nothing: generating a
/// "first" KEK there would replace (destroy) one of the same name if the module's answer
/// was wrong, and would never open the records the lost one wrapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_missing_the_recorded_keks_is_refused_and_provisions_nothing() {
    let _turn = TOKEN.lock().await;
    let Some(mut app) =
        TestApp::spawn_with(Backend::Sqlite, |c| c.keys.provider = "pkcs11".into()).await
    else {
        return;
    };
    create(&app, 1).await;
    app.halt().await;
    let pkcs11 = app.config.keys.pkcs11.clone().unwrap();
    softhsm::destroy_deployment_objects(&pkcs11);
    match pdvault::app::Application::build(app.config.clone()).await {
        Err(pdvault::app::StartupError::Keys(pdvault::keys::KeyError::MaterialMissing {
            version,
        })) => assert_eq!(version, 1),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("started without the KEK its records are wrapped under"),
    }
    let session = token_session(&pkcs11);
    assert_eq!(kek_objects(&session, &pkcs11.key_label_prefix, 1), 0);
}
