-- Chain events: the chainstorage PostgreSQL schema's block_events (see reference/chain.md).
CREATE TYPE event_type_enum AS ENUM ('BLOCK_ADDED', 'BLOCK_REMOVED', 'UNKNOWN');

CREATE TABLE block_events (
    event_tag INT NOT NULL DEFAULT 0,
    event_sequence BIGINT NOT NULL,
    event_type event_type_enum NOT NULL,
    block_metadata_id BIGINT NOT NULL REFERENCES block_metadata (id),
    height BIGINT NOT NULL,
    hash VARCHAR(66),
    PRIMARY KEY (event_tag, event_sequence)
);
CREATE INDEX block_events_height_event_tag_idx ON block_events (height, event_tag);
CREATE INDEX block_events_block_metadata_id_idx ON block_events (block_metadata_id);
