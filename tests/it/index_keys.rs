//! End-to-end tests of blind-index and pseudonym key versions: `RotateIndexKey`, the
//! re-index pass of `RewrapRecords`, lookups and uniqueness across index versions, age gates
//! across a re-index, retiring and destroying an index version, and an instance that learns
//! of another's rotation. The real server, on both backends.

use crate::support::fixtures::{create_request, reason, resident_id};
use crate::support::{ANALYTICS, CLAIMS, TestApp, authed};
use pdvault::proto::{
    self, DestroyKeyVersionRequest, DocumentKey, FindRecordsRequest, GetKeyStatusRequest,
    GetRecordRequest, Identity, KeyKind, KeyVersionState, RetireKeyVersionRequest,
    RewrapRecordsRequest, RotateIndexKeyRequest, UpdateRecordRequest, find_records_request,
};
use tonic::Code;

fn person(id_number: &str, phone: &str) -> Identity {
    Identity {
        name: "张三".into(),
        id_type: proto::IdType::ResidentId as i32,
        id_number: id_number.into(),
        phone: phone.into(),
        ..Identity::default()
    }
}

async fn create(app: &TestApp, identity: Identity) -> Result<String, tonic::Status> {
    app.client()
        .await
        .create_record(authed(CLAIMS.token, create_request(identity, "")))
        .await
        .map(|r| r.into_inner().record_id)
}

async fn find(app: &TestApp, key: find_records_request::Key) -> Vec<String> {
    app.client()
        .await
        .find_records(authed(
            CLAIMS.token,
            FindRecordsRequest {
                purpose: "service-delivery".into(),
                justification: String::new(),
                key: Some(key),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record_ids
}

async fn find_document(app: &TestApp, id_number: &str) -> Vec<String> {
    find(
        app,
        find_records_request::Key::Document(DocumentKey {
            id_type: proto::IdType::ResidentId as i32,
            id_number: id_number.into(),
        }),
    )
    .await
}

async fn find_phone(app: &TestApp, phone: &str) -> Vec<String> {
    find(app, find_records_request::Key::Phone(phone.into())).await
}

async fn get(
    app: &TestApp,
    token: &str,
    record_id: &str,
    purpose: &str,
    field: &str,
) -> Result<String, tonic::Status> {
    let response = app
        .client()
        .await
        .get_record(authed(
            token,
            GetRecordRequest {
                record_id: record_id.into(),
                purpose: purpose.into(),
                justification: String::new(),
                fields: vec![field.into()],
            },
        ))
        .await?
        .into_inner();
    Ok(response.fields[field].value.clone())
}

/// The phone's pseudonym as `audit-research` releases it.
async fn phone_pseudonym(app: &TestApp, record_id: &str) -> String {
    let pseudonym = get(app, ANALYTICS.token, record_id, "audit-research", "phone")
        .await
        .unwrap();
    assert!(pseudonym.starts_with("psn_"), "{pseudonym}");
    pseudonym
}

/// A minor is refused a service-delivery read without a guardian's consent: the age gate
/// opened and told a minor.
async fn assert_minor(app: &TestApp, record_id: &str) {
    let refused = get(app, CLAIMS.token, record_id, "service-delivery", "name")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "GUARDIAN_CONSENT_REQUIRED");
}

async fn index_versions(app: &TestApp) -> (u32, Vec<(u32, KeyVersionState, i64)>) {
    let status = app
        .keys_client()
        .await
        .get_key_status(authed(&app.admin_token, GetKeyStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    (
        status.active_index_version,
        status
            .index_versions
            .iter()
            .map(|v| (v.version, v.state(), v.record_count))
            .collect(),
    )
}

async fn rotate_index(app: &TestApp, expected: u32) -> proto::RotateIndexKeyResponse {
    app.keys_client()
        .await
        .rotate_index_key(authed(
            &app.admin_token,
            RotateIndexKeyRequest {
                expected_active_version: expected,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn rewrap(app: &TestApp, batch_size: u32) -> Vec<proto::RewrapProgress> {
    let mut stream = app
        .keys_client()
        .await
        .rewrap_records(authed(
            &app.admin_token,
            RewrapRecordsRequest { batch_size },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(progress) = stream.message().await.unwrap() {
        all.push(progress);
    }
    all
}

async fn retire_index(app: &TestApp, version: u32) -> Result<proto::KeyVersion, tonic::Status> {
    app.keys_client()
        .await
        .retire_key_version(authed(
            &app.admin_token,
            RetireKeyVersionRequest {
                version,
                kind: KeyKind::Index as i32,
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn destroy_index(app: &TestApp, version: u32) -> Result<proto::KeyVersion, tonic::Status> {
    app.keys_client()
        .await
        .destroy_key_version(authed(
            &app.admin_token,
            DestroyKeyVersionRequest {
                version,
                kind: KeyKind::Index as i32,
            },
        ))
        .await
        .map(|r| r.into_inner())
}

fn keyring_index_versions(app: &TestApp) -> Vec<u64> {
    let path = app.data_dir.path().join("data").join("keyring.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["index_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .collect()
}

async fn assert_duplicate(app: &TestApp, identity: Identity) {
    let refused = create(app, identity).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert_eq!(reason(&refused), "DUPLICATE_IDENTITY");
}

async fn index_rotation_reindex_retire_destroy(app: &TestApp) {
    let adult_id = resident_id("11010119900307123");
    let minor_id = resident_id("11010120160315123");
    let adult = create(app, person(&adult_id, "13800001111")).await.unwrap();
    let minor = create(app, person(&minor_id, "13800002222")).await.unwrap();
    let phone_only = create(
        app,
        Identity {
            phone: "13800001111".into(),
            ..Identity::default()
        },
    )
    .await
    .unwrap();
    assert_minor(app, &minor).await;
    let pseudonym_v1 = phone_pseudonym(app, &adult).await;
    assert_eq!(phone_pseudonym(app, &adult).await, pseudonym_v1, "stable");
    assert_eq!(
        index_versions(app).await,
        (1, vec![(1, KeyVersionState::Active, 3)])
    );

    let rotated = rotate_index(app, 0).await;
    assert!(rotated.created);
    assert_eq!(rotated.active.as_ref().unwrap().version, 2);
    assert!(!rotate_index(app, 1).await.created, "1 is no longer active");
    assert_eq!(
        index_versions(app).await,
        (
            2,
            vec![
                (1, KeyVersionState::DecryptOnly, 3),
                (2, KeyVersionState::Active, 0)
            ]
        )
    );

    // Before any re-index: old records are found, their documents stay unique against
    // creates that index under the new version, and the minor is still a minor.
    assert_eq!(find_document(app, &adult_id).await, vec![adult.clone()]);
    let mut by_phone = vec![adult.clone(), phone_only.clone()];
    by_phone.sort();
    assert_eq!(find_phone(app, "13800001111").await, by_phone);
    assert_duplicate(app, person(&adult_id, "13900000000")).await;
    assert_minor(app, &minor).await;
    // Pseudonyms are the new version's from now on.
    let pseudonym_v2 = phone_pseudonym(app, &adult).await;
    assert_ne!(pseudonym_v2, pseudonym_v1);

    // A record created now is indexed under version 2, and found beside the old ones.
    let fresh_id = resident_id("11010119850101456");
    let fresh = create(app, person(&fresh_id, "13800001111")).await.unwrap();
    assert_eq!(find_document(app, &fresh_id).await, vec![fresh.clone()]);
    by_phone.push(fresh.clone());
    by_phone.sort();
    assert_eq!(find_phone(app, "13800001111").await, by_phone);
    // Nor may an old record be updated onto the new record's document.
    let etag = app
        .client()
        .await
        .get_record(authed(
            CLAIMS.token,
            GetRecordRequest {
                record_id: phone_only.clone(),
                purpose: "service-delivery".into(),
                justification: String::new(),
                fields: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .etag;
    let refused = app
        .client()
        .await
        .update_record(authed(
            CLAIMS.token,
            UpdateRecordRequest {
                record_id: phone_only.clone(),
                identity: Some(Identity {
                    id_type: proto::IdType::ResidentId as i32,
                    id_number: adult_id.clone(),
                    ..Identity::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["id_type".into(), "id_number".into()],
                }),
                etag,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "DUPLICATE_IDENTITY");

    // The index version cannot go while records use it.
    let refused = retire_index(app, 1).await.unwrap_err();
    assert_eq!(reason(&refused), "KEY_VERSION_IN_USE");

    let progress = rewrap(app, 2).await;
    let last = progress.last().unwrap();
    assert!(last.done, "{progress:?}");
    assert_eq!(
        (
            last.target_index_version,
            last.index_total,
            last.reindexed,
            last.index_remaining
        ),
        (2, 3, 3, 0)
    );
    assert_eq!((last.rewrapped, last.remaining), (0, 0), "no KEK rotation");
    assert_eq!(
        index_versions(app).await,
        (
            2,
            vec![
                (1, KeyVersionState::DecryptOnly, 0),
                (2, KeyVersionState::Active, 4)
            ]
        )
    );
    let again = rewrap(app, 2).await;
    assert_eq!(again.last().unwrap().reindexed, 0);

    // Everything under version 2: lookups, uniqueness, age gates, pseudonyms.
    assert_eq!(find_document(app, &adult_id).await, vec![adult.clone()]);
    assert_eq!(find_document(app, &fresh_id).await, vec![fresh.clone()]);
    assert_eq!(find_phone(app, "13800001111").await, by_phone);
    assert_duplicate(app, person(&adult_id, "13900000000")).await;
    assert_duplicate(app, person(&minor_id, "13900000000")).await;
    assert_minor(app, &minor).await;
    assert_eq!(phone_pseudonym(app, &adult).await, pseudonym_v2);

    // Version 1 is unused now: retire and destroy it, and its keys leave the file.
    assert_eq!(keyring_index_versions(app), [1, 2]);
    assert_eq!(
        retire_index(app, 1).await.unwrap().state(),
        KeyVersionState::Retired
    );
    assert_eq!(
        destroy_index(app, 1).await.unwrap().state(),
        KeyVersionState::Destroyed
    );
    assert_eq!(keyring_index_versions(app), [2]);
    assert_eq!(find_document(app, &adult_id).await, vec![adult.clone()]);
    assert_eq!(find_phone(app, "13800001111").await, by_phone);
    assert_duplicate(app, person(&adult_id, "13900000000")).await;
    assert_minor(app, &minor).await;
    // The KEK versions were not touched.
    let status = app
        .keys_client()
        .await
        .get_key_status(authed(&app.admin_token, GetKeyStatusRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_version, 1);
    assert_eq!(status.versions.len(), 1);

    // Each index-key operation is audited with its version, and the re-index run with its
    // count; none holds an identity value.
    for (rpc, needle) in [
        ("RotateIndexKey", "index_version=2"),
        ("RewrapRecords", "reindexed=3"),
        ("RetireKeyVersion", "index_version=1"),
        ("DestroyKeyVersion", "index_version=1"),
    ] {
        let n = app
            .count(&format!(
                "SELECT COUNT(*) FROM audit_events WHERE rpc = '{rpc}' AND caller = 'admin' \
                 AND reason LIKE '%{needle}%'"
            ))
            .await;
        assert_eq!(n, 1, "{rpc} audited with {needle}");
    }
    for value in [adult_id.as_str(), minor_id.as_str(), "13800001111"] {
        let n = app
            .count(&format!(
                "SELECT COUNT(*) FROM audit_events WHERE reason LIKE '%{value}%'"
            ))
            .await;
        assert_eq!(n, 0);
    }
}

/// A second instance that started before the rotation: its lookups find records the first
/// instance re-indexed under a version it had never seen, and its writes refuse a document
/// held under that version.
async fn another_instance_follows_an_index_rotation(app: &TestApp) {
    let url = app.database_url.clone();
    let keyring = app.data_dir.path().join("data").join("keyring.json");
    let token = app.data_dir.path().join("data").join("admin.token");
    let other = TestApp::spawn_with(app.backend, move |config| {
        config.database.url = Some(url);
        config.keys.keyring_path = Some(keyring);
        config.admin.token_path = Some(token);
    })
    .await
    .expect("a sibling starts");
    let id_number = resident_id("11010119900307123");
    let minor_id = resident_id("11010120160315123");
    let record = create(app, person(&id_number, "13800001111"))
        .await
        .unwrap();
    let minor = create(app, person(&minor_id, "13800002222")).await.unwrap();
    assert_eq!(
        find_document(&other, &id_number).await,
        vec![record.clone()]
    );

    assert!(rotate_index(app, 1).await.created);
    let last = rewrap(app, 0).await.pop().unwrap();
    assert_eq!((last.reindexed, last.index_remaining), (2, 0));

    assert_eq!(
        find_document(&other, &id_number).await,
        vec![record.clone()]
    );
    assert_eq!(
        find_phone(&other, "13800001111").await,
        vec![record.clone()]
    );
    assert_duplicate(&other, person(&id_number, "13900000000")).await;
    assert_minor(&other, &minor).await;
    // Its pseudonyms are the new version's too.
    assert_eq!(
        phone_pseudonym(&other, &record).await,
        phone_pseudonym(app, &record).await
    );
    // And what it writes is indexed under the new version.
    let created = create(&other, person(&resident_id("11010119850101456"), ""))
        .await
        .unwrap();
    assert_eq!(
        find_document(app, &resident_id("11010119850101456")).await,
        [created]
    );
    let (_, versions) = index_versions(app).await;
    assert_eq!(versions[1], (2, KeyVersionState::Active, 3));
    // Version 1 retired and destroyed on the first instance: the second one stops computing
    // under it and keeps working.
    retire_index(app, 1).await.unwrap();
    destroy_index(app, 1).await.unwrap();
    assert_eq!(
        find_document(&other, &id_number).await,
        vec![record.clone()]
    );
    assert_duplicate(&other, person(&id_number, "13900000000")).await;
    assert_minor(&other, &minor).await;
    other.stop().await;
}

/// An age gate sealed as earlier versions sealed it (format 1: AES-256-GCM under the index
/// version's one state key, the blind-index key's MAC of a label) still tells a minor, new
/// gates are format 2 (the record's own key), and the re-index pass moves old ones over.
async fn an_old_format_age_gate_opens_and_reindexing_moves_it(app: &TestApp) {
    use hmac::{KeyInit, Mac};
    use pdvault::crypto::{DataKey, SecretKey, Suite};

    let minor = create(
        app,
        person(&resident_id("11010120160315456"), "13800003333"),
    )
    .await
    .unwrap();
    let gate = format!("SELECT age_gate FROM records WHERE record_id = '{minor}'");
    assert_eq!(app.bytes(&gate).await[0], 2, "new gates are format 2");

    let keyring = app.data_dir.path().join("data").join("keyring.json");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keyring).unwrap()).unwrap();
    assert_eq!(file["index_keys"][0]["version"], 1);
    let blind_index = data_encoding::BASE64
        .decode(
            file["index_keys"][0]["blind_index_key"]
                .as_str()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
    let label = b"pdvault.state-key.v1";
    let mut input = (label.len() as u64).to_be_bytes().to_vec();
    input.extend_from_slice(label);
    // The index MAC is the suite of the first start.
    let mut state_key = if std::env::var("PDVAULT_TEST_SUITE").is_ok_and(|s| s == "sm4gcm-hmacsm3")
    {
        hmac::Hmac::<sm3::Sm3>::new_from_slice(&blind_index)
            .unwrap()
            .chain_update(&input)
            .finalize()
            .into_bytes()
            .to_vec()
    } else {
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&blind_index)
            .unwrap()
            .chain_update(&input)
            .finalize()
            .into_bytes()
            .to_vec()
    };
    let old = DataKey::from_secret(
        SecretKey::from_bytes(&mut state_key).unwrap(),
        Suite::Aes256GcmHmacSha256,
    )
    .seal_field(&minor, "state.date_of_birth", b"2016-03-15")
    .unwrap();
    let hex = data_encoding::HEXLOWER.encode(&old);
    let literal = match app.backend {
        crate::support::Backend::Sqlite => format!("X'{hex}'"),
        crate::support::Backend::Postgres => format!("'\\x{hex}'::bytea"),
    };
    app.execute_sql(&format!(
        "UPDATE records SET age_gate = {literal} WHERE record_id = '{minor}'"
    ))
    .await;
    assert_eq!(app.bytes(&gate).await, old);
    assert_minor(app, &minor).await;

    rotate_index(app, 1).await;
    rewrap(app, 0).await;
    let moved = app.bytes(&gate).await;
    assert_eq!(moved[0], 2, "the re-index pass re-seals in format 2");
    assert_minor(app, &minor).await;
}

/// An index version destroyed through one instance leaves every other instance's memory
/// within `keys.state_cache_ms`, although the set of live index versions (which is what
/// makes an instance re-read the keyring file) did not change with the destruction.
async fn index_destruction_reaches_every_instance(app: &TestApp) {
    let other = app.spawn_sibling().await;
    let id_number = resident_id("11010119900307123");
    let record = create(app, person(&id_number, "13800001111"))
        .await
        .unwrap();
    assert!(rotate_index(app, 1).await.created);
    assert!(rewrap(app, 0).await.pop().unwrap().done);
    retire_index(app, 1).await.unwrap();
    // The other instance follows the rotation and the retirement through a lookup, and
    // still holds the retired version's keys (the file still holds them too).
    assert_eq!(
        find_document(&other, &id_number).await,
        vec![record.clone()]
    );
    assert!(other.vault.keys().index_versions_held().contains(&1));

    destroy_index(app, 1).await.unwrap();
    let destroyed_at = std::time::Instant::now();
    let window = std::time::Duration::from_millis(app.config.keys.state_cache_ms);
    while other.vault.keys().index_versions_held().contains(&1) {
        assert!(
            destroyed_at.elapsed() < window + std::time::Duration::from_secs(3),
            "the other instance still holds the destroyed index keys"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(other.vault.keys().index_versions_held(), vec![2]);
    assert_eq!(find_document(&other, &id_number).await, vec![record]);
    other.stop().await;
}

fn other_document(name: &str, number: &str, email: &str) -> Identity {
    Identity {
        name: name.into(),
        id_type: proto::IdType::Other as i32,
        id_number: number.into(),
        email: email.into(),
        ..Identity::default()
    }
}

async fn find_other(app: &TestApp, id_number: &str) -> Vec<String> {
    find(
        app,
        find_records_request::Key::Document(DocumentKey {
            id_type: proto::IdType::Other as i32,
            id_number: id_number.into(),
        }),
    )
    .await
}

/// Identity text is normalised to NFC: a name spelled with a combining accent and the same
/// name precomposed get one pseudonym, a document number typed either way finds the same
/// record and is its duplicate. A record stored before normalisation (its number sealed and
/// indexed decomposed, as the previous version wrote it) is found under either spelling once
/// the index key is rotated and the re-index pass has run: the documented operator step.
async fn equivalent_spellings_are_one_value(app: &TestApp) {
    let precomposed = "Jos\u{e9} N\u{fa}\u{f1}ez";
    let decomposed = "Jose\u{301} Nu\u{301}n\u{303}ez";
    assert_ne!(precomposed.as_bytes(), decomposed.as_bytes());
    let pseudonym = |id: String| async move {
        get(app, ANALYTICS.token, &id, "audit-research", "name")
            .await
            .unwrap()
    };
    let a = create(
        app,
        other_document(precomposed, "\u{d1}-2024-001", "a@example.com"),
    )
    .await
    .unwrap();
    let b = create(
        app,
        Identity {
            name: decomposed.into(),
            email: "b@example.com".into(),
            ..Identity::default()
        },
    )
    .await
    .unwrap();
    let (pa, pb) = (pseudonym(a.clone()).await, pseudonym(b).await);
    assert!(pa.starts_with("psn_"), "{pa}");
    assert_eq!(pa, pb, "one name, one pseudonym");
    assert_eq!(find_other(app, "N\u{303}-2024-001").await, vec![a.clone()]);
    assert_eq!(find_other(app, "\u{d1}-2024-001").await, vec![a.clone()]);
    assert_duplicate(
        app,
        other_document(decomposed, "N\u{303}-2024-001", "c@example.com"),
    )
    .await;

    // A record as the previous version stored it: number sealed and indexed decomposed.
    let legacy = create(
        app,
        other_document("Lee", "\u{c5}-77", "legacy@example.com"),
    )
    .await
    .unwrap();
    let legacy_number = "A\u{30a}-77";
    let keys = app.vault.keys();
    let wrapped = app
        .bytes(&format!(
            "SELECT wrapped_key FROM records WHERE record_id = '{legacy}'"
        ))
        .await;
    let dek = keys.unwrap(&wrapped, &legacy).await.unwrap();
    let sealed = dek
        .seal_field(&legacy, "id_number", legacy_number.as_bytes())
        .unwrap();
    let index = keys
        .index_keys(1)
        .unwrap()
        .blind_index
        .document("OTHER", legacy_number);
    let mut fields = app.sealed_fields(&legacy).await;
    for (name, ciphertext) in &mut fields {
        if name == "id_number" {
            *ciphertext = sealed.clone();
        }
    }
    app.set_sealed_fields(&legacy, &fields).await;
    app.execute_sql(&format!(
        "UPDATE records SET document_index = {} WHERE record_id = '{legacy}'",
        app.hex_literal(&index)
    ))
    .await;
    assert!(
        find_other(app, "\u{c5}-77").await.is_empty(),
        "indexed decomposed, not found until re-indexed"
    );
    assert!(rotate_index(app, 1).await.created);
    let last = rewrap(app, 0).await.pop().unwrap();
    assert!(last.done);
    assert_eq!(find_other(app, "\u{c5}-77").await, vec![legacy.clone()]);
    assert_eq!(find_other(app, legacy_number).await, vec![legacy.clone()]);
    // Records stored normalised are found as before.
    assert_eq!(find_other(app, "N\u{303}-2024-001").await, vec![a]);
}

for_each_backend!(
    an_old_format_age_gate_opens_and_reindexing_moves_it,
    equivalent_spellings_are_one_value,
    index_destruction_reaches_every_instance,
    index_rotation_reindex_retire_destroy,
    another_instance_follows_an_index_rotation,
);
