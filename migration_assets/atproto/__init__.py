"""AT Protocol library for repo backfill and blob migration: CIDs, DAG-CBOR, CAR streams, MST walks and
commit signatures. Pure Python, no Dagster import; the network parts (identity, XRPC) live beside it."""
