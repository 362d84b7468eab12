-- Following a host's event stream (com.atproto.sync.subscribeRepos): the last sequence number applied,
-- per host (a PDS or a relay URL). Written in the same transaction as the changes it covers.
CREATE TABLE repo_stream_cursors (
    host        text PRIMARY KEY,
    cursor      bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
