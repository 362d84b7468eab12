-- Blob migrations: a request asked again supersedes the account's older open or failed one, and no
-- row keeps passwords it can no longer use (blobs/store.py).
ALTER TABLE blob_migrations DROP CONSTRAINT blob_migrations_status_check;
ALTER TABLE blob_migrations ADD CONSTRAINT blob_migrations_status_check
    CHECK (status IN ('pending_blobs', 'pending_prefs', 'failed', 'superseded'));
-- The run that holds the row's lease (0007: claim_token, lease_expires_at), named to a second run.
ALTER TABLE blob_migrations ADD COLUMN lease_run_id TEXT;

-- Failed rows an account has since requested again were superseded; no failed row keeps credentials
-- (a new request brings both passwords again).
UPDATE blob_migrations AS old SET status = 'superseded'
    WHERE status = 'failed'
      AND EXISTS (SELECT 1 FROM blob_migrations AS newer WHERE newer.did = old.did AND newer.id > old.id);
UPDATE blob_migrations SET credentials = NULL WHERE status IN ('failed', 'superseded');
