"""A repo at one commit, read from its CAR export: the commit, and every kept record's (collection,
rkey, CID) with its block, held in memory up to a budget and on local disk past it, so memory stays
flat however big the repo.

Two paths read a CAR, to the same snapshot:
- A CAR that fits in the run's memory for whole CARs (REPO_WHOLE_CAR_MEMORY_BYTES, taken as the bytes
  arrive, given back as the snapshot closes; one CAR at most half of it) is read whole and parsed in
  one call of compiled code (atproto/_fastrepo.c), its rows held in memory for the store's compiled
  COPY lines. It takes what hosts usually write and leaves anything else to:
- the Python parse, the reference, which also reads every CAR that does not fit as it streams. The MST
  nodes the commit reaches stay in memory (a node holds several keys, so they are a fraction of the
  blocks; atproto.repo keeps unreferenced ones out); the commit is kept apart; every other block is
  appended, as the CAR holds it, to a spool. The MST walk then appends each kept record's key to a
  second spool: compiled too (`_fastrepo.walk`, a batch of records at a time), with the Python walk
  taking any tree it leaves. Blocks may come in any order, so nothing is known before the CAR ends,
  and disk is where a big repo waits.

A record's JSON form (see `record_json` for the records that jsonb cannot hold) is made only as the store
COPYs it: by compiled code, in one call for a repo held in memory (`copy_lines`), a batch of blocks per
call for one spooled (`staged_batches`); row by row (`record_rows`, `staged_blocks`) where that leaves
them. Records a collection filter or a missing signal collection leaves out (RecordScope) cost
nothing; the MST is still walked (and so verified) whole.
"""

import json
import marshal
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO


from migration_assets.atproto import dagcbor
from migration_assets.atproto.car import CarError, CarReader
from migration_assets.atproto.cid import CID, link_text
from migration_assets.atproto.compiled import fastrepo as _fastrepo
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.mst import Commit, parse_signed_commit, walk_links
from migration_assets.atproto.repo import collect_repo_blocks
from migration_assets.atproto.signature import verify_commit
from migration_assets.atproto.syntax import is_valid_nsid
from migration_assets.core.concurrency import ByteBudget
from migration_assets.core.postgres import storable
from migration_assets.repos.collections import RecordScope

_BATCH = 1000  # rows per marshal record in a spool file
SPOOL_MEMORY_BYTES = 4 << 20  # per spool: a repo's rows stay in memory up to this, then go to disk
# The whole-CAR share of a caller that brings none (one repo at a time): REPO_WHOLE_CAR_MEMORY_BYTES' default.
WHOLE_CAR_BYTES = 32 << 20
_HELD = sys.maxsize  # a spool that never goes to disk
_WALK_BATCH = 10_000  # records per call of the compiled walk's sink: a big repo's keys never in one list
_ROW_BYTES = 300  # what a spooled row costs in memory besides its variable text (tuple, str and bytes heads)
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

    def extend(self, rows: list[tuple], sizes: list[int]) -> None:
        """Append `rows`, each of the size `append` would be told: as many appends would, in one go
        while they all fit in memory."""
        size = sum(sizes)
        if self._file is None and self._held_bytes + size <= self._memory_bytes:
            self._held.extend(rows)
            self._held_bytes += size
            self.rows += len(rows)
            return
        for row, row_size in zip(rows, sizes):
            self.append(row, row_size)

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
            return iter(self._held)
        return (row for batch in self.batches() for row in batch)

    def batches(self) -> Iterator[list[tuple]]:
        """The rows, a list of at most _BATCH at a time (as a file holds them)."""
        if self._file is None:
            for start in range(0, len(self._held), _BATCH):
                yield self._held[start : start + _BATCH]
            return
        self._flush()
        self._file.seek(0)
        while True:
            try:
                yield marshal.load(self._file)
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
    blocks: Spool = field(repr=False)  # (binary CID, block) of every block but the commit and the MST nodes
    keys: Spool = field(repr=False)  # (collection, rkey, CID, binary CID) in key order, of kept records
    collections: Counter = field(default_factory=Counter)  # kept records per collection
    scope: RecordScope = RecordScope()
    signal_missing: bool = False  # a signal collection is set and the repo has no record in it: none kept
    wanted: set[bytes] | None = field(default=None, repr=False)  # kept records' binary CIDs; None: every block
    signed: tuple[bytes, bytes] | None = field(default=None, repr=False)  # (signed bytes, sig); None: re-encode
    release: Callable[[], None] | None = field(default=None, repr=False)  # gives back its whole-CAR share

    @property
    def records(self) -> int:
        return self.keys.rows

    @property
    def in_memory(self) -> bool:
        """The blocks are in memory, so `record_rows` can look them up (else: `staged_blocks`)."""
        return self.blocks.in_memory

    def record_rows(self) -> Iterator[tuple[str, str, str, str | None, str | None, bytes | None]]:
        """(collection, rkey, CID, record JSON, why none, exact block) of each kept record, in key order;
        all three None for a record whose block the CAR lacks. Only for a snapshot held in memory: the
        blocks are looked up by CID."""
        blocks = dict(self.blocks)
        for collection, rkey, cid, link in self.keys:
            block = blocks.get(link)
            yield (collection, rkey, cid) + (record_json(block) if block is not None else (None, None, None))

    def copy_lines(self, prefix: str, suffix: str) -> bytes | None:
        """Each kept record as a line of COPY's text format, `prefix` collection, rkey, CID, record JSON
        `suffix`, made in one call of compiled code (atproto/_fastrepo.c); None where that leaves the
        rows to `record_rows` (a record with no JSON form, a byte string, U+0000, a block missing) or
        the snapshot is spooled to disk. `prefix` and `suffix` are written as given: COPY text."""
        if _fastrepo is None or not self.in_memory:
            return None
        return _fastrepo.copy_lines(list(self.keys), dict(self.blocks), prefix.encode(), suffix.encode())

    def staged_blocks(self) -> Iterator[tuple[bytes, str | None, str | None, bytes | None]]:
        """(binary CID, record JSON, why none, exact block) of the kept records' blocks, in CAR order, for
        PostgreSQL to join to the keys (a snapshot spooled to disk). A block repeated in the CAR repeats."""
        return self._staged(self.blocks)

    def staged_batches(self) -> Iterator[bytes | list[tuple]]:
        """`staged_blocks`' rows a batch at a time: each batch as COPY text lines of incoming_blocks made
        in one call of compiled code, or as its rows where that leaves it to `record_json`."""
        for batch in self.blocks.batches():
            lines = _fastrepo.staged_lines(batch, self.wanted) if _fastrepo is not None else None
            yield lines if lines is not None else list(self._staged(batch))

    def _staged(self, blocks: Iterable[tuple]) -> Iterator[tuple[bytes, str | None, str | None, bytes | None]]:
        for link, block in blocks:
            if self.wanted is None or link in self.wanted:
                yield link, *record_json(block)

    def close(self) -> None:
        self.blocks.close()
        self.keys.close()
        if self.release is not None:
            self.release, release = None, self.release
            release()

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


def record_json(block: bytes) -> tuple[str | None, str | None, bytes | None]:
    """A record block's (JSON form, why none, exact block). A block that is not DAG-CBOR fails the repo
    only if a record needs it.

    jsonb cannot hold U+0000, which atproto strings may: such a record's JSON form gets U+FFFD in its
    place, and the exact block is kept with it (the check is one scan of the text, for every block)."""
    try:
        text = dagcbor.to_json_text(block)
    except AtprotoFormatError as exc:
        return None, str(exc), None
    if _JSON_NUL in text:  # or a literal backslash before "u0000": then nothing changes below
        readable = _JSON.encode(storable(json.loads(text)))
        if readable != text:
            return readable, None, bytes(block)
    return text, None, None


def read_snapshot(did: str, chunks: Iterable[bytes], max_bytes: int, scope: RecordScope = RecordScope(),
                  whole_cars: ByteBudget | None = None) -> RepoSnapshot:
    """Parse a getRepo CAR stream, keeping the records `scope` selects. Raises CarError / CommitError /
    MstError on a bad export.

    A CAR that fits in `whole_cars` (the memory the caller's threads share for whole CARs; by default
    WHOLE_CAR_BYTES of its own), and in half of it, is parsed by the compiled path when it takes it (the
    usual export), its share held until the snapshot closes; anything it leaves, and every CAR that does
    not fit, streams through the Python parse, which is the reference: it decides and words every refusal."""
    counted = _Counting(chunks)
    budget = whole_cars or ByteBudget(WHOLE_CAR_BYTES)
    # Half the share at most: one export growing past it cannot hold all of it while it downloads.
    limit = min(max_bytes, budget.limit // 2) if _fastrepo is not None else 0
    whole, rest = _whole_if_it_fits(counted, limit, budget)
    if whole is None:
        return _read_streaming(did, rest, counted, max_bytes, scope)
    share, held = len(whole), False
    try:
        snapshot = _read_whole(did, whole, scope)
        if snapshot is None:  # left to the Python parse, the CAR held until it is done
            return _read_streaming(did, iter([whole]), counted, max_bytes, scope)
        held = not snapshot.signal_missing  # else nothing is kept
    finally:
        if not held:
            budget.give(share)
    if held:
        snapshot.release = lambda: budget.give(share)  # the CAR itself is let go: the rows are copies
    return snapshot


def _whole_if_it_fits(chunks: Iterable[bytes], limit: int, budget: ByteBudget) -> tuple[bytes | None, Iterator[bytes]]:
    """(the whole CAR, nothing left) if the stream ends within `limit` bytes and `budget` has room for
    them, taken from it; else (None, every chunk, those read so far first, each let go as it is read)."""
    stream, read, size = iter(chunks), deque(), 0
    try:
        for chunk in stream:
            read.append(chunk)
            size += len(chunk)
            if size > limit or not budget.take(len(chunk)):
                budget.give(size - len(chunk))
                return None, _drained_then(read, stream)
    except BaseException:  # the download failed or was cut
        budget.give(size)
        raise
    return b"".join(read), iter(())


def _drained_then(read: deque, stream: Iterator[bytes]) -> Iterator[bytes]:
    while read:
        yield read.popleft()
    yield from stream


def _read_whole(did: str, car: bytes, scope: RecordScope) -> RepoSnapshot | None:
    """The snapshot through the compiled parse, or None where it leaves the CAR to the Python parse. Its
    rows stay in memory whatever their size: the whole-CAR share the caller took covers them."""
    if _fastrepo is None:
        return None
    commits = []

    def data_root(block: bytes) -> bytes:  # the commit decoded once, for the signature too
        commits.append((block, *parse_signed_commit(block)))
        return bytes(commits[-1][1].data)

    parsed = _fastrepo.parse(car, data_root)
    if parsed is None:
        return None
    head, records, blocks = parsed
    counts = Counter(collection for collection, _, _, _ in records)
    if not all(map(is_valid_nsid, counts)):
        return None
    commit_block, commit, signed = commits[0]
    _check_commit_did(commit, did)
    snapshot = RepoSnapshot(did, CID.from_bytes(head), commit, commit_block, len(car), Spool(_HELD), Spool(_HELD),
                            scope=scope, signed=signed)
    try:
        _keep(snapshot, records, blocks, counts)
    except BaseException:
        snapshot.close()
        raise
    return snapshot


def _keep(snapshot: RepoSnapshot, records: list[tuple], blocks: list[tuple], counts: Counter) -> None:
    """What `_walk_kept` keeps of a whole walk's records, the blocks with them."""
    signal = snapshot.scope.signal
    snapshot.signal_missing = signal is not None and signal not in counts
    if snapshot.signal_missing:
        return
    snapshot.wanted = None if snapshot.scope.collections.everything else set()
    _keep_keys(snapshot, records, counts)
    snapshot.blocks.extend(blocks, [_ROW_BYTES + len(block) for _, block in blocks])


def _keep_keys(snapshot: RepoSnapshot, records: list[tuple], counts: Counter) -> None:
    """The keys of `records` (rows of the compiled walk, `counts` theirs by collection) that the scope's
    collection filter keeps, into the snapshot's keys, counts and `wanted`."""
    collections = snapshot.scope.collections
    if not collections.everything:
        records = [row for row in records if collections.matches(row[0])]
        snapshot.wanted.update(row[3] for row in records)
        counts = Counter(row[0] for row in records)
    snapshot.collections.update(counts)
    snapshot.keys.extend(records, [_ROW_BYTES + len(rkey) for _, rkey, _, _ in records])


def _check_commit_did(commit: Commit, did: str) -> None:
    if commit.did != did:
        raise CarError(f"the CAR's commit is for {commit.did}, not {did}; the PDS served another repo")


def _read_streaming(did: str, chunks: Iterable[bytes], counted: "_Counting", max_bytes: int,
                    scope: RecordScope) -> RepoSnapshot:
    """The Python parse, as the CAR streams: memory holds the MST nodes, the rest spools past its budget."""
    reader = CarReader(chunks, max_size=max_bytes)
    head = reader.roots[0]
    blocks, keys = Spool(), Spool()
    try:
        found = collect_repo_blocks(reader.links(), bytes(head),
                                    lambda link, block: blocks.append((link, block), _ROW_BYTES + len(block)))
        commit = found.commit
        if found.commit_block is None or commit is None:
            raise CarError(f"the CAR's root (commit {head}) is not among its blocks; the export is incomplete")
        _check_commit_did(commit, did)
        snapshot = RepoSnapshot(did, head, commit, found.commit_block, counted.total, blocks, keys, scope=scope,
                                signed=found.signed)
        _walk_kept(snapshot, found.nodes, found.decoded)
        return snapshot
    except BaseException:
        blocks.close()
        keys.close()
        raise


def _walk_kept(snapshot: RepoSnapshot, nodes: dict[bytes, bytes], decoded: dict) -> None:
    """Walk the whole MST, spooling the keys of the records the scope keeps. When the collection filter
    drops some, the snapshot's `wanted` holds the binary CIDs of those kept (one per kept record: the
    memory a filter costs); a repo without its signal collection keeps none."""
    collections, signal = snapshot.scope.collections, snapshot.scope.signal
    if not _walked_compiled(snapshot, nodes):
        snapshot.wanted = None if collections.everything else set()
        snapshot.signal_missing = signal is not None
        for collection, rkey, link in walk_links(nodes, bytes(snapshot.commit.data), decoded):
            if collection == signal:
                snapshot.signal_missing = False
            if not collections.matches(collection):
                continue
            snapshot.keys.append((collection, rkey, link_text(link), link), _ROW_BYTES + len(rkey))
            snapshot.collections[collection] += 1
            if snapshot.wanted is not None:
                snapshot.wanted.add(link)
            if link in nodes:  # a block that is both a reached node and a record: a record's after all
                snapshot.blocks.append((link, nodes[link]), _ROW_BYTES + len(nodes[link]))
    if snapshot.signal_missing:
        snapshot.close()
        snapshot.blocks, snapshot.keys, snapshot.wanted = Spool(), Spool(), None
        snapshot.collections.clear()


class _LeftToPython(Exception):
    """The compiled walk met what the Python walk decides: a collection that is not a valid NSID (it
    words the error), or a record whose block was held with the nodes (it keeps that block)."""


def _walked_compiled(snapshot: RepoSnapshot, nodes: dict[bytes, bytes]) -> bool:
    """The walk through compiled code (_fastrepo.walk), its records kept a batch at a time; False, with
    nothing kept, where it leaves the tree to the Python walk."""
    if _fastrepo is None:
        return False
    signal = snapshot.scope.signal
    checked: set[str] = set()
    snapshot.wanted = None if snapshot.scope.collections.everything else set()
    snapshot.signal_missing = signal is not None

    def keep(records: list[tuple]) -> None:
        counts = Counter(collection for collection, _, _, _ in records)
        if not all(map(is_valid_nsid, counts.keys() - checked)) or any(row[3] in nodes for row in records):
            raise _LeftToPython
        checked.update(counts)
        if signal in counts:
            snapshot.signal_missing = False
        _keep_keys(snapshot, records, counts)

    try:
        if _fastrepo.walk(nodes, bytes(snapshot.commit.data), keep, _WALK_BATCH) is not None:
            return True
    except _LeftToPython:
        pass
    snapshot.keys.close()  # what the compiled walk kept is walked again
    snapshot.keys = Spool()
    snapshot.collections.clear()
    return False


def verify_snapshot(snapshot: RepoSnapshot, signing_key: str) -> None:
    """Check the commit signature against the DID document's #atproto key (SignatureError if not)."""
    verify_commit(snapshot.commit_block, signing_key, signed=snapshot.signed)

