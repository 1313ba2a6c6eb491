//! Golden vectors: bytes this version of the vault produced, committed under
//! `tests/fixtures/golden/`, which every later version must still open or verify.
//!
//! A sealed field, a wrapped data key (both suites), blind indexes and pseudonyms, the
//! keyring file that holds their keys, audit event hashes and a signer's chain of format-2
//! checkpoints as witness lines (and, in `tests/it/hsm.rs`, data keys the PKCS#11 provider
//! wrapped). Records, backups and witness files outlive the code that
//! wrote them: a change that stops these opening (a new associated-data layout, a different
//! canonical encoding) must bump a format byte and keep the old format readable, never
//! rewrite these files. New formats get new fixture directories beside this one.
//!
//! The primitives beneath these formats have their known-answer tests beside the code, in
//! `crypto`'s unit tests: AES-256-GCM (the GCM specification), SM4-GCM (RFC 8998), SM3
//! (GB/T 32905) and HMAC-SM3 (GM/T 0042).
//!
//! The keys in the fixtures are test keys, generated for the fixtures and used nowhere else.
//! `write_golden_vectors` (ignored) is how a fixture directory was produced; it refuses to
//! overwrite one.

use std::path::{Path, PathBuf};

use pdvault::audit::{
    AuditEvent, ChainHead, ChainVerifier, Checkpoint, CheckpointLink, StoredEvent, Witness,
};
use pdvault::crypto::{AuditPublicKey, BlindIndexKey, DataKey, PseudonymKey, SecretKey, Suite};
use pdvault::keys::Keyring;
use serde_json::{Value, json};

/// The fixtures of the formats written up to (and including) November 2026: sealed fields
/// and wrapped keys of format 1, checkpoints of format 2.
const FIXTURES: &str = "tests/fixtures/golden/2026-11";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES)
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name))
        .unwrap_or_else(|e| panic!("{FIXTURES}/{name}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn unhex(text: &Value) -> Vec<u8> {
    data_encoding::HEXLOWER
        .decode(text.as_str().expect("a hex string").as_bytes())
        .unwrap()
}

fn text(value: &Value) -> &str {
    value.as_str().expect("a string")
}

fn secret(bytes: &[u8]) -> SecretKey {
    SecretKey::from_bytes(&mut bytes.to_vec()).unwrap()
}

fn suite(value: &Value) -> Suite {
    Suite::parse(text(value)).expect("a suite name")
}

/// The fixture keyring, loaded the way the vault loads its own (which insists on mode 0600,
/// a mode git does not keep).
fn keyring() -> (Keyring, Value, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let bytes = std::fs::read(fixtures().join("keyring.json")).unwrap();
    pdvault::keys::write_private_file(&path, &bytes).unwrap();
    let file: Value = serde_json::from_slice(&bytes).unwrap();
    (Keyring::load(&path).unwrap(), file, dir)
}

fn base64_key(value: &Value) -> SecretKey {
    let mut bytes = data_encoding::BASE64
        .decode(text(value).as_bytes())
        .unwrap();
    SecretKey::from_bytes(&mut bytes).unwrap()
}

#[test]
fn sealed_fields_and_wrapped_keys_of_format_1_still_open() {
    let (keyring, _, _dir) = keyring();
    let vectors = read_json("records.json");
    let records = vectors["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "one record per suite");
    for record in records {
        let record_id = text(&record["record_id"]);
        let suite = suite(&record["suite"]);
        let data_key = unhex(&record["data_key"]);
        let wrapped = unhex(&record["wrapped_key"]);
        assert_eq!(wrapped[0], 1, "format 1");
        assert_eq!(wrapped[1], suite as u8);

        // The wrapped key opens under the keyring's KEK, to the data key recorded...
        let unwrapped = keyring.unwrap(&wrapped, record_id).unwrap();
        assert_eq!(unwrapped.suite(), suite);
        assert_eq!(hex(unwrapped.secret().expose()), hex(&data_key));
        // ...and only for its record.
        assert!(keyring.unwrap(&wrapped, "rec_someoneelse").is_err());

        let independent = DataKey::from_secret(secret(&data_key), suite);
        for field in record["fields"].as_array().unwrap() {
            let name = text(&field["field"]);
            let sealed = unhex(&field["sealed"]);
            assert_eq!((sealed[0], sealed[1]), (1, suite as u8));
            for key in [&unwrapped, &independent] {
                let opened = key.open_field(record_id, name, &sealed).unwrap();
                assert_eq!(opened.as_slice(), text(&field["plaintext"]).as_bytes());
            }
            // Bound to its place: the same bytes under another field do not open.
            assert!(
                independent
                    .open_field(record_id, "pdvault.moved", &sealed)
                    .is_err()
            );
        }
    }
}

#[test]
fn blind_indexes_and_pseudonyms_are_still_computed_alike() {
    let (keyring, file, _dir) = keyring();
    let vectors = read_json("records.json");
    let index = &file["index_keys"][0];
    let blind_key = base64_key(&index["blind_index_key"]);
    let pseudonym_key = base64_key(&index["pseudonym_key"]);
    // The keyring's own (HMAC-SHA-256) keys, and both MACs over the same key material.
    let loaded = keyring.index_keys(1).unwrap();
    for entry in vectors["indexes"].as_array().unwrap() {
        let suite = suite(&entry["suite"]);
        let blind = BlindIndexKey::with_suite(blind_key.clone(), suite);
        let pseudonyms = PseudonymKey::with_suite(pseudonym_key.clone(), suite);
        let document = blind.document(text(&entry["id_type"]), text(&entry["id_number"]));
        let phone = blind.phone(text(&entry["phone"]));
        let pseudonym = pseudonyms.pseudonym(
            text(&entry["purpose"]),
            text(&entry["field"]),
            text(&entry["value"]),
        );
        assert_eq!(hex(&document), text(&entry["document_index"]), "{suite:?}");
        assert_eq!(hex(&phone), text(&entry["phone_index"]), "{suite:?}");
        assert_eq!(pseudonym, text(&entry["pseudonym"]), "{suite:?}");
        if suite == Suite::Aes256GcmHmacSha256 {
            assert_eq!(loaded.blind_index.phone(text(&entry["phone"])), phone);
        }
    }
}

fn event_of(value: &Value) -> AuditEvent {
    let optional = |key: &str| value[key].as_str().map(str::to_owned);
    AuditEvent {
        event_id: text(&value["event_id"]).to_owned(),
        occurred_at: value["occurred_at"].as_i64().unwrap(),
        chain_id: text(&value["chain_id"]).to_owned(),
        caller: text(&value["caller"]).to_owned(),
        peer: optional("peer"),
        rpc: text(&value["rpc"]).to_owned(),
        record_ids: value["record_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| text(id).to_owned())
            .collect(),
        purpose: optional("purpose"),
        justification: optional("justification"),
        released: value["released"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| (text(&pair[0]).to_owned(), text(&pair[1]).to_owned()))
            .collect(),
        outcome: text(&value["outcome"]).to_owned(),
        reason: optional("reason"),
        request_id: optional("request_id"),
        trace_id: optional("trace_id"),
    }
}

#[test]
fn audit_event_hashes_and_format_2_checkpoints_still_verify() {
    let vectors = read_json("audit.json");
    let public = AuditPublicKey::from_hex(text(&vectors["public_key"])).unwrap();
    let chain_id = text(&vectors["chain_id"]);

    // Every event hash, recomputed from the canonical encoding.
    let mut stored = Vec::new();
    let mut prev = pdvault::audit::genesis(chain_id).to_vec();
    for (i, entry) in vectors["events"].as_array().unwrap().iter().enumerate() {
        let event = event_of(&entry["event"]);
        let seq = entry["seq"].as_i64().unwrap();
        assert_eq!(seq, i as i64 + 1);
        assert_eq!(hex(&prev), text(&entry["prev_hash"]));
        let hash = pdvault::audit::link(&event, seq, &prev);
        assert_eq!(hex(&hash), text(&entry["hash"]), "event {seq}");
        stored.push(StoredEvent {
            event,
            seq,
            prev_hash: prev.clone(),
            hash: hash.to_vec(),
        });
        prev = hash.to_vec();
    }

    // The witness lines, read by the witness reader, signed by the published key and
    // chained counter by counter from the signer's genesis.
    let witness = Witness::read(&fixtures().join("witness.jsonl")).unwrap();
    assert!(witness.problems.is_empty(), "{:?}", witness.problems);
    assert_eq!(witness.checkpoints.len(), 3);
    let mut verifier = ChainVerifier::new(chain_id, None);
    let mut previous: Option<&Checkpoint> = None;
    for (i, checkpoint) in witness.checkpoints.iter().enumerate() {
        assert_eq!(checkpoint.format(), 2);
        let link = checkpoint.link.as_ref().unwrap();
        assert_eq!(link.counter, i as i64 + 1);
        assert_eq!(link.key_id, public.key_id());
        let expected_prev = match previous {
            None => pdvault::audit::checkpoint_genesis(&link.signer).to_vec(),
            Some(previous) => previous.hash().to_vec(),
        };
        assert_eq!(link.prev, expected_prev, "checkpoint {}", link.counter);
        assert!(
            public.verify(&checkpoint.message(), &checkpoint.signature),
            "checkpoint {} verifies with the public key alone",
            link.counter
        );
        for head in &checkpoint.heads {
            if link.closed.contains(&head.chain_id) {
                verifier.expect_final(head);
            } else {
                verifier.expect_head(head);
            }
        }
        previous = Some(checkpoint);
    }
    assert_eq!(
        hex(&witness.checkpoints[2].hash()),
        text(&vectors["last_checkpoint_hash"])
    );
    for event in &stored {
        verifier.feed(event);
    }
    let (events, problem) = verifier.finish();
    assert_eq!(problem, None);
    assert_eq!(events, stored.len() as u64);
}

/// Writes a fixture directory from keys made now and the code of today. Run once per new
/// format (`cargo test --test it golden::write_golden_vectors -- --ignored`, with
/// `PDVAULT_GOLDEN_DIR` naming a directory that does not exist yet), then commit it and point
/// the tests at it; never rerun it over a committed directory.
#[test]
#[ignore]
fn write_golden_vectors() {
    let dir = PathBuf::from(std::env::var("PDVAULT_GOLDEN_DIR").expect("PDVAULT_GOLDEN_DIR"));
    assert!(
        !dir.exists(),
        "{} exists: fixtures are never rewritten",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();

    // A keyring made by the vault's own code.
    let scratch = tempfile::tempdir().unwrap();
    let keyring_path = scratch.path().join("keyring.json");
    let keyring = Keyring::load_or_create(&keyring_path, true).unwrap();
    std::fs::copy(&keyring_path, dir.join("keyring.json")).unwrap();
    let file: Value = serde_json::from_slice(&std::fs::read(&keyring_path).unwrap()).unwrap();

    let mut records = Vec::new();
    for (suite, record_id, name) in [
        (
            Suite::Aes256GcmHmacSha256,
            "rec_goldenaes0000000000000000",
            "张三",
        ),
        (
            Suite::Sm4GcmHmacSm3,
            "rec_goldensm40000000000000000",
            "李四",
        ),
    ] {
        let dek = DataKey::generate_for(suite).unwrap();
        let wrapped = keyring.wrap(&dek, record_id).unwrap();
        let fields: Vec<Value> = [("name", name), ("email", "golden@example.com")]
            .into_iter()
            .map(|(field, plaintext)| {
                let sealed = dek
                    .seal_field(record_id, field, plaintext.as_bytes())
                    .unwrap();
                json!({"field": field, "plaintext": plaintext, "sealed": hex(&sealed)})
            })
            .collect();
        records.push(json!({
            "suite": suite.as_str(),
            "record_id": record_id,
            "data_key": hex(dek.secret().expose()),
            "wrapped_key": hex(&wrapped),
            "fields": fields,
        }));
    }
    let index = &file["index_keys"][0];
    let indexes: Vec<Value> = Suite::ALL
        .into_iter()
        .map(|suite| {
            let blind = BlindIndexKey::with_suite(base64_key(&index["blind_index_key"]), suite);
            let pseudonyms = PseudonymKey::with_suite(base64_key(&index["pseudonym_key"]), suite);
            let (id_type, id_number, phone) = ("PASSPORT", "E12345678", "+8613812345678");
            json!({
                "suite": suite.as_str(),
                "id_type": id_type,
                "id_number": id_number,
                "document_index": hex(&blind.document(id_type, id_number)),
                "phone": phone,
                "phone_index": hex(&blind.phone(phone)),
                "purpose": "analytics",
                "field": "name",
                "value": "张三",
                "pseudonym": pseudonyms.pseudonym("analytics", "name", "张三"),
            })
        })
        .collect();
    write_json(
        &dir.join("records.json"),
        &json!({"records": records, "indexes": indexes}),
    );

    // Three events of one chain, as the audit writer hashes them, and a signer's first
    // three checkpoints over it: the introduction at the origin, a moved head, the close.
    let chain_id = "chn_golden00000000000000000";
    let signing = keyring.audit_signing();
    let public = signing.public_key();
    let mut events = Vec::new();
    let mut prev = pdvault::audit::genesis(chain_id).to_vec();
    let mut heads = Vec::new();
    for seq in 1..=3i64 {
        let event = AuditEvent {
            event_id: format!("evt_golden{seq:016}"),
            occurred_at: 1_796_000_000_000_000 + seq,
            chain_id: chain_id.into(),
            caller: "claims-service".into(),
            peer: Some("127.0.0.1:50000".into()),
            rpc: "GetRecord".into(),
            record_ids: vec!["rec_goldenaes0000000000000000".into()],
            purpose: Some("service-delivery".into()),
            justification: (seq == 2).then(|| "case 42".into()),
            released: vec![("name".into(), "MASKED".into())],
            outcome: "OK".into(),
            reason: None,
            request_id: Some(format!("req-{seq}")),
            trace_id: None,
        };
        let hash = pdvault::audit::link(&event, seq, &prev);
        let released: Vec<Value> = event
            .released
            .iter()
            .map(|(field, level)| json!([field, level]))
            .collect();
        events.push(json!({
            "seq": seq,
            "prev_hash": hex(&prev),
            "hash": hex(&hash),
            "event": {
                "event_id": event.event_id, "occurred_at": event.occurred_at,
                "chain_id": event.chain_id, "caller": event.caller, "peer": event.peer,
                "rpc": event.rpc, "record_ids": event.record_ids, "purpose": event.purpose,
                "justification": event.justification,
                "released": released,
                "outcome": event.outcome, "reason": event.reason,
                "request_id": event.request_id, "trace_id": event.trace_id,
            },
        }));
        heads.push(ChainHead {
            chain_id: chain_id.into(),
            seq,
            hash: hash.to_vec(),
        });
        prev = hash.to_vec();
    }
    let signer = "sgn_golden00000000000000000";
    let sink = pdvault::audit::CheckpointSink::File(dir.join("witness.jsonl"));
    let mut previous: Option<Checkpoint> = None;
    let origin = ChainHead {
        chain_id: chain_id.into(),
        seq: 0,
        hash: pdvault::audit::genesis(chain_id).to_vec(),
    };
    for (counter, head, closed) in [
        (1i64, origin, false),
        (2, heads[1].clone(), false),
        (3, heads[2].clone(), true),
    ] {
        let mut checkpoint = Checkpoint {
            id: 0,
            created_at: 1_796_000_000_000_000 + 10 * counter,
            heads: vec![head],
            signature: Vec::new(),
            link: Some(CheckpointLink {
                signer: signer.into(),
                counter,
                key_id: public.key_id(),
                prev: match &previous {
                    None => pdvault::audit::checkpoint_genesis(signer).to_vec(),
                    Some(previous) => previous.hash().to_vec(),
                },
                closed: if closed {
                    vec![chain_id.into()]
                } else {
                    Vec::new()
                },
            }),
        };
        checkpoint.signature = signing.sign(&checkpoint.message());
        sink.append(&checkpoint).unwrap();
        previous = Some(checkpoint);
    }
    write_json(
        &dir.join("audit.json"),
        &json!({
            "public_key": public.to_hex(),
            "chain_id": chain_id,
            "events": events,
            "last_checkpoint_hash": hex(&previous.unwrap().hash()),
        }),
    );
}

fn write_json(path: &Path, value: &Value) {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// The fixtures of wrapped keys of format 2 (KW under the suite's HKDF-derived KEK) and age
/// gates of format 2 (sealed under the record's own state key), both suites, made under the
/// keys of `2026-11/keyring.json`.
const FIXTURES_FORMAT_2: &str = "tests/fixtures/golden/2026-11-format-2";

fn read_format_2() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(FIXTURES_FORMAT_2)
        .join("records.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The age gate's field name (`accounts::AGE_GATE_FIELD`).
const AGE_GATE_FIELD: &str = "state.date_of_birth";

#[test]
fn wrapped_keys_and_age_gates_of_format_2_still_open() {
    let (keyring, file, _dir) = keyring();
    let vectors = read_format_2();
    let records = vectors["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "one record per suite");
    for record in records {
        let record_id = text(&record["record_id"]);
        let suite = suite(&record["suite"]);
        let data_key = unhex(&record["data_key"]);
        let wrapped = unhex(&record["wrapped_key"]);
        assert_eq!((wrapped[0], wrapped[1]), (2, suite as u8), "format 2");
        let unwrapped = keyring.unwrap(&wrapped, record_id).unwrap();
        assert_eq!(unwrapped.suite(), suite);
        assert_eq!(hex(unwrapped.secret().expose()), hex(&data_key));
        assert!(keyring.unwrap(&wrapped, "rec_someoneelse").is_err());
        // KW is deterministic: the same key wraps to the same bytes, so the whole format
        // (derived KEK, context digest, layout) is pinned, not only its opening.
        let again = keyring
            .wrap(&DataKey::from_secret(secret(&data_key), suite), record_id)
            .unwrap();
        assert_eq!(hex(&again), hex(&wrapped));
    }
    let blind_index_key = base64_key(&file["index_keys"][0]["blind_index_key"]);
    let gates = vectors["age_gates"].as_array().unwrap();
    assert_eq!(gates.len(), 2, "one per index suite");
    for gate in gates {
        let suite = suite(&gate["suite"]);
        let record_id = text(&gate["record_id"]);
        let sealed = unhex(&gate["sealed"]);
        assert_eq!((sealed[0], sealed[1]), (2, suite as u8), "format 2");
        let state = BlindIndexKey::with_suite(blind_index_key.clone(), suite).derive_state_key();
        let opened = state.open(record_id, AGE_GATE_FIELD, &sealed).unwrap();
        assert_eq!(opened.as_slice(), text(&gate["birth_date"]).as_bytes());
        assert!(
            state
                .open("rec_someoneelse", AGE_GATE_FIELD, &sealed)
                .is_err()
        );
    }
}

/// Writes `2026-11-format-2/records.json` under the keys of `2026-11/keyring.json`
/// (`cargo test --test it golden::write_format_2_golden_vectors -- --ignored`, with
/// `PDVAULT_GOLDEN_DIR` naming a directory that does not exist yet).
#[test]
#[ignore]
fn write_format_2_golden_vectors() {
    let dir = PathBuf::from(std::env::var("PDVAULT_GOLDEN_DIR").expect("PDVAULT_GOLDEN_DIR"));
    assert!(
        !dir.exists(),
        "{} exists: fixtures are never rewritten",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();
    let (keyring, file, _scratch) = keyring();
    let records: Vec<Value> = [
        (Suite::Aes256GcmHmacSha256, "rec_goldenkwaes00000000000000"),
        (Suite::Sm4GcmHmacSm3, "rec_goldenkwsm400000000000000"),
    ]
    .into_iter()
    .map(|(suite, record_id)| {
        let dek = DataKey::generate_for(suite).unwrap();
        json!({
            "suite": suite.as_str(),
            "record_id": record_id,
            "data_key": hex(dek.secret().expose()),
            "wrapped_key": hex(&keyring.wrap(&dek, record_id).unwrap()),
        })
    })
    .collect();
    let blind_index_key = base64_key(&file["index_keys"][0]["blind_index_key"]);
    let age_gates: Vec<Value> = Suite::ALL
        .into_iter()
        .map(|suite| {
            let record_id = "rec_goldengate000000000000000";
            let birth_date = "2016-03-15";
            let sealed = BlindIndexKey::with_suite(blind_index_key.clone(), suite)
                .derive_state_key()
                .seal(record_id, AGE_GATE_FIELD, birth_date.as_bytes())
                .unwrap();
            json!({
                "suite": suite.as_str(),
                "record_id": record_id,
                "birth_date": birth_date,
                "sealed": hex(&sealed),
            })
        })
        .collect();
    write_json(
        &dir.join("records.json"),
        &json!({"records": records, "age_gates": age_gates}),
    );
}
