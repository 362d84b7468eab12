"""Embedded defaults for the demo and the tests: local source servers and sample data (loopback only)."""
