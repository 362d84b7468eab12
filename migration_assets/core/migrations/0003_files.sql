-- File migration to S3 (see reference/files.md): the seed's three tables, with what its defects lacked.
CREATE TABLE source_files (
    file_id BIGSERIAL PRIMARY KEY,
    file_uri TEXT NOT NULL,                -- path relative to FILES_SOURCE_ROOT
    file_name TEXT NOT NULL,
    create_date TIMESTAMPTZ NOT NULL DEFAULT now(),
    size BIGINT,                           -- when known: a file on disk of another size has changed
    sha256 CHAR(64)                        -- when known: likewise for its content
);

-- Ranges cover file ids [min_id, max_id). A claim is a committed PROCESSING status with a claim token
-- and a heartbeat the worker renews; cleanup releases only ranges whose heartbeat went stale.
CREATE TABLE migration_ranges (
    range_id BIGSERIAL PRIMARY KEY,
    min_id BIGINT NOT NULL,
    max_id BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETE')),
    claim_token UUID,
    claimed_by TEXT,
    heartbeat TIMESTAMPTZ,
    attempts INT NOT NULL DEFAULT 0,
    covered_through BIGINT,                -- highest source file id seen when last completed
    last_updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (min_id < max_id),
    UNIQUE (min_id, max_id)
);
CREATE INDEX migration_ranges_pending_idx ON migration_ranges (min_id) WHERE status = 'PENDING';

CREATE TABLE migration_files (
    file_id BIGINT PRIMARY KEY REFERENCES source_files (file_id),
    old_uri TEXT NOT NULL,
    new_uri TEXT,                          -- s3://bucket/key of the verified copy
    file_name TEXT,
    create_date TIMESTAMPTZ,
    status VARCHAR(8) NOT NULL CHECK (status IN ('SUCCESS', 'FAIL', 'RETRYING')),
    size BIGINT,
    sha256 CHAR(64),                       -- whole-file SHA-256 of the bytes copied
    s3_checksum TEXT,                      -- S3's stored ChecksumSHA256 (composite "...-N" for multipart)
    s3_etag TEXT,                          -- the object's ETag at upload: a listing shows it unchanged since
    retry_count INT NOT NULL DEFAULT 0,
    last_attempt_date TIMESTAMPTZ,
    migration_date TIMESTAMPTZ,
    error TEXT
);
CREATE INDEX migration_files_fail_idx ON migration_files (file_id) WHERE status = 'FAIL';
