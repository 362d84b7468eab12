"""The blocks of a repo export that its MST needs, collected from a CAR whose blocks come in any order.

Memory holds only the MST nodes the commit reaches. A CAR may list blocks in any order (the reference
PDS sends them sorted by CID), so a node can arrive before the node that links to it: from the commit
down, every node reached adds its children to a wanted set, and a node-shaped block nobody wants yet
waits: in memory up to a budget (a node reached later pulls in its waiting subtree at once), past it in
a temp file, scanned again after the stream for the nodes the tree turned out to reach (one pass per
tree level at most). Unreferenced blocks beyond the budget, however many, cost disk, not RAM.

Every other block goes to the caller's `other(link, block)`: records as they stream, and after the
stream the node-shaped blocks the tree never reached (one may be a record shaped like a node).

Blocks are keyed by their binary CID (`link`, bytes: what CarReader.links yields and a decoded node holds),
never made CID objects.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from migration_assets.atproto.compiled import fastrepo
from migration_assets.atproto.mst import Commit, MstError, Node, decode_node, parse_signed_commit

# Canonical DAG-CBOR of an MST node {e: [...], l: ...}: a two-entry map whose first key is "e".
NODE_PREFIX = b"\xa2\x61\x65"
_LENGTHS = struct.Struct(">II")
# Unreached node-shaped blocks held in memory before the rest go to disk: the reference PDS sends blocks
# sorted by CID, so most nodes come before their parent and wait; rereading them from a file was a fifth
# of a repo's parse time.
WAITING_MEMORY_BYTES = 8 << 20

Other = Callable[[bytes, bytes], None]


@dataclass
class RepoBlocks:
    commit_block: bytes | None  # None: the CAR lacks its root
    commit: Commit | None = None  # the commit block decoded, and what its signature covers (parse_signed_commit)
    signed: tuple[bytes, bytes] | None = None
    nodes: dict[bytes, bytes] = field(default_factory=dict)  # MST nodes reachable from the commit
    decoded: dict[bytes, Node] = field(default_factory=dict)  # those of them that decode, for the walk


def collect_repo_blocks(blocks: Iterable[tuple[bytes, bytes]], head: bytes, other: Other,
                        memory_bytes: int = WAITING_MEMORY_BYTES) -> RepoBlocks:
    """Read every (link, block) of a CAR whose root is `head` (the commit): the commit and the MST nodes
    it reaches are returned, every other block is handed to `other`. Node-shaped blocks not reached yet
    wait in memory up to `memory_bytes`, then on disk. A malformed commit raises CommitError; a malformed
    or missing node is left for the MST walk to report."""
    collector = _Collector(head, other, memory_bytes)
    try:
        for link, block in blocks:
            collector.add(link, block)
        collector.finish()
    finally:
        collector.waiting.close()
    return collector.found


class _Waiting:
    """Node-shaped blocks not (yet) reached: in memory up to `memory_bytes`, the rest in a temp file of
    (link, block) records, read back in order."""

    def __init__(self, memory_bytes: int) -> None:
        self.held: dict[bytes, bytes] = {}
        self.room = memory_bytes
        self.file: IO[bytes] | None = None
        self.count = 0  # records in the file

    def append(self, link: bytes, block: bytes) -> None:
        if len(block) <= self.room and link not in self.held:
            self.held[link] = block
            self.room -= len(block)
            return
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="repo-nodes-")
        self.file.write(_LENGTHS.pack(len(link), len(block)) + link)
        self.file.write(block)
        self.count += 1

    def take(self, link: bytes) -> bytes | None:
        """The held block of `link`, no longer held; None if it is not in memory."""
        block = self.held.pop(link, None)
        if block is not None:
            self.room += len(block)
        return block

    def drain(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record of the file, once; the file is empty for new appends afterwards."""
        old, self.file, self.count = self.file, None, 0
        if old is None:
            return
        with old:
            old.seek(0)
            while header := old.read(_LENGTHS.size):
                link_size, block_size = _LENGTHS.unpack(header)
                yield old.read(link_size), old.read(block_size)

    def close(self) -> None:
        self.held = {}
        if self.file is not None:
            self.file.close()


# A pass over the waiting file reaches at least one more level of the tree, and a real MST is a few dozen
# levels at most (a level up takes keys whose sha256 starts with two more zero bits), so this many passes
# reach all of it. A hostile chain of nodes sent children-first would otherwise cost a pass per node: a
# rescan quadratic in its length. What is left unreached is missing to the walk, which fails the repo.
MAX_MST_DEPTH = 64


class _Collector:
    def __init__(self, head: bytes, other: Other, memory_bytes: int) -> None:
        self.head = head
        self.other = other
        self.found = RepoBlocks(None)
        self.wanted: set[bytes] = set()
        self.waiting = _Waiting(memory_bytes)

    def add(self, link: bytes, block: bytes) -> None:
        if link == self.head:
            self.found.commit_block = block
            self.found.commit, self.found.signed = parse_signed_commit(block)  # decoded once, for the signature too
            self.want(bytes(self.found.commit.data))
        elif block[:3] != NODE_PREFIX:
            self.other(link, block)
        elif link in self.wanted:
            self.reach(link, block)
        else:
            self.waiting.append(link, block)

    def want(self, link: bytes) -> None:
        if link in self.found.nodes:
            return
        block = self.waiting.take(link)
        if block is None:
            self.wanted.add(link)
        else:
            self.reach(link, block)

    def reach(self, link: bytes, block: bytes) -> None:
        """Keep the node, and every node below it that is already waiting in memory."""
        stack = [(link, block)]
        while stack:
            link, block = stack.pop()
            self.wanted.discard(link)
            self.found.nodes[link] = block
            for child in self._children(link, block):
                if child in self.found.nodes:
                    continue
                held = self.waiting.take(child)
                if held is None:
                    self.wanted.add(child)
                else:
                    stack.append((child, held))

    def _children(self, link: bytes, block: bytes) -> list[bytes]:
        """The subtree links of a node (`l` and each entry's `t`); none if it does not decode as a node
        (the walk then reports the node as malformed). Compiled code reads the usual node (the compiled
        walk decodes it again); the Python decode keeps the node it decoded for the Python walk."""
        if fastrepo is not None and (trees := fastrepo.subtrees(block)) is not None:
            return trees
        try:
            left, _, _, trees = self.found.decoded[link] = decode_node(block)
        except MstError:
            return []
        return [tree for tree in (left, *trees) if tree is not None]

    def finish(self) -> None:
        """Rescan the waiting file while that reaches more of the tree, at most MAX_MST_DEPTH times; hand
        the rest to `other`."""
        reached, passes = True, 0
        while reached and self.wanted and self.waiting.count and passes < MAX_MST_DEPTH:
            reached, passes = False, passes + 1
            for link, block in self.waiting.drain():
                if link in self.wanted:
                    self.reach(link, block)
                    reached = True
                else:
                    self.waiting.append(link, block)
        for link, block in self.waiting.held.items():
            self.other(link, block)
        for link, block in self.waiting.drain():
            self.other(link, block)
