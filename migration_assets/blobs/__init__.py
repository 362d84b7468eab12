"""AT Protocol blob migration: every blob of an account from its old PDS to its new PDS, streamed,
verified against its CID, resumable, one Dagster partition per account (see README)."""
