"""The blocks of a repo export that its MST needs, collected from a CAR whose blocks come in any order.

Memory holds only the MST nodes the commit reaches. A CAR may list blocks in any order (the reference
PDS sends them sorted by CID), so a node can arrive before the node that links to it: from the commit
down, every node reached adds its children to a wanted set, and a node-shaped block nobody wants yet
waits: in memory up to a budget (a node reached later pulls in its waiting subtree at once), past it in
a temp file, scanned again after the stream for the nodes the tree turned out to reach (one pass per
tree level at most). Unreferenced blocks beyond the budget, however many, cost disk, not RAM.

Every other block goes to the caller's `other(cid, block)`: records as they stream, and after the
stream the node-shaped blocks the tree never reached (one may be a record shaped like a node).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.mst import MstError, Node, decode_node, parse_commit

# Canonical DAG-CBOR of an MST node {e: [...], l: ...}: a two-entry map whose first key is "e".
NODE_PREFIX = b"\xa2\x61\x65"
_LENGTHS = struct.Struct(">II")
# Unreached node-shaped blocks held in memory before the rest go to disk: the reference PDS sends blocks
# sorted by CID, so most nodes come before their parent and wait; rereading them from a file was a fifth
# of a repo's parse time.
WAITING_MEMORY_BYTES = 8 << 20

Other = Callable[[CID, bytes], None]


@dataclass
class RepoBlocks:
    commit_block: bytes | None  # None: the CAR lacks its root
    nodes: dict[CID, bytes] = field(default_factory=dict)  # MST nodes reachable from the commit
    decoded: dict[CID, Node] = field(default_factory=dict)  # those of them that decode, for the walk


def collect_repo_blocks(blocks: Iterable[tuple[CID, bytes]], head: CID, other: Other,
                        memory_bytes: int = WAITING_MEMORY_BYTES) -> RepoBlocks:
    """Read every (cid, block) of a CAR whose root is `head` (the commit): the commit and the MST nodes
    it reaches are returned, every other block is handed to `other`. Node-shaped blocks not reached yet
    wait in memory up to `memory_bytes`, then on disk. A malformed commit raises CommitError; a malformed
    or missing node is left for the MST walk to report."""
    collector = _Collector(head, other, memory_bytes)
    try:
        for cid, block in blocks:
            collector.add(cid, block)
        collector.finish()
    finally:
        collector.waiting.close()
    return collector.found


class _Waiting:
    """Node-shaped blocks not (yet) reached: in memory up to `memory_bytes`, the rest in a temp file of
    (cid, block) records, read back in order."""

    def __init__(self, memory_bytes: int) -> None:
        self.held: dict[CID, bytes] = {}
        self.room = memory_bytes
        self.file: IO[bytes] | None = None
        self.count = 0  # records in the file

    def append(self, cid: CID, block: bytes) -> None:
        if len(block) <= self.room and cid not in self.held:
            self.held[cid] = block
            self.room -= len(block)
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="repo-nodes-")
        raw = bytes(cid)
        self.file.write(_LENGTHS.pack(len(raw), len(block)) + raw)
        self.file.write(block)
        self.count += 1

    def take(self, cid: CID) -> bytes | None:
        """The held block of `cid`, no longer held; None if it is not in memory."""
        block = self.held.pop(cid, None)
        if block is not None:
            self.room += len(block)
        return block

    def drain(self) -> Iterator[tuple[CID, bytes]]:
        """Every record of the file, once; the file is empty for new appends afterwards."""
        old, self.file, self.count = self.file, None, 0
        if old is None:
            return
        with old:
            old.seek(0)
            while header := old.read(_LENGTHS.size):
                cid_size, block_size = _LENGTHS.unpack(header)
                yield CID.from_bytes(old.read(cid_size)), old.read(block_size)

    def close(self) -> None:
        self.held = {}
        if self.file is not None:
            self.file.close()


class _Collector:
    def __init__(self, head: CID, other: Other, memory_bytes: int) -> None:
        self.head = head
        self.other = other
        self.found = RepoBlocks(None)
        self.wanted: set[CID] = set()
        self.waiting = _Waiting(memory_bytes)

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
        if cid in self.found.nodes:
            return
        block = self.waiting.take(cid)
        if block is None:
            self.wanted.add(cid)
        else:
            self.reach(cid, block)

    def reach(self, cid: CID, block: bytes) -> None:
        """Keep the node, and every node below it that is already waiting in memory."""
        stack = [(cid, block)]
        while stack:
            cid, block = stack.pop()
            self.wanted.discard(cid)
            self.found.nodes[cid] = block
            for child in self._children(cid, block):
                if child in self.found.nodes:
                    continue
                held = self.waiting.take(child)
                if held is None:
                    self.wanted.add(child)
                else:
                    stack.append((child, held))

    def _children(self, cid: CID, block: bytes) -> list[CID]:
        """The subtree links of a node (`l` and each entry's `t`); none if it does not decode as a node
        (the walk then reports the node as malformed). The decoded node is kept for the walk."""
        try:
            node = self.found.decoded[cid] = decode_node(block)
        except MstError:
            return []
        left, entries = node
        links = [left] + [entry.get("t") for entry in entries]
        return [link for link in links if link is not None]

    def finish(self) -> None:
        """Rescan the waiting file while that reaches more of the tree; hand the rest to `other`."""
        reached = True
        while reached and self.wanted and self.waiting.count:
            reached = False
            for cid, block in self.waiting.drain():
                if cid in self.wanted:
                    self.reach(cid, block)
                    reached = True
                else:
                    self.waiting.append(cid, block)
        for cid, block in self.waiting.held.items():
            self.other(cid, block)
        for cid, block in self.waiting.drain():
            self.other(cid, block)


