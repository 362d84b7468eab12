"""A small deterministic repo shared by the CAR and MST tests, and loopback servers for the client tests."""

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from tests.atproto.builders import Blocks, build_mst, private_key, put, signed_commit
from tests.atproto.loopback import serve

COLLECTIONS = ("app.bsky.actor.profile", "app.bsky.feed.like", "app.bsky.feed.post")


@dataclass
class Repo:
    records: dict[str, CID]  # "collection/rkey" -> record CID
    blocks: Blocks  # records, MST nodes and the commit
    root: CID  # MST root
    commit: CID
    key: ec.EllipticCurvePrivateKey


def make_repo(count: int = 48) -> Repo:
    blocks: Blocks = {}
    records: dict[str, CID] = {}
    for i in range(count):
        collection = COLLECTIONS[i % len(COLLECTIONS)]
        rkey = "self" if collection == "app.bsky.actor.profile" and i < 3 else f"3k{i:011d}"
        record = {"$type": collection, "text": f"record {i}", "createdAt": "2024-05-01T00:00:00.000Z"}
        records[f"{collection}/{rkey}"] = put(blocks, record)
    root = build_mst(records, blocks)
    key = private_key(ec.SECP256K1(), 0x5EED)
    commit_block = signed_commit(key, root)
    commit = CID.for_block(commit_block)
    blocks[commit] = commit_block
    assert dagcbor.decode(commit_block)["data"] == root
    return Repo(records, blocks, root, commit, key)


@pytest.fixture(scope="session")
def repo() -> Repo:
    return make_repo()


@pytest.fixture
def servers():
    """A factory of loopback HTTP servers (tests/atproto/loopback.py), all stopped after the test."""
    yield from serve()
