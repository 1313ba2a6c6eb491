//! Re-indexing one record under a new index version: the part of the rewrap job that
//! decrypts, and therefore runs inside the vault only.
//!
//! It owns the per-record computation the re-index pass of the rewrap job (`rewrap.rs`) applies to
//! each record still under an older index version: unwrap the record's data key, open the
//! fields blind indexes are computed from (`id_type`, `id_number`, `phone`), MAC them under
//! the target version's blind-index key, and move the age gate from the old version's state
//! key to the target's (see `crate::vault::accounts` on why the state key follows the index
//! version). The store writes the result with a compare-and-swap on the record's version
//! and index version, so a record changed meanwhile keeps what its writer gave it.
//!
//! Identity text is brought to Unicode NFC before it is MACed, as the create path does since
//! identity text is normalised: re-indexing (rotate the index key, then rewrap) is how
//! records stored before that become findable under every equivalent spelling.
//!
//! Plaintext exists only in `Zeroizing` buffers for the length of one record, and never
//! reaches a log line or an error: failures are logged with the record id and the error's
//! kind, and the record is left for the next run.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto::{CryptoError, StateKey};
use crate::domain::FieldName;
use crate::keys::{IndexKeyPair, KeyError, KeyManager};
use crate::store::{ReindexRow, Reindexed};
use crate::vault::accounts::AGE_GATE_FIELD;

/// The closure a re-index batch applies to each record, aiming at index version `target`.
pub fn reindexer(
    keys: &KeyManager,
    target: u32,
) -> Result<impl Fn(&ReindexRow) -> Option<Reindexed> + Send + Sync + '_, KeyError> {
    let to = keys.index_keys(target)?;
    let to_state = to.blind_index.derive_state_key();
    Ok(
        move |row: &ReindexRow| match reindex_record(keys, &to, &to_state, row) {
            Ok(done) => Some(done),
            Err(error) => {
                tracing::error!(
                    %error,
                    record_id = row.record_id,
                    "cannot re-index a record; it stays under its index version"
                );
                None
            }
        },
    )
}

fn reindex_record(
    keys: &KeyManager,
    to: &Arc<IndexKeyPair>,
    to_state: &StateKey,
    row: &ReindexRow,
) -> Result<Reindexed, KeyError> {
    let age_gate = match &row.age_gate {
        Some(gate) => {
            let from_state = keys
                .index_keys(row.index_version)?
                .blind_index
                .derive_state_key();
            let birth = from_state.open(&row.record_id, AGE_GATE_FIELD, gate)?;
            Some(to_state.seal(&row.record_id, AGE_GATE_FIELD, &birth)?)
        }
        None => None,
    };
    if row.fields.is_empty() {
        return Ok(Reindexed {
            document_index: None,
            phone_index: None,
            age_gate,
        });
    }
    let dek = keys.unwrap_cached_state(&row.wrapped_key, &row.record_id)?;
    let open = |field: FieldName| -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        row.fields
            .iter()
            .find(|sealed| sealed.field == field.as_str())
            .map(|sealed| dek.open_field(&row.record_id, &sealed.field, &sealed.ciphertext))
            .transpose()
            .map_err(KeyError::from)
    };
    let text = |bytes: &Zeroizing<Vec<u8>>| -> Result<String, KeyError> {
        // Stored values were canonical UTF-8 when sealed; anything else is corruption. In
        // NFC, as new values are: a record stored before identity text was normalised is
        // indexed like its equivalent spellings from its next re-index on.
        std::str::from_utf8(bytes)
            .map(|text| crate::domain::nfc(text).into_owned())
            .map_err(|_| KeyError::Crypto(CryptoError::Integrity))
    };
    let id_type = open(FieldName::IdType)?;
    let id_number = open(FieldName::IdNumber)?;
    let phone = open(FieldName::Phone)?;
    let document_index = match (&id_type, &id_number) {
        (Some(id_type), Some(id_number)) => {
            let id_type = Zeroizing::new(text(id_type)?);
            let id_number = Zeroizing::new(text(id_number)?);
            Some(to.blind_index.document(&id_type, &id_number))
        }
        _ => None,
    };
    let phone_index = match &phone {
        Some(phone) => Some(to.blind_index.phone(&Zeroizing::new(text(phone)?))),
        None => None,
    };
    Ok(Reindexed {
        document_index,
        phone_index,
        age_gate,
    })
}
