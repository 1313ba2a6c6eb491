-- Chained checkpoints (format 2). Each names the instance that signed it (signer_id), its
-- place in that signer's chain of checkpoints (counter, from 1), the audit key's id, the
-- previous checkpoint's hash and the chains it closes (a JSON array of chain ids). Rows
-- written before keep format 1 and NULLs, and are verified as they were signed.
ALTER TABLE audit_checkpoints ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
ALTER TABLE audit_checkpoints ADD COLUMN signer_id TEXT;
ALTER TABLE audit_checkpoints ADD COLUMN counter INTEGER;
ALTER TABLE audit_checkpoints ADD COLUMN key_id TEXT;
ALTER TABLE audit_checkpoints ADD COLUMN prev_hash BLOB;
ALTER TABLE audit_checkpoints ADD COLUMN closed TEXT;
-- One checkpoint per place in a signer's chain; also how a signer finds its newest.
CREATE UNIQUE INDEX audit_checkpoints_signer_counter ON audit_checkpoints (signer_id, counter);
