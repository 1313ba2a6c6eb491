//! Micro-benchmarks of the crypto on a request's path, each beside the floor it is judged
//! against: raw AES-256-GCM over the same byte counts with a ready cipher and a fixed nonce.
//!
//! `cargo bench --bench crypto`. The target is pdvault/raw ≤ 2 for sealing a full
//! record and opening four fields; BENCHMARKS.md carries the figures. What the floor leaves
//! out is exactly what the vault adds: a fresh random nonce per ciphertext, the associated
//! data binding record and field, the self-describing header, and key handling.

// A benchmark crate stops at the first broken expectation: unwrapping is how it says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce};
use criterion::{Criterion, criterion_group, criterion_main};
use pdvault::crypto::{BlindIndexKey, DataKey, Kek, SecretKey, Sm4, Suite};

const RECORD_ID: &str = "rec_abcdefghijklmnopqrstuvwxyz";

/// Canonical values of a full record, at the sizes real ones have.
const RECORD: [(&str, &str); 10] = [
    ("name", "王伟芳"),
    ("gender", "FEMALE"),
    ("id_type", "RESIDENT_ID"),
    ("id_number", "11010519491231002X"),
    ("date_of_birth", "1949-12-31"),
    ("nationality", "CHN"),
    ("phone", "+8613812345678"),
    ("email", "user123456789@example.com"),
    ("address", "北京市东城区东长安街100号"),
    ("postal_code", "100010"),
];

/// The fields a `GetRecord` for four plain fields opens.
const FOUR: [usize; 4] = [0, 3, 6, 7];

fn raw_seal(cipher: &Aes256Gcm, buffers: &mut [Vec<u8>], plaintexts: &[&[u8]]) {
    let nonce = &Nonce::<Aes256Gcm>::from([7u8; 12]);
    for (buffer, plaintext) in buffers.iter_mut().zip(plaintexts) {
        buffer.clear();
        buffer.extend_from_slice(plaintext);
        cipher
            .encrypt_in_place(nonce, b"", buffer)
            .expect("encrypts");
    }
}

fn sealing(c: &mut Criterion) {
    let kek = Kek::new("kek", 1, SecretKey::generate().unwrap());
    let mut group = c.benchmark_group("seal_full_record");
    group.bench_function("pdvault", |b| {
        b.iter(|| {
            let dek = DataKey::generate().unwrap();
            let fields: Vec<(&str, &[u8])> =
                RECORD.iter().map(|(f, v)| (*f, v.as_bytes())).collect();
            let sealed = dek.seal_fields(RECORD_ID, &fields).unwrap();
            let wrapped = kek.wrap(&dek, RECORD_ID).unwrap();
            black_box((sealed, wrapped))
        })
    });
    // The same bytes: ten field values and one 32-byte key, encrypted with ready ciphers.
    let record_cipher = Aes256Gcm::new(&[1u8; 32].into());
    let kek_cipher = Aes256Gcm::new(&[2u8; 32].into());
    let plaintexts: Vec<&[u8]> = RECORD.iter().map(|(_, v)| v.as_bytes()).collect();
    let key = [3u8; 32];
    group.bench_function("raw_aes_gcm", |b| {
        let mut buffers = vec![Vec::with_capacity(64); RECORD.len()];
        let mut key_buffer = vec![Vec::with_capacity(64)];
        b.iter(|| {
            raw_seal(&record_cipher, &mut buffers, &plaintexts);
            raw_seal(&kek_cipher, &mut key_buffer, &[&key]);
            black_box((&buffers, &key_buffer));
        })
    });
    group.finish();
}

fn opening(c: &mut Criterion) {
    let kek = Kek::new("kek", 1, SecretKey::generate().unwrap());
    let dek = DataKey::generate().unwrap();
    let sealed: Vec<Vec<u8>> = RECORD
        .iter()
        .map(|(field, value)| dek.seal_field(RECORD_ID, field, value.as_bytes()).unwrap())
        .collect();
    let wrapped = kek.wrap(&dek, RECORD_ID).unwrap();
    let mut group = c.benchmark_group("open_four_fields");
    group.bench_function("pdvault", |b| {
        b.iter(|| {
            let dek = kek.unwrap(&wrapped, RECORD_ID).unwrap();
            let opened: Vec<_> = FOUR
                .iter()
                .map(|&i| dek.open_field(RECORD_ID, RECORD[i].0, &sealed[i]).unwrap())
                .collect();
            black_box(opened)
        })
    });
    // The same bytes decrypted with ready ciphers: one 32-byte key and four values.
    let record_cipher = Aes256Gcm::new(&[1u8; 32].into());
    let kek_cipher = Aes256Gcm::new(&[2u8; 32].into());
    let nonce = &Nonce::<Aes256Gcm>::from([7u8; 12]);
    let seal_raw = |cipher: &Aes256Gcm, plaintext: &[u8]| {
        let mut buffer = plaintext.to_vec();
        cipher.encrypt_in_place(nonce, b"", &mut buffer).unwrap();
        buffer
    };
    let raw_key = seal_raw(&kek_cipher, &[3u8; 32]);
    let raw_fields: Vec<Vec<u8>> = FOUR
        .iter()
        .map(|&i| seal_raw(&record_cipher, RECORD[i].1.as_bytes()))
        .collect();
    group.bench_function("raw_aes_gcm", |b| {
        let mut buffer = Vec::with_capacity(128);
        b.iter(|| {
            buffer.clear();
            buffer.extend_from_slice(&raw_key);
            kek_cipher
                .decrypt_in_place(nonce, b"", &mut buffer)
                .unwrap();
            for field in &raw_fields {
                buffer.clear();
                buffer.extend_from_slice(field);
                record_cipher
                    .decrypt_in_place(nonce, b"", &mut buffer)
                    .unwrap();
                black_box(&buffer);
            }
        })
    });
    group.finish();
}

fn data_keys(c: &mut Criterion) {
    let kek = Kek::new("kek", 1, SecretKey::generate().unwrap());
    let dek = DataKey::generate().unwrap();
    let wrapped = kek.wrap(&dek, RECORD_ID).unwrap();
    let mut group = c.benchmark_group("data_key");
    group.bench_function("wrap", |b| {
        b.iter(|| black_box(kek.wrap(&dek, RECORD_ID).unwrap()))
    });
    group.bench_function("unwrap", |b| {
        b.iter(|| black_box(kek.unwrap(&wrapped, RECORD_ID).unwrap()))
    });
    let sm4 = DataKey::generate_for(Suite::Sm4GcmHmacSm3).unwrap();
    let sm4_wrapped = kek.wrap(&sm4, RECORD_ID).unwrap();
    group.bench_function("wrap_sm4", |b| {
        b.iter(|| black_box(kek.wrap(&sm4, RECORD_ID).unwrap()))
    });
    group.bench_function("unwrap_sm4", |b| {
        b.iter(|| black_box(kek.unwrap(&sm4_wrapped, RECORD_ID).unwrap()))
    });
    let cipher = Aes256Gcm::new(&[2u8; 32].into());
    let nonce = &Nonce::<Aes256Gcm>::from([7u8; 12]);
    let mut sealed_key = [3u8; 32].to_vec();
    cipher
        .encrypt_in_place(nonce, b"", &mut sealed_key)
        .unwrap();
    group.bench_function("raw_aes_gcm_encrypt_32_bytes", |b| {
        let mut buffer = Vec::with_capacity(64);
        b.iter(|| {
            buffer.clear();
            buffer.extend_from_slice(&[3u8; 32]);
            cipher.encrypt_in_place(nonce, b"", &mut buffer).unwrap();
            black_box(&buffer);
        })
    });
    group.bench_function("raw_aes_gcm_decrypt_32_bytes", |b| {
        let mut buffer = Vec::with_capacity(64);
        b.iter(|| {
            buffer.clear();
            buffer.extend_from_slice(&sealed_key);
            cipher.decrypt_in_place(nonce, b"", &mut buffer).unwrap();
            black_box(&buffer);
        })
    });
    group.finish();
}

fn blind_indexes(c: &mut Criterion) {
    let key = BlindIndexKey::new(SecretKey::generate().unwrap());
    let mut group = c.benchmark_group("blind_index");
    group.bench_function("document", |b| {
        b.iter(|| black_box(key.document("RESIDENT_ID", black_box("11010519491231002X"))))
    });
    group.bench_function("phone", |b| {
        b.iter(|| black_box(key.phone(black_box("+8613812345678"))))
    });
    group.finish();
}

/// One SM4 block: this crate's constant-time S-box (every entry read per look-up) against the
/// `sm4` crate's table look-ups, and a full record sealed under the SM4 suite.
fn sm4(c: &mut Criterion) {
    use cipher::{Array, Block, BlockCipherEncrypt};
    let mut group = c.benchmark_group("sm4");
    let key = Array::from([9u8; 16]);
    let ours = <Sm4 as KeyInit>::new(&key);
    let table = <sm4::Sm4 as KeyInit>::new(&key);
    let mut block: Block<Sm4> = Array::from([5u8; 16]);
    group.bench_function("block_constant_time", |b| {
        b.iter(|| {
            ours.encrypt_block(&mut block);
            black_box(&block);
        })
    });
    group.bench_function("block_sm4_crate_tables", |b| {
        b.iter(|| {
            table.encrypt_block(&mut block);
            black_box(&block);
        })
    });
    let kek = Kek::new("kek", 1, SecretKey::generate().unwrap());
    group.bench_function("seal_full_record", |b| {
        b.iter(|| {
            let dek = DataKey::generate_for(Suite::Sm4GcmHmacSm3).unwrap();
            let fields: Vec<(&str, &[u8])> =
                RECORD.iter().map(|(f, v)| (*f, v.as_bytes())).collect();
            let sealed = dek.seal_fields(RECORD_ID, &fields).unwrap();
            let wrapped = kek.wrap(&dek, RECORD_ID).unwrap();
            black_box((sealed, wrapped))
        })
    });
    group.finish();
}

criterion_group!(benches, sealing, opening, data_keys, blind_indexes, sm4);
criterion_main!(benches);
