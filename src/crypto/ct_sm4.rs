//! SM4 (GB/T 32907-2016) with a constant-time S-box, as the block cipher under SM4-GCM and
//! SM4-KWP.
//!
//! The `sm4` crate reads its S-box from a table indexed by key- and data-dependent bytes,
//! and says it was not assessed for constant time: the cache lines it touches depend on the
//! key. Here every S-box evaluation reads the whole table (32 words of 8 entries) and keeps
//! the one entry it wants with a mask computed without branches or secret-dependent
//! addresses, so the memory access pattern and the instruction sequence are the same for
//! every input. The rest of SM4 (XOR, rotations, the key schedule's constants) touches no
//! memory by secret index. The price is speed (about 32 word operations per S-box instead of
//! one load), paid on short identity fields and 48-byte key wraps only.
//!
//! It implements the RustCrypto `cipher` (0.5) block traits, so `aes_gcm::AesGcm` and
//! `aes_kw::AesKw` compose it as they compose AES. Round keys are wiped on drop. Checked against the
//! standard's example and the `sm4` crate on random inputs (tests below), and through
//! SM4-GCM against RFC 8998 (`crypto` tests).

use cipher::consts::{U1, U16};
use cipher::{
    AlgorithmName, Block, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt,
    BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, InOut, Key,
    KeyInit, KeySizeUser, ParBlocksSizeUser,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The S-box of GB/T 32907-2016, section 6.2, by input byte.
const SBOX: [u8; 256] = [
    0xd6, 0x90, 0xe9, 0xfe, 0xcc, 0xe1, 0x3d, 0xb7, 0x16, 0xb6, 0x14, 0xc2, 0x28, 0xfb, 0x2c, 0x05,
    0x2b, 0x67, 0x9a, 0x76, 0x2a, 0xbe, 0x04, 0xc3, 0xaa, 0x44, 0x13, 0x26, 0x49, 0x86, 0x06, 0x99,
    0x9c, 0x42, 0x50, 0xf4, 0x91, 0xef, 0x98, 0x7a, 0x33, 0x54, 0x0b, 0x43, 0xed, 0xcf, 0xac, 0x62,
    0xe4, 0xb3, 0x1c, 0xa9, 0xc9, 0x08, 0xe8, 0x95, 0x80, 0xdf, 0x94, 0xfa, 0x75, 0x8f, 0x3f, 0xa6,
    0x47, 0x07, 0xa7, 0xfc, 0xf3, 0x73, 0x17, 0xba, 0x83, 0x59, 0x3c, 0x19, 0xe6, 0x85, 0x4f, 0xa8,
    0x68, 0x6b, 0x81, 0xb2, 0x71, 0x64, 0xda, 0x8b, 0xf8, 0xeb, 0x0f, 0x4b, 0x70, 0x56, 0x9d, 0x35,
    0x1e, 0x24, 0x0e, 0x5e, 0x63, 0x58, 0xd1, 0xa2, 0x25, 0x22, 0x7c, 0x3b, 0x01, 0x21, 0x78, 0x87,
    0xd4, 0x00, 0x46, 0x57, 0x9f, 0xd3, 0x27, 0x52, 0x4c, 0x36, 0x02, 0xe7, 0xa0, 0xc4, 0xc8, 0x9e,
    0xea, 0xbf, 0x8a, 0xd2, 0x40, 0xc7, 0x38, 0xb5, 0xa3, 0xf7, 0xf2, 0xce, 0xf9, 0x61, 0x15, 0xa1,
    0xe0, 0xae, 0x5d, 0xa4, 0x9b, 0x34, 0x1a, 0x55, 0xad, 0x93, 0x32, 0x30, 0xf5, 0x8c, 0xb1, 0xe3,
    0x1d, 0xf6, 0xe2, 0x2e, 0x82, 0x66, 0xca, 0x60, 0xc0, 0x29, 0x23, 0xab, 0x0d, 0x53, 0x4e, 0x6f,
    0xd5, 0xdb, 0x37, 0x45, 0xde, 0xfd, 0x8e, 0x2f, 0x03, 0xff, 0x6a, 0x72, 0x6d, 0x6c, 0x5b, 0x51,
    0x8d, 0x1b, 0xaf, 0x92, 0xbb, 0xdd, 0xbc, 0x7f, 0x11, 0xd9, 0x5c, 0x41, 0x1f, 0x10, 0x5a, 0xd8,
    0x0a, 0xc1, 0x31, 0x88, 0xa5, 0xcd, 0x7b, 0xbd, 0x2d, 0x74, 0xd0, 0x12, 0xb8, 0xe5, 0xb4, 0xb0,
    0x89, 0x69, 0x97, 0x4a, 0x0c, 0x96, 0x77, 0x7e, 0x65, 0xb9, 0xf1, 0x09, 0xc5, 0x6e, 0xc6, 0x84,
    0x18, 0xf0, 0x7d, 0xec, 0x3a, 0xdc, 0x4d, 0x20, 0x79, 0xee, 0x5f, 0x3e, 0xd7, 0xcb, 0x39, 0x48,
];

const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];

/// `CK[i]`: bytes `(4i + j) * 7 mod 256` for j = 0..4 (section 7.3).
const CK: [u32; 32] = {
    let mut ck = [0u32; 32];
    let mut i = 0;
    while i < 32 {
        let mut word = 0u32;
        let mut j = 0;
        while j < 4 {
            word = (word << 8) | (((4 * i + j) * 7) % 256) as u32;
            j += 1;
        }
        ck[i] = word;
        i += 1;
    }
    ck
};

/// The S-box as 32 little-endian words of 8 entries, and the matching input bytes.
const SBOX_WORDS: [u64; 32] = {
    let mut words = [0u64; 32];
    let mut i = 0;
    while i < 256 {
        words[i / 8] |= (SBOX[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    words
};
const INDEX_WORDS: [u64; 32] = {
    let mut words = [0u64; 32];
    let mut i = 0;
    while i < 256 {
        words[i / 8] |= (i as u64) << (8 * (i % 8));
        i += 1;
    }
    words
};

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// `SBOX[x]`, reading every entry: per word of 8 entries, the byte equal to `x` becomes a
/// 0xff mask (a zero-byte test without carries between bytes) that keeps its entry.
fn sbox(x: u8) -> u8 {
    let wanted = u64::from(x) * 0x0101_0101_0101_0101;
    let mut found = 0u64;
    for (entries, indexes) in SBOX_WORDS.iter().zip(INDEX_WORDS.iter()) {
        let diff = wanted ^ indexes;
        // High bit of a byte set iff that byte of `diff` is non-zero.
        let non_zero = ((diff & LOW7) + LOW7) | diff;
        let matched = !non_zero & HIGH;
        found |= entries & ((matched >> 7) * 0xff);
    }
    let found = found | (found >> 32);
    let found = found | (found >> 16);
    (found | (found >> 8)) as u8
}

fn tau(word: u32) -> u32 {
    let [a, b, c, d] = word.to_be_bytes();
    u32::from_be_bytes([sbox(a), sbox(b), sbox(c), sbox(d)])
}

fn round(word: u32) -> u32 {
    let b = tau(word);
    b ^ b.rotate_left(2) ^ b.rotate_left(10) ^ b.rotate_left(18) ^ b.rotate_left(24)
}

fn key_round(word: u32) -> u32 {
    let b = tau(word);
    b ^ b.rotate_left(13) ^ b.rotate_left(23)
}

/// SM4 with the constant-time S-box. Round keys are wiped on drop.
#[derive(Clone)]
pub struct Sm4 {
    rk: [u32; 32],
}

impl KeySizeUser for Sm4 {
    type KeySize = U16;
}

fn words(bytes: &[u8]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    out
}

impl KeyInit for Sm4 {
    fn new(key: &Key<Self>) -> Self {
        let mut k = words(key);
        for (k, fk) in k.iter_mut().zip(FK) {
            *k ^= fk;
        }
        let mut rk = [0u32; 32];
        for i in 0..32 {
            let next =
                k[i % 4] ^ key_round(k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ CK[i]);
            k[i % 4] = next;
            rk[i] = next;
        }
        k.zeroize();
        Sm4 { rk }
    }
}

impl Sm4 {
    fn crypt(&self, input: &[u8], output: &mut [u8], decrypt: bool) {
        let mut x = words(input);
        for i in 0..32 {
            let rk = if decrypt { self.rk[31 - i] } else { self.rk[i] };
            x[i % 4] ^= round(x[(i + 1) % 4] ^ x[(i + 2) % 4] ^ x[(i + 3) % 4] ^ rk);
        }
        for (chunk, word) in output.chunks_exact_mut(4).zip(x.iter().rev()) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        x.zeroize();
    }
}

impl std::fmt::Debug for Sm4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sm4(<redacted>)")
    }
}

impl AlgorithmName for Sm4 {
    fn write_alg_name(f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sm4")
    }
}

impl Drop for Sm4 {
    fn drop(&mut self) {
        self.rk.zeroize();
    }
}

impl ZeroizeOnDrop for Sm4 {}

impl BlockSizeUser for Sm4 {
    type BlockSize = U16;
}

// One block at a time: the constant-time S-box leaves nothing for a parallel backend to share.
impl ParBlocksSizeUser for Sm4 {
    type ParBlocksSize = U1;
}

// The cipher is its own backend for both directions, as the `sm4` crate's is.
impl BlockCipherEncrypt for Sm4 {
    fn encrypt_with_backend(&self, f: impl BlockCipherEncClosure<BlockSize = Self::BlockSize>) {
        f.call(self)
    }
}

impl BlockCipherEncBackend for Sm4 {
    fn encrypt_block(&self, mut block: InOut<'_, '_, Block<Self>>) {
        // Copied out first: input and output may be the same block.
        let input = *block.get_in();
        self.crypt(&input, block.get_out(), false);
    }
}

impl BlockCipherDecrypt for Sm4 {
    fn decrypt_with_backend(&self, f: impl BlockCipherDecClosure<BlockSize = Self::BlockSize>) {
        f.call(self)
    }
}

impl BlockCipherDecBackend for Sm4 {
    fn decrypt_block(&self, mut block: InOut<'_, '_, Block<Self>>) {
        let input = *block.get_in();
        self.crypt(&input, block.get_out(), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::Array;

    fn hex(text: &str) -> Vec<u8> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .unwrap()
    }

    #[test]
    fn the_sbox_reads_like_the_table() {
        for x in 0..=255u8 {
            assert_eq!(sbox(x), SBOX[usize::from(x)], "{x}");
        }
    }

    /// GB/T 32907-2016, appendix A, example 1: key and plaintext 0123456789abcdeffedcba9876543210.
    #[test]
    fn matches_the_standards_example() {
        let key = hex("0123456789abcdeffedcba9876543210");
        let cipher = Sm4::new(&Array::try_from(key.as_slice()).unwrap());
        let mut block = Array::try_from(key.as_slice()).unwrap();
        BlockCipherEncrypt::encrypt_block(&cipher, &mut block);
        assert_eq!(block.to_vec(), hex("681edf34d206965e86b3e94f536e4246"));
        BlockCipherDecrypt::decrypt_block(&cipher, &mut block);
        assert_eq!(block.to_vec(), key);
    }

    #[test]
    fn agrees_with_the_sm4_crate_on_random_inputs() {
        for _ in 0..200 {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).unwrap();
            let (key, plaintext) = bytes.split_at(16);
            let key = Array::try_from(key).unwrap();
            let ours = Sm4::new(&key);
            let reference = <::sm4::Sm4 as KeyInit>::new(&key);
            let mut a: Block<Sm4> = Array::try_from(plaintext).unwrap();
            let mut b = a;
            BlockCipherEncrypt::encrypt_block(&ours, &mut a);
            BlockCipherEncrypt::encrypt_block(&reference, &mut b);
            assert_eq!(a, b);
            BlockCipherDecrypt::decrypt_block(&ours, &mut a);
            assert_eq!(a.as_slice(), plaintext);
        }
    }

    #[test]
    fn debug_is_redacted_and_round_keys_are_wiped_on_drop() {
        fn wipes_on_drop<T: ZeroizeOnDrop>() {}
        wipes_on_drop::<Sm4>();
        let cipher = Sm4::new(&Array::from([7u8; 16]));
        assert_eq!(format!("{cipher:?}"), "Sm4(<redacted>)");
    }
}
