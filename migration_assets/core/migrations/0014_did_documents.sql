-- DID documents as resolved by any process (backfill runs, stream followers), reused by the others while
-- ATPROTO_IDENTITY_TTL_SECONDS lasts: a follower run that starts every hour would otherwise resolve every
-- active DID again, and a backfill's resolutions would not reach the follower after it. A document that may
-- be stale (an #identity event, a signature its key does not verify, a PDS without the repo) is deleted.
CREATE TABLE did_documents (
    did text PRIMARY KEY,
    document jsonb NOT NULL,
    resolved_at timestamptz NOT NULL DEFAULT now()
);
