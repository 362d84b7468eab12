"""Accounts are spread over a fixed number of hash buckets; a bucket is a partition (never one per DID)."""

import hashlib


def bucket_of(did: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(did.encode()).digest()[:8], "big") % buckets


def bucket_key(bucket: int) -> str:
    return f"{bucket:04d}"


def parse_bucket_key(key: str) -> int:
    return int(key)


def bucket_keys(buckets: int) -> list[str]:
    return [bucket_key(b) for b in range(buckets)]
