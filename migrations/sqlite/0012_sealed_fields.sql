-- A record's sealed fields in ONE row (issue 14): a create wrote a row per field, ten B-tree
-- inserts each repeating the record id, and a read gathered ten rows back. `fields` is the
-- format of `src/store/field_set.rs` (version 1): the byte 01, then per field in byte order
-- of its name: name length (1 byte), name, ciphertext length (4 bytes, big-endian),
-- ciphertext. The ciphertexts move unchanged: each stays sealed with its record id and
-- field name bound in. A record without fields (deleted ones) has no row.
CREATE TABLE sealed_fields (
    record_id TEXT PRIMARY KEY NOT NULL REFERENCES records (record_id),
    fields    BLOB NOT NULL
) WITHOUT ROWID;
INSERT INTO sealed_fields (record_id, fields)
SELECT record_id, unhex('01' || group_concat(
        printf('%02X', length(CAST(field AS BLOB))) || hex(field)
        || printf('%08X', length(ciphertext)) || hex(ciphertext), '' ORDER BY field))
FROM record_fields GROUP BY record_id ORDER BY record_id;
DROP TABLE record_fields;
