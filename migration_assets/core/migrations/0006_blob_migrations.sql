-- AT Protocol blob migrations: the request queue and progress record of each account's blob transfer
-- (the seed's migration record). `credentials` is a Fernet token (MIGRATION_SECRET_KEY), never plaintext,
-- set to NULL once the migration completes.
CREATE TABLE blob_migrations (
    id BIGSERIAL PRIMARY KEY,
    did TEXT NOT NULL,
    old_pds TEXT NOT NULL,
    new_pds TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending_blobs'
        CHECK (status IN ('pending_blobs', 'pending_prefs', 'failed')),
    -- 'queue': the sensor requests its run; 'cli': `migration-assets blobs migrate` runs it itself.
    origin TEXT NOT NULL DEFAULT 'queue' CHECK (origin IN ('queue', 'cli')),
    credentials BYTEA,
    progress_data JSONB NOT NULL DEFAULT '{}'::jsonb,
    estimated_memory_mb INT,
    error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One migration per account waiting for its blobs. Resuming a failed one makes a new request (a new
-- run) that carries its progress over; the failed row stays as history.
CREATE UNIQUE INDEX blob_migrations_one_pending_per_did ON blob_migrations (did) WHERE status = 'pending_blobs';
CREATE INDEX blob_migrations_status_idx ON blob_migrations (status, id);
