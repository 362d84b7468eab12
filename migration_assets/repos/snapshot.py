"""A repo at one commit, read from its CAR export: the commit, and every record's (collection, rkey, CID)
with its JSON form, staged on local disk so memory stays flat however big the repo.

The CAR streams through once. The MST nodes the commit reaches stay in memory (a node holds several
keys, so they are a fraction of the blocks; atproto.repo keeps unreferenced ones out); the commit is kept
apart; every other block is turned into its JSON form and appended to a spool file (see `_staged` for
the records that jsonb cannot hold). The MST walk then appends each record's key to a second spool
file. Storing
(store.py) COPYs them into PostgreSQL and diffs there. Blocks may come in any order, so nothing can be
stored before the CAR ends, and disk is where the rest of it waits.

Under a collection filter or a signal collection (RecordScope), which records to keep is known only
after the walk: blocks are then spooled raw, and only the kept records' blocks are turned into JSON
and staged, so excluded records cost neither that nor anything in PostgreSQL. The MST is still walked
(and so verified) whole.
"""

import json
import marshal
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import libipld

from migration_assets.atproto import dagcbor
from migration_assets.atproto.car import CarError, CarReader
from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.mst import Commit, parse_commit, walk_links
from migration_assets.atproto.repo import collect_repo_blocks
from migration_assets.atproto.signature import verify_commit
from migration_assets.repos.collections import RecordScope

_BATCH = 1000  # rows per marshal record in a spool file
SPOOL_MEMORY_BYTES = 4 << 20  # per spool: a repo's rows stay in memory up to this, then go to disk
_ROW_BYTES = 300  # what a spooled row costs in memory besides its variable text (tuple, str and bytes heads)
cid_text = libipld.encode_cid  # binary CID -> "bafy...", as CID.__str__ writes it, without making a CID
_JSON_NUL = "\\u0000"  # how json writes U+0000, which jsonb refuses
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # as dagcbor.to_json_text writes


class Spool:
    """Rows (tuples of str/bytes/None) kept in order: in memory up to `memory_bytes` (as `append` is told
    their size), then all of them in an anonymous temp file in batches, so a small repo (most) costs no
    file, and a big one costs disk rather than RAM."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self._file: IO[bytes] | None = None
        self._batch: list[tuple] = []
        self._held: list[tuple] = []  # rows while all of them fit in memory
        self._held_bytes = 0
        self._memory_bytes = SPOOL_MEMORY_BYTES if memory_bytes is None else memory_bytes
        self.rows = 0

    def append(self, row: tuple, size: int = 64) -> None:
        self.rows += 1
        if self._file is None:
            self._held.append(row)
            self._held_bytes += size
            if self._held_bytes > self._memory_bytes:
                self._file = tempfile.TemporaryFile(prefix="repo-spool-")
                self._batch, self._held = self._held, []
                self._flush()
            return
        self._batch.append(row)
        if len(self._batch) >= _BATCH:
            self._flush()

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def _flush(self) -> None:
        if self._batch and self._file is not None:
            for start in range(0, len(self._batch), _BATCH):
                marshal.dump(self._batch[start : start + _BATCH], self._file)
            self._batch = []

    def __iter__(self) -> Iterator[tuple]:
        if self._file is None:
            yield from self._held
            return
        self._flush()
        self._file.seek(0)
        while True:
            try:
                yield from marshal.load(self._file)
            except EOFError:
                return

    def close(self) -> None:
        self._held = []
        if self._file is not None:
            self._file.close()


@dataclass
class RepoSnapshot:
    did: str
    head: CID
    commit: Commit
    commit_block: bytes
    car_bytes: int
    blocks: Spool = field(repr=False)  # (binary CID, record JSON or None, why not, exact block or None)
    keys: Spool = field(repr=False)  # (collection, rkey, CID, binary CID) in key order, of kept records
    collections: Counter = field(default_factory=Counter)  # kept records per collection
    scope: RecordScope = RecordScope()
    signal_missing: bool = False  # a signal collection is set and the repo has no record in it: none kept

    @property
    def records(self) -> int:
        return self.keys.rows

    def close(self) -> None:
        self.blocks.close()
        self.keys.close()

    def __enter__(self) -> "RepoSnapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Counting:
    """Counts bytes as the CAR streams through."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.total = 0

    def __iter__(self):
        for chunk in self.chunks:
            self.total += len(chunk)
            yield chunk


def _stage(spool: Spool, link: bytes, block: bytes) -> None:
    row = _staged(link, block)
    spool.append(row, _ROW_BYTES + 2 * len(block))  # the JSON text is about twice the block


def _staged(link: bytes, block: bytes) -> tuple[bytes, str | None, str | None, bytes | None]:
    """A block's spool row, keyed by the binary CID (the text form is only needed for the records
    written, and it costs far more). A block that is not DAG-CBOR fails the repo only if a record needs it.

    jsonb cannot hold U+0000, which atproto strings may: such a record's JSON form gets U+FFFD in its
    place, and the exact block is kept with it (the check is one scan of the text, for every block)."""
    try:
        text = dagcbor.to_json_text(block)
    except AtprotoFormatError as exc:
        return link, None, str(exc), None
    if _JSON_NUL in text:  # or a literal backslash before "u0000": then nothing changes below
        readable = _JSON.encode(_without_nul(json.loads(text)))
        if readable != text:
            return link, readable, None, bytes(block)
    return link, text, None, None


def _without_nul(value: object) -> object:
    if isinstance(value, str):
        return value.replace("\0", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def read_snapshot(did: str, chunks: Iterable[bytes], max_bytes: int, scope: RecordScope = RecordScope()) -> RepoSnapshot:
    """Parse a getRepo CAR stream, keeping the records `scope` selects. Raises CarError / CommitError /
    MstError on a bad export."""
    counted = _Counting(chunks)
    reader = CarReader(counted, max_size=max_bytes)
    head = reader.roots[0]
    blocks, keys = Spool(), Spool()
    raw = Spool() if scope != RecordScope() else None  # selective: stage only kept records, after the walk
    try:
        if raw is None:
            found = collect_repo_blocks(reader.links(), bytes(head), lambda link, block: _stage(blocks, link, block))
        else:
            found = collect_repo_blocks(reader.links(), bytes(head),
                                        lambda link, block: raw.append((link, bytes(block)), len(block) + _ROW_BYTES))
        nodes, commit_block = found.nodes, found.commit_block
        if commit_block is None:
            raise CarError(f"the CAR's root (commit {head}) is not among its blocks; the export is incomplete")
        commit = parse_commit(commit_block)
        if commit.did != did:
            raise CarError(f"the CAR's commit is for {commit.did}, not {did}; the PDS served another repo")
        snapshot = RepoSnapshot(did, head, commit, commit_block, counted.total, blocks, keys, scope=scope)
        wanted = _walk_kept(snapshot, nodes, found.decoded)
        if raw is not None:
            _stage_kept(snapshot, raw, wanted)
        return snapshot
    except BaseException:
        blocks.close()
        keys.close()
        raise
    finally:
        if raw is not None:
            raw.close()


def _walk_kept(snapshot: RepoSnapshot, nodes: dict[bytes, bytes], decoded: dict) -> set[bytes] | None:
    """Walk the whole MST, spooling the keys of the records the scope keeps. Returns the binary CIDs
    of those records when the collection filter drops some (None: every record's block is wanted); that
    set, one CID per kept record, is the memory a filter costs."""
    collections, signal = snapshot.scope.collections, snapshot.scope.signal
    wanted: set[bytes] | None = None if collections.everything else set()
    snapshot.signal_missing = signal is not None
    for collection, rkey, link in walk_links(nodes, bytes(snapshot.commit.data), decoded):
        if collection == signal:
            snapshot.signal_missing = False
        if not collections.matches(collection):
            continue
        snapshot.keys.append((collection, rkey, cid_text(link), link), _ROW_BYTES + len(rkey))
        snapshot.collections[collection] += 1
        if wanted is not None:
            wanted.add(link)
        if link in nodes:  # a block that is both a reached node and a record: stage it after all
            _stage(snapshot.blocks, link, nodes[link])
    return wanted


def _stage_kept(snapshot: RepoSnapshot, raw: Spool, wanted: set[bytes] | None) -> None:
    """Stage the kept records' blocks from the raw spool; a repo without its signal keeps none."""
    if snapshot.signal_missing:
        snapshot.keys.close()
        snapshot.blocks.close()
        snapshot.keys, snapshot.blocks = Spool(), Spool()
        snapshot.collections.clear()
        return
    for link, block in raw:
        if wanted is None or link in wanted:
            _stage(snapshot.blocks, link, block)


def verify_snapshot(snapshot: RepoSnapshot, signing_key: str) -> None:
    """Check the commit signature against the DID document's #atproto key (SignatureError if not)."""
    verify_commit(snapshot.commit_block, signing_key)

