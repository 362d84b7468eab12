"""AT Protocol library for repo backfill and blob migration: CIDs, DAG-CBOR, CAR streams, MST walks and
commit signatures. Python, with compiled fast paths of the hot loops (_fastrepo.c, through compiled.py)
that fall back to the Python references; no Dagster import; the network parts (identity, XRPC) live
beside it."""
