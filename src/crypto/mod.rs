//! Every cryptographic operation pdvault performs: sealing identity fields under a record's
//! data key, wrapping data keys under a key-encryption key, blind indexes and pseudonyms.
//!
//! This module does no I/O and reads no configuration: keys come in as values and bytes go
//! out. Keeping it pure means it can be reviewed, fuzzed and benchmarked on its own.
//!
//! Formats are self-describing so that key rotation and a second cipher suite need no schema
//! change. A sealed field is
//! `[format=1][suite][nonce: 12][ciphertext || tag: 16]`, with associated data
//! `"pdvault.field" || format || suite || record_id || 0x00 || field`. A ciphertext copied
//! into another record or another field therefore fails to authenticate instead of opening
//! as the wrong person's data. A wrapped data key is
//! `[format=2][suite][key_id_len][key_id][kek_version: u32 BE][KW(data key || context): 56]`:
//! the SP 800-38F key wrap (KW, RFC 3394) under a KEK derived for the suite, where `context`
//! is 16 bytes of a hash of the header and the record id, so the wrap is bound to both as
//! associated data would bind them (KW has none). KW needs no nonce, so nothing limits how
//! many keys one KEK version wraps (random 96-bit GCM nonces are good for 2^32 per key). The
//! wrapped input is 48 bytes, a whole number of 64-bit semiblocks, so KW needs no padding
//! and KWP (RFC 5649) would add nothing; KW is also the one wrap every PKCS#11 module
//! implements alike (`CKM_AES_KEY_WRAP`), where `CKM_AES_KEY_WRAP_PAD` means RFC 5649 in
//! some modules and PKCS#7 padding in others. Format 1 (`[1][suite][len][key_id][version]
//! [nonce: 12][AES-GCM or SM4-GCM of the key || tag]`, the raw KEK as the GCM key, associated
//! data the header and the record id) still opens; the rewrap job writes format 2 as it moves
//! keys to a new KEK version.
//!
//! # One key, one algorithm
//!
//! A stored KEK is never used directly: each suite wraps under its own KEK derived with
//! HKDF (HKDF-SHA-256 labelled `aes-256-gcm` for AES-KW, HKDF-SM3 labelled `sm4-gcm` for
//! SM4-KW, the same construction over SM4), so no key serves two algorithms. The age gate's
//! key is derived per record (HKDF of the index version's state key and the record id) with
//! the index suite's hash and seals with the index suite's cipher, so an SM4 deployment
//! writes no AES ciphertext and no state key seals more than a handful of values (sealed
//! field format 2, below).
//!
//! # Key schedules
//!
//! Every cipher object is built from a key once and wiped when dropped: the `aes`, `polyval`
//! (GHASH) and SM4 key schedules zeroise on drop, as do the SHA-256 and SM3 states an HMAC or
//! HKDF keys, a KEK keeps one wrapping cipher per suite for its lifetime, and a data key one
//! AEAD for the record it serves.
//!
//! Two cipher suites coexist: `aes256gcm-hmacsha256` (suite byte 1, the default) and
//! `sm4gcm-hmacsm3` (suite byte 2: SM4 in GCM mode as RFC 8998 uses it, with a 96-bit nonce
//! and a 128-bit tag, and HMAC-SM3 for blind indexes and pseudonyms), for deployments that
//! must use the Chinese commercial algorithms (GB/T 39786-2021). A data key carries the suite
//! it seals under, and its wrapped form names it, so a record keeps its suite across KEK
//! rewraps and changes it only when re-keyed. Keys are 256 random bits either way; an SM4
//! data key uses the first 128 of them, which are as random as the whole (a data key serves
//! its one suite only). SM4 is this crate's own constant-time implementation
//! ([`ct_sm4`]), not the table-driven `sm4` crate.
//!
//! The age gate (account state) is a sealed field of format 2: the same layout, sealed under
//! a per-record state key (see [`StateKey`]); format 1 gates, sealed under the index
//! version's one AES-256-GCM state key, still open.
//!
//! Key material lives only in [`SecretKey`], which zeroises on drop and whose `Debug` is
//! redacted.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, AesGcm};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sm3::Sm3;
use std::sync::OnceLock;
use zeroize::{Zeroize, Zeroizing};

pub mod ct_sm4;

pub use ct_sm4::Sm4;

/// Version of the byte layouts described in the module header.
const FORMAT_V1: u8 = 1;
/// Wrapped keys: KW under a suite KEK. Sealed fields: an age gate under a per-record key.
const FORMAT_V2: u8 = 2;
/// A KW-wrapped key: the 8-byte integrity block, the data key and the context digest.
const KW_WRAPPED_LEN: usize = 8 + KEY_LEN + CONTEXT_LEN;
/// Bytes of the hash of header and record id wrapped with a data key.
const CONTEXT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
pub const KEY_LEN: usize = 32;
/// The most HKDF expands to with SHA-256 or SM3: 255 blocks of 32 bytes (RFC 5869).
const HKDF_MAX_OUTPUT: usize = 255 * 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Authentication failed or the bytes are not in a format this build understands. Either
    /// way the data must not be trusted; callers fail closed.
    #[error("ciphertext failed to authenticate or is malformed")]
    Integrity,
    #[error("key {key_id} version {version} is not available")]
    UnknownKey { key_id: String, version: u32 },
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("key material has the wrong length")]
    KeyLength,
}

/// Cipher suites a ciphertext can name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Suite {
    /// AES-256-GCM and HMAC-SHA-256.
    #[default]
    Aes256GcmHmacSha256 = 1,
    /// SM4-GCM (GB/T 32907, RFC 8998) and HMAC-SM3 (GB/T 32905).
    Sm4GcmHmacSm3 = 2,
}

impl Suite {
    pub const ALL: [Suite; 2] = [Suite::Aes256GcmHmacSha256, Suite::Sm4GcmHmacSm3];

    fn from_byte(byte: u8) -> Result<Suite, CryptoError> {
        match byte {
            1 => Ok(Suite::Aes256GcmHmacSha256),
            2 => Ok(Suite::Sm4GcmHmacSm3),
            _ => Err(CryptoError::Integrity),
        }
    }

    /// The name configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Aes256GcmHmacSha256 => "aes256gcm-hmacsha256",
            Suite::Sm4GcmHmacSm3 => "sm4gcm-hmacsm3",
        }
    }

    pub fn parse(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|suite| suite.as_str() == name)
    }

    /// The label a suite's KEK is derived under: one key per algorithm.
    fn kek_label(self) -> &'static [u8] {
        match self {
            Suite::Aes256GcmHmacSha256 => b"aes-256-gcm",
            Suite::Sm4GcmHmacSm3 => b"sm4-gcm",
        }
    }

    /// HKDF with the suite's hash (SHA-256 or SM3): `N` bytes from `ikm` for `info`.
    #[allow(
        clippy::expect_used,
        reason = "HKDF refuses only more than 255 hash blocks, and the const assertion \
                  keeps N (a key's length, fixed by the caller's array type) within them"
    )]
    fn hkdf<const N: usize>(self, salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8; N]) {
        // Both hashes have 32-byte blocks; a longer `out` does not compile.
        const { assert!(N <= HKDF_MAX_OUTPUT) };
        let info = length_prefixed(info);
        match self {
            Suite::Aes256GcmHmacSha256 => hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
                .expand(&info, out)
                .expect("N is within HKDF's output limit, asserted at compile time"),
            Suite::Sm4GcmHmacSm3 => hkdf::Hkdf::<Sm3>::new(Some(salt), ikm)
                .expand(&info, out)
                .expect("N is within HKDF's output limit, asserted at compile time"),
        }
    }

    /// The suite's hash of length-prefixed `parts`.
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        use sha2::Digest;
        let bytes = length_prefixed(parts);
        match self {
            Suite::Aes256GcmHmacSha256 => Sha256::digest(&bytes).to_vec(),
            Suite::Sm4GcmHmacSm3 => Sm3::digest(&bytes).to_vec(),
        }
    }
}

/// `parts`, each preceded by its length as a u64 big-endian: an injective encoding.
fn length_prefixed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|part| 8 + part.len()).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

type Sm4Gcm = AesGcm<Sm4, U12>;
/// The 96-bit nonce both suites take.
type Nonce = aes_gcm::Nonce<U12>;

/// An AEAD of either suite: both take a 96-bit nonce and produce a 128-bit tag.
enum Cipher {
    Aes(Box<Aes256Gcm>),
    Sm4(Box<Sm4Gcm>),
}

impl Cipher {
    fn encrypt(&self, nonce: &[u8], payload: Payload<'_, '_>) -> Result<Vec<u8>, CryptoError> {
        let nonce = <&Nonce>::try_from(nonce).map_err(|_| CryptoError::Integrity)?;
        match self {
            Cipher::Aes(cipher) => cipher.encrypt(nonce, payload),
            Cipher::Sm4(cipher) => cipher.encrypt(nonce, payload),
        }
        .map_err(|_| CryptoError::Integrity)
    }

    fn decrypt(&self, nonce: &[u8], payload: Payload<'_, '_>) -> Result<Vec<u8>, CryptoError> {
        let nonce = <&Nonce>::try_from(nonce).map_err(|_| CryptoError::Integrity)?;
        match self {
            Cipher::Aes(cipher) => cipher.decrypt(nonce, payload),
            Cipher::Sm4(cipher) => cipher.decrypt(nonce, payload),
        }
        .map_err(|_| CryptoError::Integrity)
    }
}

/// A keyed MAC of either suite.
enum Mac256 {
    Sha256(Hmac<Sha256>),
    Sm3(Hmac<Sm3>),
}

impl Mac256 {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Mac256::Sha256(mac) => mac.update(bytes),
            Mac256::Sm3(mac) => mac.update(bytes),
        }
    }

    fn finalize(self) -> Vec<u8> {
        match self {
            Mac256::Sha256(mac) => mac.finalize().into_bytes().to_vec(),
            Mac256::Sm3(mac) => mac.finalize().into_bytes().to_vec(),
        }
    }
}

/// 256 bits of key material. Zeroised on drop; never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<SecretKey, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut()).map_err(|_| CryptoError::Random)?;
        Ok(SecretKey(bytes))
    }

    /// Takes ownership of `bytes` and wipes the caller's copy.
    pub fn from_bytes(bytes: &mut [u8]) -> Result<SecretKey, CryptoError> {
        if bytes.len() != KEY_LEN {
            bytes.zeroize();
            return Err(CryptoError::KeyLength);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        bytes.zeroize();
        Ok(SecretKey(key))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self, suite: Suite) -> Cipher {
        match suite {
            Suite::Aes256GcmHmacSha256 => Cipher::Aes(Box::new(Aes256Gcm::new((&*self.0).into()))),
            Suite::Sm4GcmHmacSm3 => {
                #[allow(
                    clippy::expect_used,
                    reason = "a 32-byte key has a first 16-byte chunk"
                )]
                let key = self
                    .0
                    .first_chunk::<16>()
                    .expect("SM4 takes 128 of 256 bits");
                Cipher::Sm4(Box::new(Sm4Gcm::new(key.into())))
            }
        }
    }

    #[allow(clippy::expect_used, reason = "HMAC takes a key of any length")]
    fn mac(&self, suite: Suite) -> Mac256 {
        match suite {
            Suite::Aes256GcmHmacSha256 => Mac256::Sha256(
                <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_ref())
                    .expect("HMAC accepts any key length"),
            ),
            Suite::Sm4GcmHmacSm3 => Mac256::Sm3(
                <Hmac<Sm3> as KeyInit>::new_from_slice(self.0.as_ref())
                    .expect("HMAC accepts any key length"),
            ),
        }
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A record's own data key (DEK) and the suite it seals under. Exists unwrapped only in
/// memory, only while in use.
///
/// It carries its key schedule, expanded once: a record's fields are sealed or opened
/// together, and expanding the key per field cost more than encrypting the field.
pub struct DataKey {
    key: SecretKey,
    suite: Suite,
    cipher: Cipher,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("key", &self.key)
            .field("suite", &self.suite)
            .finish()
    }
}

impl DataKey {
    /// A fresh data key of the default suite.
    pub fn generate() -> Result<DataKey, CryptoError> {
        DataKey::generate_for(Suite::default())
    }

    pub fn generate_for(suite: Suite) -> Result<DataKey, CryptoError> {
        Ok(DataKey::from_secret(SecretKey::generate()?, suite))
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// A data key from material unwrapped elsewhere (a hardware module).
    pub fn from_secret(key: SecretKey, suite: Suite) -> DataKey {
        let cipher = key.cipher(suite);
        DataKey { key, suite, cipher }
    }

    /// The key material, for a provider that wraps it outside this module.
    pub fn secret(&self) -> &SecretKey {
        &self.key
    }

    /// A second copy, for a bounded cache of unwrapped keys; both copies zeroise on drop.
    pub fn duplicate(&self) -> DataKey {
        DataKey::from_secret(self.key.clone(), self.suite)
    }

    /// Seals one field's canonical value for `record_id`.
    pub fn seal_field(
        &self,
        record_id: &str,
        field: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal_with_nonce(record_id, field, plaintext, &random_nonce()?)
    }

    /// Seals several fields of `record_id` at once, drawing all their nonces from the OS in
    /// one call (a system call per nonce was most of the cost of sealing a record).
    pub fn seal_fields(
        &self,
        record_id: &str,
        fields: &[(&str, &[u8])],
    ) -> Result<Vec<Vec<u8>>, CryptoError> {
        let mut nonces = vec![0u8; NONCE_LEN * fields.len()];
        getrandom::fill(&mut nonces).map_err(|_| CryptoError::Random)?;
        fields
            .iter()
            .zip(nonces.chunks_exact(NONCE_LEN))
            .map(|((field, plaintext), nonce)| {
                self.seal_with_nonce(record_id, field, plaintext, nonce)
            })
            .collect()
    }

    fn seal_with_nonce(
        &self,
        record_id: &str,
        field: &str,
        plaintext: &[u8],
        nonce: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal_format(FORMAT_V1, record_id, field, plaintext, nonce)
    }

    fn seal_format(
        &self,
        format: u8,
        record_id: &str,
        field: &str,
        plaintext: &[u8],
        nonce: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let header = [format, self.suite as u8];
        let aad = field_aad(&header, record_id, field);
        let sealed = self.cipher.encrypt(
            nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )?;
        let mut out = Vec::with_capacity(header.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a sealed field. The plaintext is returned in a buffer that wipes itself.
    pub fn open_field(
        &self,
        record_id: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.open_format(FORMAT_V1, record_id, field, sealed)
    }

    fn open_format(
        &self,
        format: u8,
        record_id: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 2 + NONCE_LEN + TAG_LEN || sealed[0] != format {
            return Err(CryptoError::Integrity);
        }
        // A field opens only under the suite its key was made for: the suite byte is
        // authenticated, but a mismatch is refused before any decryption is attempted.
        if Suite::from_byte(sealed[1])? != self.suite {
            return Err(CryptoError::Integrity);
        }
        let (header, rest) = sealed.split_at(2);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = field_aad(header, record_id, field);
        self.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
    }
}

fn field_aad(header: &[u8], record_id: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + header.len() + record_id.len() + field.len());
    aad.extend_from_slice(b"pdvault.field");
    aad.extend_from_slice(header);
    aad.extend_from_slice(record_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

/// A fresh 96-bit nonce from the operating system's CSPRNG.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
    Ok(nonce)
}

/// Which key-encryption key wrapped a data key, read from the wrapped bytes themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekRef {
    pub key_id: String,
    pub version: u32,
}

/// One version of a key-encryption key (KEK): the stored material, from which each suite's
/// wrapping KEK is derived, and those wrapping ciphers, each built once on first use and
/// kept (and wiped on drop) for the version's lifetime in this process.
pub struct Kek {
    pub key_id: String,
    pub version: u32,
    key: SecretKey,
    aes: OnceLock<Box<aes_kw::AesKw<aes::Aes256>>>,
    sm4: OnceLock<Box<aes_kw::AesKw<Sm4>>>,
    /// Format-1 keys opened with the stored material itself, one AEAD per suite.
    legacy: [OnceLock<Cipher>; 2],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The wrapping cipher of one suite: SP 800-38F KW over AES-256 or SM4.
#[derive(Clone, Copy)]
enum Kw<'a> {
    Aes(&'a aes_kw::AesKw<aes::Aes256>),
    Sm4(&'a aes_kw::AesKw<Sm4>),
}

impl Kw<'_> {
    fn wrap(self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = vec![0u8; plaintext.len() + aes_kw::IV_LEN];
        match self {
            Kw::Aes(kek) => kek.wrap_key(plaintext, &mut out),
            Kw::Sm4(kek) => kek.wrap_key(plaintext, &mut out),
        }
        .map_err(|_| CryptoError::KeyLength)?;
        Ok(out)
    }

    fn unwrap(self, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let Some(len) = wrapped.len().checked_sub(aes_kw::IV_LEN) else {
            return Err(CryptoError::Integrity);
        };
        let mut out = Zeroizing::new(vec![0u8; len]);
        match self {
            Kw::Aes(kek) => kek.unwrap_key(wrapped, &mut out),
            Kw::Sm4(kek) => kek.unwrap_key(wrapped, &mut out),
        }
        .map_err(|_| CryptoError::Integrity)?;
        Ok(out)
    }
}

impl Kek {
    pub fn new(key_id: impl Into<String>, version: u32, key: SecretKey) -> Kek {
        Kek {
            key_id: key_id.into(),
            version,
            key,
            aes: OnceLock::new(),
            sm4: OnceLock::new(),
            legacy: [OnceLock::new(), OnceLock::new()],
        }
    }

    pub fn reference(&self) -> KekRef {
        KekRef {
            key_id: self.key_id.clone(),
            version: self.version,
        }
    }

    /// The KEK `suite` wraps under: HKDF of the stored material with the suite's hash and
    /// label, so the stored key itself serves no algorithm.
    fn derive<const N: usize>(&self, suite: Suite, out: &mut [u8; N]) {
        suite.hkdf(
            b"pdvault.kek.v2",
            self.key.expose(),
            &[b"pdvault.kek.v2", suite.kek_label()],
            out,
        );
    }

    /// The suite's wrapping cipher, built on first use and kept.
    fn kw(&self, suite: Suite) -> Kw<'_> {
        match suite {
            Suite::Aes256GcmHmacSha256 => Kw::Aes(self.aes.get_or_init(|| {
                let mut key = Zeroizing::new([0u8; 32]);
                self.derive(suite, &mut key);
                Box::new(aes_kw::AesKw::new((&*key).into()))
            })),
            Suite::Sm4GcmHmacSm3 => Kw::Sm4(self.sm4.get_or_init(|| {
                let mut key = Zeroizing::new([0u8; 16]);
                self.derive(suite, &mut key);
                Box::new(aes_kw::AesKw::new((&*key).into()))
            })),
        }
    }

    /// Wraps `dek` for `record_id`, with the data key's own suite; the result names this KEK,
    /// its version and that suite.
    pub fn wrap(&self, dek: &DataKey, record_id: &str) -> Result<Vec<u8>, CryptoError> {
        let header = wrap_header(dek.suite, &self.key_id, self.version)?;
        let wrapped = self
            .kw(dek.suite)
            .wrap(&kw_plaintext(dek, &header, record_id))?;
        let mut out = header;
        out.extend_from_slice(&wrapped);
        Ok(out)
    }

    /// Unwraps a data key wrapped by [`Kek::wrap`] (or by a format-1 wrap) for the same
    /// `record_id`.
    pub fn unwrap(&self, wrapped: &[u8], record_id: &str) -> Result<DataKey, CryptoError> {
        let parts = split_wrapped(wrapped)?;
        if parts.reference.key_id != self.key_id || parts.reference.version != self.version {
            return Err(CryptoError::UnknownKey {
                key_id: parts.reference.key_id,
                version: parts.reference.version,
            });
        }
        match parts.body {
            WrappedBody::Kw(body) => {
                let plaintext = self.kw(parts.suite).unwrap(body)?;
                kw_open(plaintext, parts.suite, parts.header, record_id)
            }
            WrappedBody::Gcm { nonce, ciphertext } => {
                let cipher = self.legacy[usize::from(parts.suite as u8 - 1)]
                    .get_or_init(|| self.key.cipher(parts.suite));
                let mut key = cipher
                    .decrypt(
                        nonce,
                        Payload {
                            msg: ciphertext,
                            aad: &wrap_aad(parts.header, record_id),
                        },
                    )
                    .map(Zeroizing::new)?;
                Ok(DataKey::from_secret(
                    SecretKey::from_bytes(&mut key)?,
                    parts.suite,
                ))
            }
        }
    }

    /// Whether the suite's wrapping cipher is the one built before (for tests: one cipher
    /// per version, not one per call).
    #[cfg(test)]
    fn kw_address(&self, suite: Suite) -> usize {
        match self.kw(suite) {
            Kw::Aes(kek) => kek as *const _ as usize,
            Kw::Sm4(kek) => kek as *const _ as usize,
        }
    }
}

/// What KW wraps for `dek`: the key, then 16 bytes of the suite's hash of the wrap's header
/// and the record id. KW is a deterministic authenticated encryption of its whole input,
/// so a wrap moved to another record or relabelled fails to unwrap, as it would with
/// associated data. Public for KEK providers that wrap outside this module.
pub fn kw_plaintext(dek: &DataKey, header: &[u8], record_id: &str) -> Zeroizing<Vec<u8>> {
    let mut plaintext = Zeroizing::new(Vec::with_capacity(KEY_LEN + CONTEXT_LEN));
    plaintext.extend_from_slice(dek.key.expose());
    plaintext.extend_from_slice(&wrap_context(dek.suite, header, record_id));
    plaintext
}

/// The data key in a KW-unwrapped `plaintext`, if its context is this header's and record's.
pub fn kw_open(
    mut plaintext: Zeroizing<Vec<u8>>,
    suite: Suite,
    header: &[u8],
    record_id: &str,
) -> Result<DataKey, CryptoError> {
    if plaintext.len() != KEY_LEN + CONTEXT_LEN {
        return Err(CryptoError::Integrity);
    }
    let context = wrap_context(suite, header, record_id);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        &plaintext[KEY_LEN..],
        &context[..],
    )) {
        return Err(CryptoError::Integrity);
    }
    let key = SecretKey::from_bytes(&mut plaintext[..KEY_LEN])?;
    Ok(DataKey::from_secret(key, suite))
}

fn wrap_context(suite: Suite, header: &[u8], record_id: &str) -> [u8; CONTEXT_LEN] {
    let digest = suite.digest(&[b"pdvault.dek.v2", header, record_id.as_bytes()]);
    let mut context = [0u8; CONTEXT_LEN];
    context.copy_from_slice(&digest[..CONTEXT_LEN]);
    context
}

/// The header of a format-2 (KW) wrapped key: format, the data key's suite, KEK id and
/// version. Public for KEK providers that wrap outside this module (a PKCS#11 module).
pub fn wrap_header(suite: Suite, key_id: &str, version: u32) -> Result<Vec<u8>, CryptoError> {
    header_of(FORMAT_V2, suite, key_id, version)
}

/// The header of a format-1 (GCM) wrapped key, for a module that cannot wrap with KW.
pub fn wrap_header_gcm(suite: Suite, key_id: &str, version: u32) -> Result<Vec<u8>, CryptoError> {
    header_of(FORMAT_V1, suite, key_id, version)
}

fn header_of(format: u8, suite: Suite, key_id: &str, version: u32) -> Result<Vec<u8>, CryptoError> {
    let id_len = u8::try_from(key_id.len()).map_err(|_| CryptoError::KeyLength)?;
    let mut header = Vec::with_capacity(3 + key_id.len() + 4 + NONCE_LEN + KEY_LEN + TAG_LEN);
    header.extend_from_slice(&[format, suite as u8, id_len]);
    header.extend_from_slice(key_id.as_bytes());
    header.extend_from_slice(&version.to_be_bytes());
    Ok(header)
}

/// What follows a wrapped key's header, by format.
pub enum WrappedBody<'a> {
    /// Format 1: AES-GCM or SM4-GCM under the raw KEK.
    Gcm {
        nonce: &'a [u8],
        /// The wrapped key followed by the 128-bit tag.
        ciphertext: &'a [u8],
    },
    /// Format 2: KW of the key and its context under the suite KEK.
    Kw(&'a [u8]),
}

/// The parts of a wrapped key, for providers that unwrap outside this module.
pub struct WrappedParts<'a> {
    pub reference: KekRef,
    pub suite: Suite,
    pub header: &'a [u8],
    pub body: WrappedBody<'a>,
}

/// Splits a wrapped key into header and body, checking its layout.
pub fn split_wrapped(wrapped: &[u8]) -> Result<WrappedParts<'_>, CryptoError> {
    let (reference, header_len) = parse_wrap_header(wrapped)?;
    let suite = Suite::from_byte(wrapped[1])?;
    let (header, rest) = wrapped.split_at(header_len);
    let body = match wrapped[0] {
        FORMAT_V1 if rest.len() == NONCE_LEN + KEY_LEN + TAG_LEN => {
            let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
            WrappedBody::Gcm { nonce, ciphertext }
        }
        FORMAT_V2 if rest.len() == KW_WRAPPED_LEN => WrappedBody::Kw(rest),
        _ => return Err(CryptoError::Integrity),
    };
    Ok(WrappedParts {
        reference,
        suite,
        header,
        body,
    })
}

/// Reads which KEK wrapped a data key, and where the header ends.
pub fn parse_wrap_header(wrapped: &[u8]) -> Result<(KekRef, usize), CryptoError> {
    let [format, suite, id_len, rest @ ..] = wrapped else {
        return Err(CryptoError::Integrity);
    };
    if *format != FORMAT_V1 && *format != FORMAT_V2 {
        return Err(CryptoError::Integrity);
    }
    Suite::from_byte(*suite)?;
    let id_len = usize::from(*id_len);
    if rest.len() < id_len + 4 {
        return Err(CryptoError::Integrity);
    }
    let key_id = std::str::from_utf8(&rest[..id_len]).map_err(|_| CryptoError::Integrity)?;
    let version_bytes: [u8; 4] = rest[id_len..id_len + 4]
        .try_into()
        .map_err(|_| CryptoError::Integrity)?;
    Ok((
        KekRef {
            key_id: key_id.to_owned(),
            version: u32::from_be_bytes(version_bytes),
        },
        3 + id_len + 4,
    ))
}

/// The associated data a format-1 (GCM) wrap authenticates: its header and the record.
pub fn wrap_aad(header: &[u8], record_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(12 + header.len() + record_id.len());
    aad.extend_from_slice(b"pdvault.dek");
    aad.extend_from_slice(header);
    aad.extend_from_slice(record_id.as_bytes());
    aad
}

/// The key an index version's age gates are sealed under, per record.
///
/// A single state key per index version would seal every record's age gate, and with
/// random 96-bit nonces one GCM key is safe for 2^32 seals only (SP 800-38D 8.3), which
/// nothing counted. Format 2 seals each record's gate under its own key, HKDF (the index
/// suite's hash) of the version's state key and the record id: each key seals a record's
/// gate a handful of times in its life. Format-1 gates (the version's one AES-256-GCM state
/// key) still open, and the re-index pass re-seals them in format 2.
pub struct StateKey {
    /// HKDF input key: the blind-index key's MAC of the version-2 label.
    base: SecretKey,
    suite: Suite,
    /// The format-1 state key, derived only to open an old gate.
    legacy: SecretKey,
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey(<redacted>)")
    }
}

impl StateKey {
    fn record_key(&self, record_id: &str) -> DataKey {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        self.suite.hkdf(
            b"pdvault.state-key.v2",
            self.base.expose(),
            &[
                b"pdvault.age-gate.v2",
                self.suite.as_str().as_bytes(),
                record_id.as_bytes(),
            ],
            &mut key,
        );
        DataKey::from_secret(SecretKey(key), self.suite)
    }

    /// Seals `plaintext` as `record_id`'s `field` (format 2, the record's own key).
    pub fn seal(
        &self,
        record_id: &str,
        field: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.record_key(record_id).seal_format(
            FORMAT_V2,
            record_id,
            field,
            plaintext,
            &random_nonce()?,
        )
    }

    /// Opens a gate of either format.
    pub fn open(
        &self,
        record_id: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        match sealed.first() {
            Some(&FORMAT_V2) => self
                .record_key(record_id)
                .open_format(FORMAT_V2, record_id, field, sealed),
            Some(&FORMAT_V1) => DataKey::from_secret(self.legacy.clone(), Suite::default())
                .open_field(record_id, field, sealed),
            _ => Err(CryptoError::Integrity),
        }
    }
}

/// Keyed HMAC (SHA-256 or SM3, by suite) used for exact-match lookup without decryption.
/// Its key is separate from every KEK so that index values reveal nothing to someone
/// holding wrapped keys.
#[derive(Debug)]
pub struct BlindIndexKey(SecretKey, Suite);

impl BlindIndexKey {
    pub fn new(key: SecretKey) -> BlindIndexKey {
        BlindIndexKey(key, Suite::default())
    }

    pub fn with_suite(key: SecretKey, suite: Suite) -> BlindIndexKey {
        BlindIndexKey(key, suite)
    }

    /// The same key, MACing with `suite`'s HMAC.
    pub fn for_suite(self, suite: Suite) -> BlindIndexKey {
        BlindIndexKey(self.0, suite)
    }

    /// Index of an identity document; the inputs must already be normalised.
    pub fn document(&self, id_type: &str, id_number: &str) -> Vec<u8> {
        self.compute(&[b"document", id_type.as_bytes(), id_number.as_bytes()])
    }

    /// Index of an E.164 phone number.
    pub fn phone(&self, e164: &str) -> Vec<u8> {
        self.compute(&[b"phone", e164.as_bytes()])
    }

    /// The key that seals account state the login path reads (the age gate). Derived, not
    /// stored, so it lives and rotates with this key, and is domain-separated from indexes;
    /// it uses this key's suite (SM4 and SM3 in an SM4 deployment) and derives one key per
    /// record (see [`StateKey`]).
    #[allow(
        clippy::expect_used,
        reason = "HMAC-SHA-256 and HMAC-SM3 give 32 bytes, a key's length"
    )]
    pub fn derive_state_key(&self) -> StateKey {
        let mut base = self.compute(&[b"pdvault.state-key.v2"]);
        // Format 1 gates: AES-256-GCM under this MAC, whatever the suite.
        let mut legacy = self.compute(&[b"pdvault.state-key.v1"]);
        // Both MACs (HMAC-SHA256, HMAC-SM3) give 32 bytes.
        StateKey {
            base: SecretKey::from_bytes(&mut base).expect("HMAC output is 32 bytes"),
            suite: self.1,
            legacy: SecretKey::from_bytes(&mut legacy).expect("HMAC output is 32 bytes"),
        }
    }

    /// Fingerprint of a create request's content, to tell a genuine retry from a reused
    /// request id without keeping the identity.
    pub fn fingerprint(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(b"create-request");
        all.extend_from_slice(parts);
        self.compute(&all)
    }

    fn compute(&self, parts: &[&[u8]]) -> Vec<u8> {
        mac_parts(self.0.mac(self.1), parts)
    }
}

/// Keyed tokens that stand for a value: stable for the same value and purpose, unlinkable
/// across purposes because the purpose is part of the MAC input.
#[derive(Debug)]
pub struct PseudonymKey(SecretKey, Suite);

impl PseudonymKey {
    pub fn new(key: SecretKey) -> PseudonymKey {
        PseudonymKey(key, Suite::default())
    }

    pub fn with_suite(key: SecretKey, suite: Suite) -> PseudonymKey {
        PseudonymKey(key, suite)
    }

    /// The same key, MACing with `suite`'s HMAC.
    pub fn for_suite(self, suite: Suite) -> PseudonymKey {
        PseudonymKey(self.0, suite)
    }

    pub fn pseudonym(&self, purpose: &str, field: &str, value: &str) -> String {
        let mac = mac_parts(
            self.0.mac(self.1),
            &[
                b"pseudonym",
                purpose.as_bytes(),
                field.as_bytes(),
                value.as_bytes(),
            ],
        );
        // 128 bits are ample for a token that only needs to be collision-free per purpose.
        format!(
            "psn_{}",
            data_encoding::BASE32_NOPAD
                .encode(&mac[..16])
                .to_lowercase()
        )
    }
}

/// Keyed MAC that makes etags: opaque tokens for a record's (id, version), so a writer must
/// have been handed the current etag and cannot guess it from a counter.
#[derive(Debug)]
pub struct EtagKey(SecretKey, Suite);

/// Etags are `etg_` and 26 lowercase base32 characters (128 bits of MAC).
const ETAG_PREFIX: &str = "etg_";
const ETAG_MAC_BYTES: usize = 16;
const ETAG_ENCODED_LEN: usize = 26;

impl EtagKey {
    pub fn new(key: SecretKey, suite: Suite) -> EtagKey {
        EtagKey(key, suite)
    }

    /// The etag of `record_id` at `version`.
    pub fn etag(&self, record_id: &str, version: i64) -> String {
        format!(
            "{ETAG_PREFIX}{}",
            data_encoding::BASE32_NOPAD
                .encode(&self.mac(record_id, version))
                .to_lowercase()
        )
    }

    /// Whether `etag` has the shape of an etag this vault issues (whoever's key made it).
    pub fn well_formed(etag: &str) -> bool {
        etag.strip_prefix(ETAG_PREFIX).is_some_and(|rest| {
            rest.len() == ETAG_ENCODED_LEN
                && rest.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'))
        })
    }

    /// Whether `etag` is the etag of `record_id` at `version`, compared in constant time.
    pub fn matches(&self, etag: &str, record_id: &str, version: i64) -> bool {
        subtle::ConstantTimeEq::ct_eq(etag.as_bytes(), self.etag(record_id, version).as_bytes())
            .into()
    }

    fn mac(&self, record_id: &str, version: i64) -> Vec<u8> {
        let mut mac = mac_parts(
            self.0.mac(self.1),
            &[
                b"pdvault.etag.v1",
                record_id.as_bytes(),
                &version.to_be_bytes(),
            ],
        );
        mac.truncate(ETAG_MAC_BYTES);
        mac
    }
}

/// Ed25519 key that signs audit checkpoints and expiry markers. The signing half zeroises on
/// drop; the verifying half can be published so anyone can check a trail.
pub struct AuditSigningKey(ed25519_dalek::SigningKey);

impl AuditSigningKey {
    pub fn new(seed: SecretKey) -> AuditSigningKey {
        AuditSigningKey(ed25519_dalek::SigningKey::from_bytes(seed.expose()))
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer;
        self.0.sign(message).to_bytes().to_vec()
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.0
            .verifying_key()
            .verify_strict(message, &signature)
            .is_ok()
    }

    /// A key for another purpose derived from this key's seed under `label` (HMAC-SHA-256
    /// of the label keyed with the seed, as HKDF-Expand's first block is): the keyring then
    /// needs no further secret, and the derived key reveals nothing about the signing key.
    #[allow(
        clippy::expect_used,
        reason = "HMAC-SHA-256 gives 32 bytes, a key's length"
    )]
    pub fn derive_key(&self, label: &[u8]) -> SecretKey {
        let seed = Zeroizing::new(self.0.to_bytes());
        let mut derived = mac_parts(
            SecretKey(Zeroizing::new(*seed)).mac(Suite::Aes256GcmHmacSha256),
            &[b"pdvault.derived-key.v1", label],
        );
        SecretKey::from_bytes(&mut derived).expect("HMAC-SHA-256 output is 32 bytes")
    }

    /// The public key, hex-encoded, for publishing next to exported checkpoints.
    pub fn public_key_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(self.0.verifying_key().as_bytes())
    }

    /// The verifying half, which checks signatures without the secret.
    pub fn public_key(&self) -> AuditPublicKey {
        AuditPublicKey(self.0.verifying_key())
    }
}

/// The public half of the audit key: all anyone needs to verify checkpoints and expiry
/// markers, so it can be published and handed to outside verifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditPublicKey(ed25519_dalek::VerifyingKey);

impl AuditPublicKey {
    /// Parses the 64 hex digits `pdvault audit public-key` prints; `None` unless they are an
    /// Ed25519 point.
    pub fn from_hex(text: &str) -> Option<AuditPublicKey> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.trim().as_bytes())
            .ok()?;
        let bytes: [u8; 32] = bytes.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .ok()
            .map(AuditPublicKey)
    }

    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(self.0.as_bytes())
    }

    /// Strict verification: rejects non-canonical signatures and small-order keys.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// A short name of the key, signed into every chained checkpoint, so a verifier holding
    /// another key says so instead of reporting forgeries.
    pub fn key_id(&self) -> String {
        use sha2::Digest;
        let mut hasher = Sha256::new();
        hasher.update(b"pdvault.audit.key-id.v1");
        hasher.update(self.0.as_bytes());
        data_encoding::HEXLOWER.encode(&hasher.finalize()[..8])
    }
}

impl std::fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSigningKey(<redacted>)")
    }
}

/// MACs length-prefixed parts so that ("ab","c") and ("a","bc") never collide.
fn mac_parts(mut mac: Mac256, parts: &[&[u8]]) -> Vec<u8> {
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(version: u32) -> Kek {
        Kek::new("local", version, SecretKey::generate().unwrap())
    }

    #[test]
    fn etags_are_macs_of_record_and_version() {
        let seed = AuditSigningKey::new(SecretKey::generate().unwrap());
        let key = EtagKey::new(seed.derive_key(b"pdvault.etag-key.v1"), Suite::default());
        let etag = key.etag("rec_a", 1);
        assert!(EtagKey::well_formed(&etag), "{etag}");
        assert!(key.matches(&etag, "rec_a", 1));
        assert!(!key.matches(&etag, "rec_a", 2));
        assert!(!key.matches(&etag, "rec_b", 1));
        assert_ne!(key.etag("rec_a", 2), etag);
        // Deterministic for the same key (every instance agrees), different under another.
        let again = EtagKey::new(seed.derive_key(b"pdvault.etag-key.v1"), Suite::default());
        assert_eq!(again.etag("rec_a", 1), etag);
        let other = EtagKey::new(seed.derive_key(b"another label"), Suite::default());
        assert_ne!(other.etag("rec_a", 1), etag);
        let sm3 = EtagKey::new(
            seed.derive_key(b"pdvault.etag-key.v1"),
            Suite::Sm4GcmHmacSm3,
        );
        assert_ne!(sm3.etag("rec_a", 1), etag);
        for malformed in [
            "1",
            "",
            "etg_",
            "etg_AAAAAAAAAAAAAAAAAAAAAAAAAA",
            "etg_aaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!EtagKey::well_formed(malformed), "{malformed}");
        }
    }

    #[test]
    fn field_round_trips() {
        let dek = DataKey::generate().unwrap();
        let sealed = dek.seal_field("r1", "name", "张三".as_bytes()).unwrap();
        let opened = dek.open_field("r1", "name", &sealed).unwrap();
        assert_eq!(opened.as_slice(), "张三".as_bytes());
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let dek = DataKey::generate().unwrap();
        let a = dek.seal_field("r1", "name", b"x").unwrap();
        let b = dek.seal_field("r1", "name", b"x").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn ciphertext_moved_to_another_record_or_field_fails() {
        let dek = DataKey::generate().unwrap();
        let sealed = dek.seal_field("r1", "name", b"x").unwrap();
        assert_eq!(
            dek.open_field("r2", "name", &sealed),
            Err(CryptoError::Integrity)
        );
        assert_eq!(
            dek.open_field("r1", "address", &sealed),
            Err(CryptoError::Integrity)
        );
    }

    #[test]
    fn tampered_or_truncated_ciphertext_fails() {
        let dek = DataKey::generate().unwrap();
        let sealed = dek.seal_field("r1", "name", b"hello").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(dek.open_field("r1", "name", &bad).is_err(), "byte {i}");
        }
        for len in 0..sealed.len() {
            assert!(dek.open_field("r1", "name", &sealed[..len]).is_err());
        }
    }

    #[test]
    fn wrapped_key_round_trips_and_names_its_kek() {
        let kek = kek(3);
        let dek = DataKey::generate().unwrap();
        let sealed = dek.seal_field("r1", "phone", b"+8613812345678").unwrap();
        let wrapped = kek.wrap(&dek, "r1").unwrap();
        let (reference, _) = parse_wrap_header(&wrapped).unwrap();
        assert_eq!(reference, kek.reference());
        let unwrapped = kek.unwrap(&wrapped, "r1").unwrap();
        assert_eq!(
            unwrapped
                .open_field("r1", "phone", &sealed)
                .unwrap()
                .as_slice(),
            b"+8613812345678"
        );
    }

    #[test]
    fn wrapped_key_is_bound_to_its_record() {
        let kek = kek(1);
        let wrapped = kek.wrap(&DataKey::generate().unwrap(), "r1").unwrap();
        assert!(matches!(
            kek.unwrap(&wrapped, "r2"),
            Err(CryptoError::Integrity)
        ));
    }

    /// Recomputes a format-2 wrap from its definition: HKDF of the stored KEK with the
    /// suite's hash and label, then SP 800-38F KW (AES-256 or SM4) of the key and context.
    #[test]
    fn wraps_are_kw_under_a_kek_derived_per_suite() {
        let stored = SecretKey::generate().unwrap();
        let kek = Kek::new("local", 7, stored.clone());
        for suite in Suite::ALL {
            let dek = DataKey::generate_for(suite).unwrap();
            let wrapped = kek.wrap(&dek, "r1").unwrap();
            let parts = split_wrapped(&wrapped).unwrap();
            assert_eq!(wrapped[..2], [FORMAT_V2, suite as u8]);
            let WrappedBody::Kw(body) = parts.body else {
                panic!("format 2 is KW");
            };
            assert_eq!(body.len(), KW_WRAPPED_LEN);
            let info = length_prefixed(&[b"pdvault.kek.v2", suite.kek_label()]);
            let mut plaintext = [0u8; KW_WRAPPED_LEN - aes_kw::IV_LEN];
            match suite {
                Suite::Aes256GcmHmacSha256 => {
                    let mut key = [0u8; 32];
                    hkdf::Hkdf::<Sha256>::new(Some(b"pdvault.kek.v2"), stored.expose())
                        .expand(&info, &mut key)
                        .unwrap();
                    aes_kw::AesKw::<aes::Aes256>::new(&key.into())
                        .unwrap_key(body, &mut plaintext)
                        .unwrap();
                }
                Suite::Sm4GcmHmacSm3 => {
                    let mut key = [0u8; 16];
                    hkdf::Hkdf::<Sm3>::new(Some(b"pdvault.kek.v2"), stored.expose())
                        .expand(&info, &mut key)
                        .unwrap();
                    aes_kw::AesKw::<Sm4>::new(&key.into())
                        .unwrap_key(body, &mut plaintext)
                        .unwrap();
                }
            }
            assert_eq!(&plaintext[..KEY_LEN], dek.secret().expose());
            assert_eq!(
                plaintext[KEY_LEN..],
                wrap_context(suite, parts.header, "r1")
            );
            // The stored KEK itself unwraps nothing: it is never a cipher key.
            assert!(
                aes_kw::AesKw::<aes::Aes256>::new(stored.expose().into())
                    .unwrap_key(body, &mut plaintext)
                    .is_err()
            );
            let unwrapped = kek.unwrap(&wrapped, "r1").unwrap();
            assert_eq!(unwrapped.secret().expose(), dek.secret().expose());
            assert_eq!(unwrapped.suite(), suite);
            // Relabelled to the other suite, or moved to another record: refused.
            let mut relabelled = wrapped.clone();
            relabelled[1] = 3 - relabelled[1];
            assert!(kek.unwrap(&relabelled, "r1").is_err());
            assert_eq!(
                kek.unwrap(&wrapped, "r2").unwrap_err(),
                CryptoError::Integrity
            );
        }
    }

    /// A format-1 wrap (GCM under the raw KEK, as written before format 2) still opens.
    #[test]
    fn format_1_wraps_still_open() {
        let stored = SecretKey::generate().unwrap();
        let kek = Kek::new("local", 2, stored.clone());
        for suite in Suite::ALL {
            let dek = DataKey::generate_for(suite).unwrap();
            let header = wrap_header_gcm(suite, "local", 2).unwrap();
            let nonce = random_nonce().unwrap();
            let sealed = stored
                .cipher(suite)
                .encrypt(
                    &nonce,
                    Payload {
                        msg: dek.secret().expose(),
                        aad: &wrap_aad(&header, "r1"),
                    },
                )
                .unwrap();
            let mut wrapped = header;
            wrapped.extend_from_slice(&nonce);
            wrapped.extend_from_slice(&sealed);
            let unwrapped = kek.unwrap(&wrapped, "r1").unwrap();
            assert_eq!(unwrapped.secret().expose(), dek.secret().expose());
            assert_eq!(unwrapped.suite(), suite);
            assert!(kek.unwrap(&wrapped, "r2").is_err());
        }
    }

    #[test]
    fn each_kek_version_builds_its_wrapping_ciphers_once() {
        let kek = kek(1);
        for suite in Suite::ALL {
            let first = kek.kw_address(suite);
            kek.wrap(&DataKey::generate_for(suite).unwrap(), "r1")
                .unwrap();
            assert_eq!(kek.kw_address(suite), first, "{suite:?}");
        }
        assert_ne!(
            kek.kw_address(Suite::Aes256GcmHmacSha256),
            kek.kw_address(Suite::Sm4GcmHmacSm3)
        );
    }

    /// Compiles only while the key schedules wipe themselves on drop: the `zeroize` features
    /// of `aes` (round keys), of `aes-gcm` (which alone marks a GCM cipher so, and turns on
    /// the wiping of the GHASH/POLYVAL key), of `sha2` and `sm3` (the hash states HMAC and
    /// HKDF key with the padded key), and this crate's SM4.
    #[test]
    fn key_schedules_wipe_themselves_on_drop() {
        fn wipes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wipes_on_drop::<aes::Aes256>();
        wipes_on_drop::<Sm4>();
        wipes_on_drop::<Aes256Gcm>();
        wipes_on_drop::<Sm4Gcm>();
        wipes_on_drop::<<Sha256 as hmac::EagerHash>::Core>();
        wipes_on_drop::<<Sm3 as hmac::EagerHash>::Core>();
    }

    #[test]
    fn wrong_kek_version_is_named() {
        let wrapped = kek(1).wrap(&DataKey::generate().unwrap(), "r1").unwrap();
        assert_eq!(
            kek(2).unwrap(&wrapped, "r1").unwrap_err(),
            CryptoError::UnknownKey {
                key_id: "local".into(),
                version: 1
            }
        );
    }

    #[test]
    fn blind_indexes_are_keyed_and_domain_separated() {
        let a = BlindIndexKey::new(SecretKey::generate().unwrap());
        let b = BlindIndexKey::new(SecretKey::generate().unwrap());
        assert_eq!(a.phone("+8613812345678"), a.phone("+8613812345678"));
        assert_ne!(a.phone("+8613812345678"), b.phone("+8613812345678"));
        assert_ne!(a.document("PASSPORT", "E1"), a.document("PASSPOR", "TE1"));
    }

    #[test]
    fn the_state_key_is_stable_and_distinct_from_record_keys() {
        let index = BlindIndexKey::new(SecretKey::generate().unwrap());
        let sealed = index
            .derive_state_key()
            .seal("r1", "state.date_of_birth", b"2010-01-01")
            .unwrap();
        let opened = index
            .derive_state_key()
            .open("r1", "state.date_of_birth", &sealed)
            .unwrap();
        assert_eq!(opened.as_slice(), b"2010-01-01");
        let other = BlindIndexKey::new(SecretKey::generate().unwrap());
        assert!(
            other
                .derive_state_key()
                .open("r1", "state.date_of_birth", &sealed)
                .is_err()
        );
    }

    #[test]
    fn age_gates_are_sealed_per_record_with_the_index_suite_and_old_ones_open() {
        for suite in Suite::ALL {
            let index = BlindIndexKey::with_suite(SecretKey::generate().unwrap(), suite);
            let state = index.derive_state_key();
            let sealed = state
                .seal("r1", "state.date_of_birth", b"2010-01-01")
                .unwrap();
            assert_eq!(sealed[..2], [FORMAT_V2, suite as u8]);
            // Each record has its own key: nothing seals every record's gate.
            let (a, b) = (state.record_key("r1"), state.record_key("r2"));
            assert_ne!(a.secret().expose(), b.secret().expose());
            assert_eq!(a.suite(), suite);
            assert_eq!(
                state.record_key("r1").secret().expose(),
                a.secret().expose(),
                "stable"
            );
            assert!(state.open("r2", "state.date_of_birth", &sealed).is_err());
            // A format-1 gate: AES-256-GCM under the version's one state key.
            let mut v1 = index.compute(&[b"pdvault.state-key.v1"]);
            let old =
                DataKey::from_secret(SecretKey::from_bytes(&mut v1).unwrap(), Suite::default())
                    .seal_field("r1", "state.date_of_birth", b"2009-12-31")
                    .unwrap();
            assert_eq!(old[0], FORMAT_V1);
            assert_eq!(
                state
                    .open("r1", "state.date_of_birth", &old)
                    .unwrap()
                    .as_slice(),
                b"2009-12-31"
            );
            let mut relabelled = sealed.clone();
            relabelled[0] = FORMAT_V1;
            assert!(
                state
                    .open("r1", "state.date_of_birth", &relabelled)
                    .is_err()
            );
        }
        assert_eq!(
            format!(
                "{:?}",
                BlindIndexKey::new(SecretKey::generate().unwrap()).derive_state_key()
            ),
            "StateKey(<redacted>)"
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_purpose_and_unlinkable_across() {
        let key = PseudonymKey::new(SecretKey::generate().unwrap());
        let p1 = key.pseudonym("audit-research", "name", "张三");
        assert_eq!(p1, key.pseudonym("audit-research", "name", "张三"));
        assert_ne!(p1, key.pseudonym("business-analytics", "name", "张三"));
        assert!(p1.starts_with("psn_") && p1.len() == 4 + 26);
    }

    fn hex(text: &str) -> Vec<u8> {
        data_encoding::HEXUPPER_PERMISSIVE
            .decode(text.as_bytes())
            .unwrap()
    }

    /// RFC 8998, appendix A.1: SM4-GCM.
    #[test]
    fn sm4_gcm_matches_rfc_8998() {
        let cipher = Sm4Gcm::new_from_slice(&hex("0123456789ABCDEFFEDCBA9876543210")).unwrap();
        let nonce = Nonce::try_from(hex("00001234567800000000ABCD").as_slice()).unwrap();
        let aad = hex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
        let plaintext = hex(
            "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD\
             EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
        );
        let expected = hex(
            "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735\
             D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D\
             83DE3541E4C2B58177E065A9BF7B62EC",
        );
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(sealed, expected);
        let opened = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed,
                    aad: &aad,
                },
            )
            .unwrap();
        assert_eq!(opened, plaintext);
    }

    /// GB/T 32905-2016, appendix A: SM3 of "abc" and of "abcd" repeated 16 times.
    #[test]
    fn sm3_matches_gb_t_32905() {
        use sm3::Digest;
        assert_eq!(
            Sm3::digest(b"abc").to_vec(),
            hex("66C7F0F462EEEDD9D1F2D46BDC10E4E24167C4875CF2F7A2297DA02B8F4BA8E0")
        );
        assert_eq!(
            Sm3::digest(b"abcd".repeat(16)).to_vec(),
            hex("DEBE9FF92275B8A138604889C18E5A4D6FDB70E5387E5765293DCBA39C0C5732")
        );
    }

    /// The GCM specification (McGrew and Viega), test cases 14 and 16 (AES-256), which
    /// NIST's GCM validation vectors include: one zero block under a zero key and nonce,
    /// and a partial last block with associated data.
    #[test]
    fn aes_256_gcm_matches_the_gcm_specification() {
        let cipher = Aes256Gcm::new_from_slice(&hex(&"00".repeat(32))).unwrap();
        let sealed = cipher
            .encrypt(&Nonce::from([0u8; 12]), [0u8; 16].as_slice())
            .unwrap();
        assert_eq!(
            sealed,
            hex("CEA7403D4D606B6E074EC5D3BAF39D18D0D1C8A799996BF0265B98B5D48AB919")
        );

        let cipher = Aes256Gcm::new_from_slice(&hex(
            "FEFFE9928665731C6D6A8F9467308308FEFFE9928665731C6D6A8F9467308308",
        ))
        .unwrap();
        let nonce = Nonce::try_from(hex("CAFEBABEFACEDBADDECAF888").as_slice()).unwrap();
        let aad = hex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
        let plaintext = hex(
            "D9313225F88406E5A55909C5AFF5269A86A7A9531534F7DA2E4C303D8A318A72\
             1C3C0C95956809532FCF0E2449A6B525B16AEDF5AA0DE657BA637B39",
        );
        let expected = hex(
            "522DC1F099567D07F47F37A32A84427D643A8CDCBFE5C0C97598A2BD2555D1AA\
             8CB08E48590DBB3DA7B08B1056828838C5F61E6393BA7A0ABCC9F662\
             76FC6ECE0F4E1768CDDF8853BB2D551B",
        );
        let seal = |msg: &[u8]| cipher.encrypt(&nonce, Payload { msg, aad: &aad });
        let open = |msg: &[u8]| cipher.decrypt(&nonce, Payload { msg, aad: &aad });
        let sealed = seal(&plaintext).unwrap();
        assert_eq!(sealed, expected);
        assert_eq!(open(&sealed).unwrap(), plaintext);
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(open(&tampered).is_err());
    }

    /// GM/T 0042-2015, appendix D.3: HMAC-SM3 with a key shorter than the block (32 bytes
    /// over 112 bytes of text) and one of 37 bytes over 50 bytes of 0xCD.
    #[test]
    fn hmac_sm3_matches_gm_t_0042() {
        let mac = |key: &[u8], message: &[u8]| {
            let mut mac = <Hmac<Sm3> as KeyInit>::new_from_slice(key).unwrap();
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        };
        let key: Vec<u8> = (1u8..=0x25).collect();
        assert_eq!(
            mac(
                &key[..32],
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq\
                  abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            ),
            hex("CA05E144ED05D1857840D1F318A4A8669E559FC8391F414485BFDF7BB408963A")
        );
        assert_eq!(
            mac(&key, &[0xCD; 50]),
            hex("220BF579DED555393F0159F66C99877822A3ECF610D1552154B41D44B94DB3AE")
        );
    }

    #[test]
    fn sm4_suite_round_trips_and_names_itself() {
        let kek = kek(1);
        let dek = DataKey::generate_for(Suite::Sm4GcmHmacSm3).unwrap();
        let sealed = dek.seal_field("r1", "name", "张三".as_bytes()).unwrap();
        assert_eq!(sealed[1], Suite::Sm4GcmHmacSm3 as u8);
        let wrapped = kek.wrap(&dek, "r1").unwrap();
        assert_eq!(wrapped[1], Suite::Sm4GcmHmacSm3 as u8);
        let unwrapped = kek.unwrap(&wrapped, "r1").unwrap();
        assert_eq!(unwrapped.suite(), Suite::Sm4GcmHmacSm3);
        assert_eq!(
            unwrapped
                .open_field("r1", "name", &sealed)
                .unwrap()
                .as_slice(),
            "张三".as_bytes()
        );
        // The suite byte is authenticated: relabelling a field fails closed.
        let mut relabelled = sealed.clone();
        relabelled[1] = Suite::Aes256GcmHmacSha256 as u8;
        assert!(unwrapped.open_field("r1", "name", &relabelled).is_err());
    }

    #[test]
    fn blind_indexes_differ_by_suite() {
        let key = SecretKey::generate().unwrap();
        let sha = BlindIndexKey::with_suite(key.clone(), Suite::Aes256GcmHmacSha256);
        let sm3 = BlindIndexKey::with_suite(key, Suite::Sm4GcmHmacSm3);
        assert_ne!(sha.phone("+8613812345678"), sm3.phone("+8613812345678"));
        assert_eq!(sm3.phone("+8613812345678").len(), 32);
    }

    #[test]
    fn suites_parse_by_their_configured_names() {
        for suite in Suite::ALL {
            assert_eq!(Suite::parse(suite.as_str()), Some(suite));
        }
        assert_eq!(Suite::parse("sm4"), None);
    }

    #[test]
    fn audit_signatures_verify_and_reject_changes() {
        let key = AuditSigningKey::new(SecretKey::generate().unwrap());
        let signature = key.sign(b"checkpoint");
        assert!(key.verify(b"checkpoint", &signature));
        assert!(!key.verify(b"checkpoinT", &signature));
        assert!(!key.verify(b"checkpoint", &signature[1..]));
        let other = AuditSigningKey::new(SecretKey::generate().unwrap());
        assert!(!other.verify(b"checkpoint", &signature));
        assert_eq!(format!("{key:?}"), "AuditSigningKey(<redacted>)");
    }

    #[test]
    fn the_public_key_alone_verifies_and_round_trips_through_hex() {
        let key = AuditSigningKey::new(SecretKey::generate().unwrap());
        let signature = key.sign(b"checkpoint");
        let public = AuditPublicKey::from_hex(&key.public_key_hex()).unwrap();
        assert_eq!(public, key.public_key());
        assert!(public.verify(b"checkpoint", &signature));
        assert!(!public.verify(b"checkpoinT", &signature));
        assert_eq!(public.key_id().len(), 16);
        let other = AuditSigningKey::new(SecretKey::generate().unwrap()).public_key();
        assert_ne!(public.key_id(), other.key_id());
        assert!(!other.verify(b"checkpoint", &signature));
        assert_eq!(AuditPublicKey::from_hex("abcd"), None);
        assert_eq!(AuditPublicKey::from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn debug_never_prints_key_material() {
        let key = SecretKey::generate().unwrap();
        let kek = Kek::new("local", 1, key.clone());
        kek.wrap(&DataKey::generate().unwrap(), "r1").unwrap();
        let printed = format!("{key:?} {kek:?}");
        assert!(printed.contains("<redacted>"));
        let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!printed.contains(&hex));
    }
}
