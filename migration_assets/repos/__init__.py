"""AT Protocol repo backfill: accounts' repositories from their PDSes into PostgreSQL `records`."""
