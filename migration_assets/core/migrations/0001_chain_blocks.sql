-- Chain block metadata: the chainstorage PostgreSQL meta-storage schema (see reference/chain.md).
CREATE TABLE block_metadata (
    id BIGSERIAL PRIMARY KEY,
    height BIGINT NOT NULL,
    tag INT NOT NULL,
    hash VARCHAR(66),
    parent_hash VARCHAR(66),
    parent_height BIGINT NOT NULL DEFAULT 0,
    object_key_main VARCHAR(255),
    timestamp BIGINT NOT NULL,
    skipped BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE UNIQUE INDEX block_metadata_tag_hash_uniq
    ON block_metadata (tag, hash) WHERE hash IS NOT NULL AND NOT skipped;
CREATE UNIQUE INDEX block_metadata_tag_height_skipped_uniq
    ON block_metadata (tag, height) WHERE skipped;
CREATE INDEX block_metadata_tag_height_idx ON block_metadata (tag, height);

CREATE TABLE canonical_blocks (
    height BIGINT NOT NULL,
    block_metadata_id BIGINT NOT NULL REFERENCES block_metadata (id),
    tag INT NOT NULL,
    PRIMARY KEY (height, tag)
);
CREATE INDEX canonical_blocks_block_metadata_id_idx ON canonical_blocks (block_metadata_id);
