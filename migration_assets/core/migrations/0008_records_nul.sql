-- jsonb cannot hold U+0000, which AT Protocol strings may. Such a record is stored in `record` with
-- U+FFFD in its place, and its exact DAG-CBOR block here (its CID is `cid`); NULL for every other record.
ALTER TABLE records ADD COLUMN record_cbor bytea;
