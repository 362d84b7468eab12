"""A repo at one commit, read from its CAR export: the commit, and every record's (collection, rkey, CID).

Only the blocks are kept in memory (the CAR itself is streamed and never held whole), and a record is
decoded only when the store needs it, i.e. when it is new or changed.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from migration_assets.atproto import dagcbor
from migration_assets.atproto.car import CarError, CarReader
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import Commit, MstError, parse_commit, walk_records
from migration_assets.atproto.signature import verify_commit

RecordKey = tuple[str, str]  # (collection, rkey)


@dataclass
class RepoSnapshot:
    did: str
    head: CID
    commit: Commit
    commit_block: bytes
    records: dict[RecordKey, CID]
    blocks: dict[CID, bytes]
    car_bytes: int

    def record_json(self, cid: CID) -> str:
        try:
            block = self.blocks[cid]
        except KeyError:
            raise MstError(f"record block {cid} is missing from the CAR; the export is incomplete") from None
        return dagcbor.to_json_text(block)


class _Counting:
    """Counts bytes as the CAR streams through."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.total = 0

    def __iter__(self):
        for chunk in self.chunks:
            self.total += len(chunk)
            yield chunk


def read_snapshot(did: str, chunks: Iterable[bytes], max_bytes: int) -> RepoSnapshot:
    """Parse a getRepo CAR stream. Raises CarError / CommitError / MstError on a bad export."""
    counted = _Counting(chunks)
    reader = CarReader(counted, max_size=max_bytes)
    blocks = dict(reader)
    head = reader.roots[0]
    if head not in blocks:
        raise CarError(f"the CAR's root (commit {head}) is not among its blocks; the export is incomplete")
    commit_block = blocks[head]
    commit = parse_commit(commit_block)
    if commit.did != did:
        raise CarError(f"the CAR's commit is for {commit.did}, not {did}; the PDS served another repo")
    records = {(collection, rkey): cid for collection, rkey, cid in walk_records(blocks, commit.data)}
    return RepoSnapshot(did, head, commit, commit_block, records, blocks, counted.total)


def verify_snapshot(snapshot: RepoSnapshot, signing_key: str) -> None:
    """Check the commit signature against the DID document's #atproto key (SignatureError if not)."""
    verify_commit(snapshot.commit_block, signing_key)
