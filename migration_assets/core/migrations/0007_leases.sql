-- One lease for every work table (core/lease.py): a claim token and an expiry in PostgreSQL time.
-- A row is free when claim_token is NULL, or taken over by anyone once lease_expires_at has passed.

-- repos: a run's claim was `in_progress` + claimed_at, taken over after REPO_STALE_CLAIM_MINUTES; now
-- it is leased. claimed_at stays as the time the current run claimed the repo (status, operators).
ALTER TABLE repos ADD COLUMN claim_token uuid, ADD COLUMN lease_expires_at timestamptz;
-- A claim left by a run before this migration expires at once: the next run takes it.
UPDATE repos SET claim_token = gen_random_uuid(), lease_expires_at = now() WHERE status = 'in_progress';
CREATE INDEX repos_leased ON repos (claim_token) WHERE claim_token IS NOT NULL;

-- migration_ranges: the heartbeat column gives way to the lease's expiry.
ALTER TABLE migration_ranges ADD COLUMN lease_expires_at timestamptz;
UPDATE migration_ranges SET lease_expires_at = heartbeat + interval '60 minutes' WHERE claim_token IS NOT NULL;
UPDATE migration_ranges SET claim_token = gen_random_uuid(), lease_expires_at = now()
    WHERE status = 'PROCESSING' AND claim_token IS NULL;
ALTER TABLE migration_ranges DROP COLUMN heartbeat;

-- blob_migrations: one run per DID at a time holds the request's row.
ALTER TABLE blob_migrations ADD COLUMN claim_token uuid, ADD COLUMN lease_expires_at timestamptz;
