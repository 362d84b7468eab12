-- AT Protocol repo backfill: a ledger row per account (what to sync, what happened) and its records.
CREATE TABLE repos (
    did            text PRIMARY KEY,
    bucket         integer NOT NULL,                 -- sha256(did) mod REPO_BUCKETS: the partition
    pds            text,                             -- endpoint from the DID document, at the last sync
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'in_progress', 'synced', 'error',
                                     'deleted', 'deactivated', 'takendown', 'suspended')),
    head           text,                             -- commit CID stored
    rev            text,                             -- commit rev stored
    listed_head    text,                             -- what listRepos last reported
    listed_rev     text,
    records_count  integer NOT NULL DEFAULT 0,       -- MST leaves at `rev`
    attempts       integer NOT NULL DEFAULT 0,       -- failed attempts since the last success
    next_retry_at  timestamptz,
    last_error     text,
    claimed_at     timestamptz,                      -- set while a run holds the repo (in_progress)
    synced_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX repos_due ON repos (bucket, status, next_retry_at);

CREATE TABLE records (
    did         text NOT NULL,
    collection  text NOT NULL,
    rkey        text NOT NULL,
    cid         text NOT NULL,
    record      jsonb NOT NULL,
    indexed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (did, collection, rkey)
);

CREATE TABLE repo_collection_counts (
    did         text NOT NULL,
    collection  text NOT NULL,
    records     integer NOT NULL,
    PRIMARY KEY (did, collection)
);
