"""The blocks of a repo export that its MST needs, collected from a CAR whose blocks come in any order.

Memory holds only the MST nodes the commit reaches. A CAR may list blocks in any order (the reference
PDS sends them sorted by CID), so a node can arrive before the node that links to it: from the commit
down, every node reached adds its children to a wanted set, and a node-shaped block nobody wants yet
waits in a temp file. After the stream, the file is scanned again for the nodes the tree turned out to
reach (one pass per tree level at most). Unreferenced blocks, however many, cost disk, not RAM.

Every other block goes to the caller's `other(cid, block)`: records as they stream, and after the
stream the node-shaped blocks the tree never reached (one may be a record shaped like a node).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.mst import parse_commit

# Canonical DAG-CBOR of an MST node {e: [...], l: ...}: a two-entry map whose first key is "e".
NODE_PREFIX = b"\xa2\x61\x65"
_LENGTHS = struct.Struct(">II")

Other = Callable[[CID, bytes], None]


@dataclass
class RepoBlocks:
    commit_block: bytes | None  # None: the CAR lacks its root
    nodes: dict[CID, bytes] = field(default_factory=dict)  # MST nodes reachable from the commit


def collect_repo_blocks(blocks: Iterable[tuple[CID, bytes]], head: CID, other: Other) -> RepoBlocks:
    """Read every (cid, block) of a CAR whose root is `head` (the commit): the commit and the MST nodes
    it reaches are returned, every other block is handed to `other`. A malformed commit raises
    CommitError; a malformed or missing node is left for the MST walk to report."""
    collector = _Collector(head, other)
    try:
        for cid, block in blocks:
            collector.add(cid, block)
        collector.finish()
    finally:
        collector.waiting.close()
    return collector.found


class _Waiting:
    """Node-shaped blocks not (yet) reached, in a temp file: (cid, block) records, read back in order."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="repo-nodes-")
        self.count = 0

    def append(self, cid: CID, block: bytes) -> None:
        raw = bytes(cid)
        self.file.write(_LENGTHS.pack(len(raw), len(block)) + raw)
        self.file.write(block)
        self.count += 1

    def drain(self) -> Iterator[tuple[CID, bytes]]:
        """Every record, once; the file is empty for new appends afterwards."""
        old, self.file, self.count = self.file, tempfile.TemporaryFile(prefix="repo-nodes-"), 0
        with old:
            old.seek(0)
            while header := old.read(_LENGTHS.size):
                cid_size, block_size = _LENGTHS.unpack(header)
                yield CID.from_bytes(old.read(cid_size)), old.read(block_size)

    def close(self) -> None:
        self.file.close()


class _Collector:
    def __init__(self, head: CID, other: Other) -> None:
        self.head = head
        self.other = other
        self.found = RepoBlocks(None)
        self.wanted: set[CID] = set()
        self.waiting = _Waiting()

    def add(self, cid: CID, block: bytes) -> None:
        if cid == self.head:
            self.found.commit_block = block
            self.want(parse_commit(block).data)
        elif block[:3] != NODE_PREFIX:
            self.other(cid, block)
        elif cid in self.wanted:
            self.reach(cid, block)
        else:
            self.waiting.append(cid, block)

    def want(self, cid: CID) -> None:
        if cid not in self.found.nodes:
            self.wanted.add(cid)

    def reach(self, cid: CID, block: bytes) -> None:
        self.wanted.discard(cid)
        self.found.nodes[cid] = block
        for child in _children(block):
            self.want(child)

    def finish(self) -> None:
        """Rescan the waiting blocks while that reaches more of the tree; hand the rest to `other`."""
        reached = True
        while reached and self.wanted and self.waiting.count:
            reached = False
            for cid, block in self.waiting.drain():
                if cid in self.wanted:
                    self.reach(cid, block)
                    reached = True
                else:
                    self.waiting.append(cid, block)
        for cid, block in self.waiting.drain():
            self.other(cid, block)


def _children(block: bytes) -> list[CID]:
    """The subtree links of a node (`l` and each entry's `t`); none if it does not decode as a node (the
    walk then reports the node as malformed)."""
    try:
        node = dagcbor.decode(block)
    except AtprotoFormatError:
        return []
    if not isinstance(node, dict) or not isinstance(node.get("e"), list):
        return []
    links = [node.get("l")] + [entry.get("t") for entry in node["e"] if isinstance(entry, dict)]
    return [link for link in links if isinstance(link, CID)]
