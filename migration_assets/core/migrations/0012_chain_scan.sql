-- The bulk Scan path of the chain pipeline (chain/scan.py). A scan keeps the source's watermark it
-- started with, so a resumed scan skips the same heights (or ids) above it as the first attempt did.
CREATE TABLE chain_scans (
    scan_id     text PRIMARY KEY,
    total       int NOT NULL,
    watermark   bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per segment of a parallel Scan:
-- the key to resume after, written in the same transaction as the rows it covers, so a killed scan
-- resumes where it stopped.
CREATE TABLE chain_scan_segments (
    scan_id     text NOT NULL,
    segment     int NOT NULL,
    total       int NOT NULL,
    last_key    jsonb,
    items       bigint NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scan_id, segment)
);

-- What a segment read per range (heights for blocks, event ids for events), for the range checks.
CREATE TABLE chain_scan_counts (
    scan_id      text NOT NULL,
    segment      int NOT NULL,
    range_start  bigint NOT NULL,
    range_end    bigint NOT NULL,
    heights      bigint NOT NULL DEFAULT 0,
    blocks       bigint NOT NULL DEFAULT 0,
    canonical    bigint NOT NULL DEFAULT 0,
    events       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (scan_id, segment, range_start)
);
