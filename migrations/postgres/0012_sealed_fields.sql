-- A record's sealed fields in ONE row (issue 14): a create wrote a row per field, and a read
-- gathered them back. `fields` is the format of `src/store/field_set.rs` (version 1): the
-- byte 01, then per field in byte order of its name: name length (1 byte), name, ciphertext
-- length (4 bytes, big-endian), ciphertext. The ciphertexts move unchanged: each stays
-- sealed with its record id and field name bound in. A record without fields (deleted
-- ones) has no row.
CREATE TABLE sealed_fields (
    record_id TEXT PRIMARY KEY REFERENCES records (record_id),
    fields    BYTEA NOT NULL
);
INSERT INTO sealed_fields (record_id, fields)
SELECT record_id, '\x01'::bytea || string_agg(
        set_byte('\x00'::bytea, 0, octet_length(convert_to(field, 'UTF8')))
        || convert_to(field, 'UTF8')
        || int4send(octet_length(ciphertext)) || ciphertext,
        ''::bytea ORDER BY field COLLATE "C")
FROM record_fields GROUP BY record_id;
DROP TABLE record_fields;
