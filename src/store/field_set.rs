//! A record's sealed fields as ONE stored value: the `fields` column of `sealed_fields`,
//! one row per live record, on both backends.
//!
//! Why one row and not a row per field: a create wrote eleven rows (the record's and ten
//! fields'), each a B-tree insert repeating the 36-byte record id, and a read gathered ten
//! rows back; the field rows were a third of the SQLite writer's time in a batch create
//! (BENCHMARKS.md, "Batch create, round 4"). Each field is still sealed on its own, under
//! the record's data key with the record id and the field's name bound in (crypto), so a
//! value moved between records or fields still fails to open: this module only frames the
//! ciphertexts, it never sees plaintext.
//!
//! Format, version 1: the byte `0x01`, then each field in byte order of its name: the
//! name's length (1 byte), the name (ASCII), the ciphertext's length (4 bytes, big-endian),
//! the ciphertext. Migration 0012 builds the same bytes in SQL from the old rows on each
//! backend; the store's tests decode what it builds.

use super::{SealedField, StoreError};

const VERSION: u8 = 1;

/// The one value stored for `fields`, in name order whatever their order here. `Err` on
/// an empty or over-long name or a repeated one (the vault never makes either): a set that
/// would not decode to what was given is never written.
pub(crate) fn encode(fields: &[SealedField]) -> Result<Vec<u8>, StoreError> {
    let mut sorted: Vec<&SealedField> = fields.iter().collect();
    sorted.sort_unstable_by(|a, b| a.field.as_bytes().cmp(b.field.as_bytes()));
    let size = 1 + sorted
        .iter()
        .map(|field| 5 + field.field.len() + field.ciphertext.len())
        .sum::<usize>();
    let mut encoded = Vec::with_capacity(size);
    encoded.push(VERSION);
    for (i, field) in sorted.iter().enumerate() {
        let name = field.field.as_bytes();
        let name_len = u8::try_from(name.len())
            .ok()
            .filter(|len| *len > 0 && name.is_ascii())
            .ok_or_else(|| invalid("a field name is empty, too long or not ASCII"))?;
        if i > 0 && sorted[i - 1].field == field.field {
            return Err(invalid("a field is named twice"));
        }
        let ciphertext_len = u32::try_from(field.ciphertext.len())
            .map_err(|_| invalid("a ciphertext is longer than 4 GiB"))?;
        encoded.push(name_len);
        encoded.extend_from_slice(name);
        encoded.extend_from_slice(&ciphertext_len.to_be_bytes());
        encoded.extend_from_slice(&field.ciphertext);
    }
    Ok(encoded)
}

/// The fields of a stored set that `keep` accepts, in name order. A set that does not
/// parse is `Corrupt`, and the error names the column and the reason, never a byte of it.
pub(crate) fn decode(
    encoded: &[u8],
    mut keep: impl FnMut(&str) -> bool,
) -> Result<Vec<SealedField>, StoreError> {
    let mut fields = Vec::new();
    walk(encoded, |name, ciphertext| {
        if keep(name) {
            fields.push(SealedField {
                field: name.to_owned(),
                ciphertext: ciphertext.to_vec(),
            });
        }
    })?;
    Ok(fields)
}

/// The names of a stored set's fields, in name order; no ciphertext is copied.
pub(crate) fn names(encoded: &[u8]) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    walk(encoded, |name, _| names.push(name.to_owned()))?;
    Ok(names)
}

fn walk(encoded: &[u8], mut each: impl FnMut(&str, &[u8])) -> Result<(), StoreError> {
    let Some((&version, mut rest)) = encoded.split_first() else {
        return Err(corrupt("empty"));
    };
    if version != VERSION {
        return Err(corrupt("unknown format version"));
    }
    let mut previous: Option<&str> = None;
    while let Some((&name_len, after)) = rest.split_first() {
        let (name, after) = split(after, usize::from(name_len))?;
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|name| !name.is_empty() && name.is_ascii())
            .ok_or_else(|| corrupt("a field name is empty or not ASCII"))?;
        if previous.is_some_and(|previous| previous.as_bytes() >= name.as_bytes()) {
            return Err(corrupt("field names out of order or repeated"));
        }
        let (len, after) = split(after, 4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        let len = usize::try_from(len).map_err(|_| corrupt("a ciphertext length overflows"))?;
        let (ciphertext, after) = split(after, len)?;
        each(name, ciphertext);
        previous = Some(name);
        rest = after;
    }
    Ok(())
}

fn split(bytes: &[u8], at: usize) -> Result<(&[u8], &[u8]), StoreError> {
    if bytes.len() < at {
        return Err(corrupt("truncated"));
    }
    Ok(bytes.split_at(at))
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt(format!("column fields: {reason}"))
}

fn invalid(reason: &str) -> StoreError {
    StoreError::Corrupt(format!("sealed fields not stored: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, ciphertext: &[u8]) -> SealedField {
        SealedField {
            field: name.to_owned(),
            ciphertext: ciphertext.to_vec(),
        }
    }

    #[test]
    fn fields_come_back_in_name_order_with_their_ciphertexts() {
        let given = [
            field("phone", &[7; 40]),
            field("id_type", &[]),
            field("address", &[0, 1, 2, 255]),
            field("id_number", &[9; 300]),
        ];
        let encoded = encode(&given).unwrap();
        let decoded = decode(&encoded, |_| true).unwrap();
        let names: Vec<&str> = decoded.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["address", "id_number", "id_type", "phone"]);
        for field in &given {
            let back = decoded.iter().find(|f| f.field == field.field).unwrap();
            assert_eq!(back.ciphertext, field.ciphertext);
        }
        assert_eq!(
            names_of(&encoded),
            ["address", "id_number", "id_type", "phone"]
        );
    }

    fn names_of(encoded: &[u8]) -> Vec<String> {
        names(encoded).unwrap()
    }

    #[test]
    fn the_format_is_the_documented_one() {
        // What migration 0012 builds in SQL: version, then name length, name, big-endian
        // ciphertext length, ciphertext, per field in name order.
        let encoded = encode(&[field("name", b"xy"), field("gender", b"z")]).unwrap();
        let mut expected = vec![1u8, 6];
        expected.extend_from_slice(b"gender");
        expected.extend_from_slice(&[0, 0, 0, 1, b'z', 4]);
        expected.extend_from_slice(b"name");
        expected.extend_from_slice(&[0, 0, 0, 2, b'x', b'y']);
        assert_eq!(encoded, expected);
    }

    #[test]
    fn only_the_kept_fields_are_decoded() {
        let encoded = encode(&[
            field("name", b"a"),
            field("phone", b"b"),
            field("email", b"c"),
        ])
        .unwrap();
        let kept = decode(&encoded, |name| name == "phone" || name == "name").unwrap();
        let names: Vec<&str> = kept.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, ["name", "phone"]);
        assert!(decode(&encoded, |_| false).unwrap().is_empty());
    }

    #[test]
    fn an_empty_set_is_the_version_byte_alone() {
        let encoded = encode(&[]).unwrap();
        assert_eq!(encoded, [1]);
        assert!(decode(&encoded, |_| true).unwrap().is_empty());
    }

    #[test]
    fn a_set_that_would_not_decode_is_not_written() {
        assert!(encode(&[field("name", b"a"), field("name", b"b")]).is_err());
        assert!(encode(&[field("", b"a")]).is_err());
        assert!(encode(&[field(&"x".repeat(256), b"a")]).is_err());
        assert!(encode(&[field("名", b"a")]).is_err());
    }

    #[test]
    fn damaged_sets_are_corrupt_and_the_error_shows_no_byte_of_them() {
        let encoded = encode(&[field("name", b"secret-ciphertext"), field("phone", b"p")]).unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![2],
            encoded[..encoded.len() - 1].to_vec(),
            encoded[..4].to_vec(),
        ];
        // Out of order: phone before name.
        let mut swapped = vec![1u8];
        swapped.extend_from_slice(&encoded[1 + 1 + 4 + 4 + 17..]);
        swapped.extend_from_slice(&encoded[1..1 + 1 + 4 + 4 + 17]);
        cases.push(swapped);
        // A name byte that is not ASCII.
        let mut not_ascii = encoded.clone();
        not_ascii[2] = 0xff;
        cases.push(not_ascii);
        for case in cases {
            let error = decode(&case, |_| true).unwrap_err().to_string();
            assert!(error.contains("column fields"), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
