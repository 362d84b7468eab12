"""Shared foundation: settings, PostgreSQL (pool, COPY, schema migrations), embedded defaults."""
