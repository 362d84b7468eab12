"""Checking a #commit event before it is applied: its blocks, its commit (for this repo and rev, signed
by the DID's key), each op against the signed tree, and the JSON form of the records it writes.

The check needs neither the database nor the network (the signing key is resolved by the caller), so
a batch can be checked in worker processes while the previous batch is written: `CommitChecker`.
Workers are spawned, not forked: the follower has threads (the WebSocket reader, the pool's) that a
fork would copy mid-flight. Pure core: no Dagster.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace

from migration_assets.atproto.car import read_blocks
from migration_assets.atproto.cid import link_text
from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.mst import lookup, parse_signed_commit
from migration_assets.atproto.syntax import is_valid_nsid, is_valid_record_key
from migration_assets.atproto.signature import SignatureError, verify_commit
from migration_assets.core.concurrency import leave_with_parent
from migration_assets.repos.collections import CollectionFilter
from migration_assets.repos.snapshot import record_json

log = logging.getLogger(__name__)

MAX_BLOCKS_BYTES = 16 * 1024 * 1024

Op = tuple[str, str, bytes | None]  # (action, path, record CID in binary): a RepoOp without its pydantic model


@dataclass(frozen=True)
class CommitToCheck:
    """What the check needs of a #commit event: small and cheap to send to a worker process (CIDs in
    binary, not CID objects)."""

    repo: str
    rev: str
    commit: bytes  # the commit's CID, binary
    blocks: bytes  # the event's CAR slice
    ops: tuple[Op, ...]
    too_big: bool = False
    signing_key: str | None = None  # the DID's #atproto key; None: signatures are not checked


@dataclass(frozen=True)
class Checked:
    """A checked #commit: what its writes store, with CIDs as the text the database holds (made here, in
    the worker, not in the follower), or why it can't be applied."""

    records: dict[str, tuple] = field(default_factory=dict)  # path -> (CID text, JSON, exact block) of each record
    head: str | None = None  # the commit's CID
    data: str | None = None  # its signed MST root
    problem: str | None = None
    bad_signature: bool = False  # the problem is the signature: the key may have rotated


def check_commit(item: CommitToCheck, collections: CollectionFilter) -> Checked:
    """Everything about a #commit that needs no database. Records outside `collections` are checked
    against the tree but not staged (they are never stored). The records are staged as the backfill
    stores them: record_json's JSON form (jsonb and U+0000) and exact block."""
    if item.too_big:
        return Checked(problem="the host left the diff out (tooBig)")
    try:
        blocks = read_blocks(item.blocks, max_size=MAX_BLOCKS_BYTES)  # keyed by binary CID: no CID objects
        commit_block = blocks.get(item.commit)
        if commit_block is None:
            return Checked(problem=f"commit block {link_text(item.commit)} is missing from the event's blocks")
        commit, signed = parse_signed_commit(commit_block)  # decoded once, for the signature too
        if (commit.did, commit.rev) != (item.repo, item.rev):
            return Checked(problem=f"the commit is {commit.did} rev {commit.rev}, the event {item.repo} rev {item.rev}")
        if item.signing_key is not None:
            try:
                verify_commit(commit_block, item.signing_key, signed=signed)
            except SignatureError as exc:
                return Checked(problem=str(exc), bad_signature=True)
        records = {}
        root, nodes = bytes(commit.data), {}  # MST nodes decoded by the ops' lookups: a commit's ops share its top nodes
        for action, path, link in item.ops:
            if problem := op_problem(action, path, link, blocks, root, nodes):
                return Checked(problem=problem)
            if action == "delete" or not collections.matches(path.partition("/")[0]):
                continue
            if link not in blocks:
                return Checked(problem=f"record block of {action} {path} is missing from the event")
            text, why, exact = record_json(blocks[link])
            if text is None:  # as in the backfill: a record that isn't DAG-CBOR fails its repo
                return Checked(problem=f"record {path} ({link_text(link)}) is not valid DAG-CBOR: {why}")
            records[path] = (link_text(link), text, exact)
        return Checked(records, link_text(item.commit), str(commit.data))
    except AtprotoError as exc:  # bad blocks or commit: the resync decides
        return Checked(problem=f"{type(exc).__name__}: {exc}")


def op_problem(action: str, path: str, link: bytes | None, blocks: Mapping[bytes, bytes], root: bytes,
               nodes: dict | None = None) -> str | None:
    """Why an op can't be trusted, if it can't: a bad path, or it disagrees with the signed tree (the
    event's MST nodes, rooted at `root`, must put the op's record at its path, or nothing for a delete).
    Blocks and links as binary CIDs."""
    collection, _, rkey = path.partition("/")
    if not (is_valid_nsid(collection) and is_valid_record_key(rkey)):
        return f"op path {path[:200]!r} is not collection/record-key"
    expected = None if action == "delete" else link
    if expected is None and action != "delete":
        return f"{action} {path} has no record CID"
    found = lookup(blocks, root, path, nodes)
    if found != expected:
        found_cid, expected_cid = (None if value is None else link_text(value) for value in (found, expected))
        return f"{action} {path} disagrees with the signed commit's tree (holds {found_cid}, op says {expected_cid})"
    return None


def check_all(items: Sequence[CommitToCheck], collections: CollectionFilter) -> list[Checked]:
    return [check_commit(item, collections) for item in items]


def recheck_with(item: CommitToCheck, signing_key: str, collections: CollectionFilter) -> Checked:
    """Check again with another key (the DID document was re-resolved after a signature failed)."""
    return check_commit(replace(item, signing_key=signing_key), collections)


class CommitChecker:
    """Checks batches of #commits in `processes` worker processes (a batch is split among them), or in
    this process with 0. `submit` returns at once; the result is waited for when it is needed.

    A spawned worker imports the main module again before it can work (about a second under Dagster):
    until the workers are up, batches are checked in this process, so the stream doesn't wait for them."""

    def __init__(self, processes: int, collections: CollectionFilter) -> None:
        self.processes, self.collections = processes, collections
        self._pool: ProcessPoolExecutor | None = None
        self._starting: list[Future] = []
        if processes > 0:
            self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=leave_with_parent, initargs=(os.getpid(),))
            self._starting = [self._pool.submit(check_all, [], collections) for _ in range(processes)]

    @property
    def worker_pids(self) -> list[int]:
        return list(self._pool._processes) if self._pool is not None else []

    def wait_started(self, timeout: float | None = None) -> bool:
        """Whether the workers are up (waiting up to `timeout` for them)."""
        return not wait(self._starting, timeout).not_done

    def submit(self, items: list[CommitToCheck]) -> Callable[[], list[Checked]]:
        if self._pool is None or not items or not self.wait_started(0):
            done = check_all(items, self.collections)
            return lambda: done
        size = -(-len(items) // self.processes)
        try:
            parts: list[Future] = [self._pool.submit(check_all, items[i:i + size], self.collections)
                                   for i in range(0, len(items), size)]
        except BrokenProcessPool as exc:  # the pool already knows a worker died
            done = self._without_workers(items, exc)
            return lambda: done

        def results() -> list[Checked]:
            try:
                return [checked for part in parts for checked in part.result()]
            except BrokenProcessPool as exc:
                return self._without_workers(items, exc)

        return results

    def _without_workers(self, items: list[CommitToCheck], error: BrokenProcessPool) -> list[Checked]:
        """A worker died (killed, out of memory): these and every later batch are checked here."""
        log.warning("commit check workers failed (%s); checking in the follower's process from now on", error)
        self.close()
        return check_all(items, self.collections)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    def __enter__(self) -> CommitChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
