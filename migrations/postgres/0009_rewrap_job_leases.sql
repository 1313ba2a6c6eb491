-- A rewrap job names its owner, the instance (its checkpoint signer id) and the process (its
-- audit chain id), and holds a lease the owner renews while the job runs. A RUNNING job whose
-- lease ran out, or whose instance has restarted since, is marked INTERRUPTED by whichever
-- instance sees it first, so a job whose server died does not show RUNNING forever. Jobs
-- from before this migration have no lease; their last progress (updated_at) stands for it.
ALTER TABLE rewrap_jobs ADD COLUMN owner_instance TEXT;
ALTER TABLE rewrap_jobs ADD COLUMN owner_process TEXT;
ALTER TABLE rewrap_jobs ADD COLUMN lease_until BIGINT;
