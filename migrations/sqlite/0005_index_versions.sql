-- Blind-index key versions. Each record names the index version its blind indexes were
-- computed with, and under whose derived state key its age gate is sealed; rows written
-- before index keys had versions used the one key there was, version 1. The rewrap job
-- re-computes both for records under an older version (see src/reindex.rs).
ALTER TABLE records ADD COLUMN index_version INTEGER NOT NULL DEFAULT 1;
CREATE INDEX records_index_version_id ON records (index_version, record_id)
    WHERE deleted_at IS NULL;

-- Index-key administration (rotate, retire, destroy) takes turns like the KEK's.
INSERT INTO key_admin_locks (key_kind) VALUES ('index') ON CONFLICT DO NOTHING;

-- The re-index pass of a rewrap job reports beside the KEK pass.
ALTER TABLE rewrap_jobs ADD COLUMN target_index_version INTEGER;
ALTER TABLE rewrap_jobs ADD COLUMN reindexed INTEGER NOT NULL DEFAULT 0;
