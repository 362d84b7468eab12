"""Follow a host's event stream (subscribeRepos) and apply it to PostgreSQL, resyncing what can't be applied.

Events are read in batches; a batch's changes and the host's cursor (`repo_stream_cursors`) commit in one
transaction, so a follower killed at any point resumes from the last committed event: nothing lost,
nothing applied twice.

- `#commit`: applied to a synced repo when it follows the stored state: its `since` is the stored rev,
  its commit block is present, for this repo and rev, and signed by the DID's key (cached; re-resolved
  once on failure), and every created or updated record's block is present. Events at or below the stored
  rev are replays and skipped. Only records of REPO_COLLECTIONS are stored (the backfill's filter). An event that doesn't follow marks the repo due (desynchronized) and it is
  resynced through getRepo after the batch commits (a failed resync retries with the ledger's backoff).
  An unknown DID (an account created on the host) is added and synced the same way.
- `#sync`: resync the repo. `#identity`: forget its cached DID document. `#account`: inactive with a
  status sets it (a deleted account loses its records, as in the backfill); active again resyncs it.
- `#info` OutdatedCursor: events were missed; every synced repo of the host is made due.

Pure core: no Dagster.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.atproto.car import CarReader
from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.mst import is_valid_nsid, is_valid_record_key, lookup, parse_commit
from migration_assets.atproto.signature import SignatureError, verify_commit
from migration_assets.core.backoff import Backoff
from migration_assets.core.lease import LeaseLost
from migration_assets.repos import ledger, store
from migration_assets.repos.backfill import RepoSyncer, describe
from migration_assets.repos.collections import CollectionFilter
from migration_assets.repos.ledger import GONE_STATUSES
from migration_assets.repos.snapshot import _staged as staged_block  # the backfill's record row: jsonb + U+0000
from migration_assets.repos.stream import (
    AccountEvent, CommitEvent, IdentityEvent, InfoEvent, RepoOp, StreamError, StreamEvent, Subscription, SyncEvent,
    WebSocketException,
)

MAX_BLOCKS_BYTES = 16 * 1024 * 1024
_RECONNECT = Backoff(base=1.0, cap=60.0, floor=0.5)
_RETRYABLE_STREAM_ERRORS = {"ConsumerTooSlow"}
_IDLE_SECONDS = 0.05


@dataclass
class FollowReport:
    host: str
    events: int = 0  # sequenced events committed (with the cursor)
    applied: int = 0  # commits applied to records
    skipped: int = 0  # replays, and events of repos not synced (a resync will catch up)
    desyncs: int = 0  # repos made due because an event didn't follow (or #sync, or a new repo)
    resyncs: int = 0  # repos fetched again with getRepo
    resync_failures: int = 0
    identities: int = 0
    accounts: int = 0
    outdated_cursor: int = 0
    reconnects: int = 0
    malformed: int = 0  # frames that didn't decode, skipped
    cursor: int | None = None
    lag_seconds: float = 0.0  # between the last applied event's time and when it was applied
    seconds: float = 0.0
    last_error: str | None = None
    last_desync: str | None = None  # the latest event that didn't follow, and why

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.events} events ({self.applied} commits applied, {self.skipped} skipped), "
                f"{self.desyncs} desyncs, {self.resyncs} resyncs ({self.resync_failures} failed), "
                f"{self.identities} identity, {self.accounts} account, {self.malformed} malformed frames; "
                f"cursor {self.cursor}; "
                f"lag {self.lag_seconds:.1f} s; {self.events_per_second:.1f} events/s")


@dataclass(frozen=True)
class _Checked:
    """A #commit checked before the transaction (signature, blocks): its records' rows, or why it can't apply."""

    records: dict[CID, tuple] = field(default_factory=dict)  # record CID -> snapshot row (link, json, error, cbor)
    problem: str | None = None


class Follower:
    """Follows one host. `run` reads until `stop` is set or `seconds` pass, committing every batch."""

    def __init__(self, pool: ConnectionPool, host: str, syncer: RepoSyncer, *, buckets: int,
                 batch_size: int = 200, batch_seconds: float = 0.5, start_cursor: int | None = 0,
                 on_batch: Callable[[FollowReport], None] | None = None) -> None:
        self.pool, self.host, self.syncer = pool, host.rstrip("/"), syncer
        self.buckets, self.batch_size, self.batch_seconds = buckets, batch_size, batch_seconds
        self.on_batch = on_batch
        self.start_cursor = start_cursor
        self.report = FollowReport(self.host)
        self.collections = syncer.settings.scope.collections  # REPO_COLLECTIONS: the backfill's filter
        # Repos a bucket run held while newer commits went by: {did: newest rev seen}. Once the run has
        # stored its (maybe older) snapshot, a repo still behind is resynced.
        self._behind_claims: dict[str, str] = {}

    # --- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, seconds: float | None = None) -> FollowReport:
        stop = stop or threading.Event()
        started = time.monotonic()
        deadline = None if seconds is None else started + seconds
        failures = 0
        with self.pool.connection() as conn:
            stored = load_cursor(conn, self.host)
        # First follow of a host: replay what it keeps (0), so changes since the backfill aren't missed.
        self.report.cursor = self.start_cursor if stored is None else stored
        while not stop.is_set() and not _past(deadline):
            try:
                with Subscription(self.host, self.report.cursor) as subscription:
                    failures = 0
                    try:
                        self._follow(subscription, stop, deadline)
                    finally:
                        self.report.malformed += subscription.malformed
            except (WebSocketException, OSError, StreamError) as exc:
                if isinstance(exc, StreamError) and exc.error not in _RETRYABLE_STREAM_ERRORS:
                    raise  # FutureCursor and the like: reconnecting would get the same answer
                failures += 1
                self.report.reconnects += 1
                self.report.last_error = describe(exc)
                if not _RECONNECT.sleep(failures, stop):
                    break
            finally:
                self.report.seconds = time.monotonic() - started
        return self.report

    def _follow(self, subscription: Subscription, stop: threading.Event, deadline: float | None) -> None:
        while not stop.is_set() and not _past(deadline):
            batch = self._read_batch(subscription, stop, deadline)
            if batch or self._behind_claims:
                self.apply(batch)

    def _read_batch(self, subscription: Subscription, stop: threading.Event, deadline: float | None) -> list[StreamEvent]:
        """Up to `batch_size` events; the batch closes after `batch_seconds`, or as soon as the stream
        pauses (`_IDLE_SECONDS`), so a quiet stream's events don't wait for a full batch."""
        batch: list[StreamEvent] = []
        until = time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_size and not stop.is_set() and not _past(deadline):
            wait = until - time.monotonic()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            if batch:
                wait = min(wait, _IDLE_SECONDS)
            if wait <= 0:
                break
            event = subscription.next(timeout=wait)
            if event is None and batch:
                break
            if event is not None:
                batch.append(event)
        return batch

    # --- one batch ------------------------------------------------------------------------------------

    def apply(self, batch: list[StreamEvent]) -> None:
        """Apply the events and store the cursor in one transaction, then resync the repos that need it.
        The repos' states are read (and locked) once per batch and record writes are pipelined: a batch
        costs a few round trips, not several per event."""
        checked = {id(e): self._check_commit(e) for e in batch if isinstance(e, CommitEvent)}
        resync: list[str] = []
        cursor, last_time = self.report.cursor, None
        with self.pool.connection() as conn, conn.transaction():
            resync += self._recheck_claimed(conn)
            states = ledger.lock_states(conn, [e.repo for e in batch if isinstance(e, CommitEvent)])
            writes = _BatchWrites(conn)
            with conn.pipeline():
                for event in batch:
                    resync += self._apply_event(conn, event, checked.get(id(event)), states, writes)
                    if not isinstance(event, InfoEvent):
                        cursor, last_time = event.seq, event.time
            with conn.pipeline():
                writes.finish()
                if cursor is not None:
                    save_cursor(conn, self.host, cursor)
        self.report.cursor = cursor
        self.report.events += sum(not isinstance(e, InfoEvent) for e in batch)
        if last_time is not None:
            self.report.lag_seconds = max(0.0, (datetime.now(timezone.utc) - last_time).total_seconds())
        self._resync(resync)
        if self.on_batch:
            self.on_batch(self.report)

    def _apply_event(self, conn: psycopg.Connection, event: StreamEvent, checked: "_Checked | None",
                     states: dict[str, tuple[str, str | None]], writes: "_BatchWrites") -> list[str]:
        if isinstance(event, CommitEvent):
            return self._apply_commit(conn, event, checked, states, writes)
        if isinstance(event, IdentityEvent):
            self.syncer.resolver.invalidate(event.did)
            self.report.identities += 1
            return []
        if isinstance(event, InfoEvent):
            if event.name == "OutdatedCursor":
                self.report.outdated_cursor += 1
                self.report.desyncs += ledger.make_host_due(conn, self.host)
            return []
        states.pop(event.did, None)  # #sync and #account change the ledger row: read it again when needed
        if isinstance(event, SyncEvent):
            return self._apply_sync(conn, event)
        return self._apply_account(conn, event)

    def _check_commit(self, event: CommitEvent) -> _Checked:
        """Everything about a #commit that needs no database: blocks, commit, signature (network)."""
        if event.too_big:
            return _Checked(problem="the host left the diff out (tooBig)")
        try:
            blocks = dict(CarReader(iter([event.blocks]), max_size=MAX_BLOCKS_BYTES))
            commit_block = blocks.get(event.commit)
            if commit_block is None:
                return _Checked(problem=f"commit block {event.commit} is missing from the event's blocks")
            commit = parse_commit(commit_block)
            if (commit.did, commit.rev) != (event.repo, event.rev):
                return _Checked(problem=f"the commit is {commit.did} rev {commit.rev}, the event {event.repo} rev {event.rev}")
            if self.syncer.settings.verify_signatures:
                self._verify(event.repo, commit_block)
            records = {}
            for op in event.ops:
                if problem := _op_problem(op, blocks, commit.data):
                    return _Checked(problem=problem)
                if op.action == "delete" or not self.collections.matches(op.collection_rkey[0]):
                    continue  # a record outside REPO_COLLECTIONS is checked against the tree, never stored
                if op.cid not in blocks:
                    return _Checked(problem=f"record block of {op.action} {op.path} is missing from the event")
                row = staged_block(op.cid, blocks[op.cid])
                if row[1] is None:  # as in the backfill: a record that isn't DAG-CBOR fails its repo
                    return _Checked(problem=f"record {op.path} ({op.cid}) is not valid DAG-CBOR: {row[2]}")
                records[op.cid] = row
            return _Checked(records)
        except AtprotoError as exc:  # bad blocks or signature, or the DID didn't resolve: the resync decides
            return _Checked(problem=describe(exc))

    def _verify(self, did: str, commit_block: bytes) -> None:
        try:
            verify_commit(commit_block, self.syncer.resolver.resolve(did).signing_key)
        except SignatureError:  # the key may have rotated: re-resolve once
            verify_commit(commit_block, self.syncer.resolver.resolve(did, fresh=True).signing_key)

    def _apply_commit(self, conn: psycopg.Connection, event: CommitEvent, checked: _Checked,
                      states: dict[str, tuple[str, str | None]], writes: "_BatchWrites") -> list[str]:
        if event.repo not in states:
            states.update(ledger.lock_states(conn, [event.repo]))
        status, rev = states.get(event.repo, (None, None))
        if status is None:
            states[event.repo] = ("pending", None)
            return self._due(conn, event.repo)  # an account new to us: backfill it
        if status == "in_progress" and (rev is None or event.rev > rev):
            self._behind_claims[event.repo] = max(event.rev, self._behind_claims.get(event.repo, ""))
        if status != "synced" or (rev is not None and event.rev <= rev):
            self.report.skipped += 1  # a resync is due or running, the account is inactive, or a replay
            return []
        if checked.problem is None and event.since != rev:
            checked = _Checked(problem=f"event since {event.since}, stored rev {rev}: events were missed")
        if checked.problem is not None:
            states[event.repo] = ("pending", rev)
            return self._due(conn, event.repo, f"desynchronized at rev {event.rev}: {checked.problem}")
        writes.commit(event, checked.records, self.collections)
        states[event.repo] = (status, event.rev)
        self.report.applied += 1
        return []

    def _recheck_claimed(self, conn: psycopg.Connection) -> list[str]:
        rows = conn.execute("SELECT did, status, rev FROM repos WHERE did = ANY(%s) AND status <> 'in_progress'",
                            (list(self._behind_claims),)).fetchall() if self._behind_claims else []
        resync = []
        for did, status, rev in rows:
            seen = self._behind_claims.pop(did)
            if status == "synced" and (rev is None or rev < seen):
                resync += self._due(conn, did, f"a bucket run stored rev {rev} while the stream went on to {seen}")
        return resync

    def _apply_sync(self, conn: psycopg.Connection, event: SyncEvent) -> list[str]:
        """The host can't give a diff (or the account is new): resync, unless we already hold that rev."""
        row = conn.execute("SELECT rev FROM repos WHERE did = %s", (event.did,)).fetchone()
        if row is not None and row[0] is not None and event.rev <= row[0]:
            self.report.skipped += 1
            return []
        return self._due(conn, event.did)

    def _apply_account(self, conn: psycopg.Connection, event: AccountEvent) -> list[str]:
        self.report.accounts += 1
        row = conn.execute("SELECT status FROM repos WHERE did = %s", (event.did,)).fetchone()
        if row is None:
            return self._due(conn, event.did) if event.active else []
        if event.active:
            return self._due(conn, event.did) if row[0] in GONE_STATUSES else []
        reason = f"#account event: {event.status or 'inactive'}"
        if event.status == "deleted":
            store.delete_repo(conn, event.did, None, reason)  # a savepoint inside this batch's transaction
        elif event.status in GONE_STATUSES:
            store.mark_gone(conn, event.did, event.status, None, reason)
        return []  # throttled, desynchronized: the host's own states; nothing to change here

    def _due(self, conn: psycopg.Connection, did: str, reason: str | None = None) -> list[str]:
        ledger.request_sync(conn, [did], self.buckets)
        if reason:
            self.report.last_desync = f"{did}: {reason}"
            conn.execute("UPDATE repos SET last_error = %s WHERE did = %s", (reason[:2000], did))
        self.report.desyncs += 1
        return [did]

    def _resync(self, dids: list[str]) -> None:
        """getRepo each repo made due by this batch (after its commit: the stream doesn't wait on a lock)."""
        lease = ledger.repo_lease(self.syncer.settings.lease_seconds)
        for did in dict.fromkeys(dids):  # one claim at a time: no lease waits behind another repo's fetch
            with self.pool.connection() as conn:
                claimed = ledger.claim_dids(conn, lease, [did])
            for repo in claimed:
                try:
                    outcome = self.syncer.sync(repo, lease)
                except LeaseLost:
                    continue  # a bucket run took it over (this fetch outlived the lease): that run syncs it
                self.report.resyncs += 1
                if outcome.status in ("retry", "rate_limited"):
                    self.report.resync_failures += 1
                    self.report.last_error = outcome.error


def _op_problem(op: RepoOp, blocks: dict[CID, bytes], data: CID) -> str | None:
    """Why an op can't be trusted, if it can't: a bad path, or it disagrees with the signed tree (the
    event's MST nodes must put the op's CID at its path, or nothing for a delete)."""
    collection, rkey = op.collection_rkey
    if not (is_valid_nsid(collection) and is_valid_record_key(rkey)):
        return f"op path {op.path[:200]!r} is not collection/record-key"
    expected = None if op.action == "delete" else op.cid
    if expected is None and op.action != "delete":
        return f"{op.action} {op.path} has no record CID"
    found = lookup(blocks, data, op.path)
    if found != expected:
        return f"{op.action} {op.path} disagrees with the signed commit's tree (holds {found}, op says {expected})"
    return None


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


# --- writes (the records the same way the backfill stores them) -------------------------------------------

_UPSERT_RECORD = """
    INSERT INTO records (did, collection, rkey, cid, record, record_cbor) VALUES (%s, %s, %s, %s, %s::jsonb, %s)
    ON CONFLICT (did, collection, rkey)
    DO UPDATE SET cid = excluded.cid, record = excluded.record, record_cbor = excluded.record_cbor, indexed_at = now()
    RETURNING CASE WHEN xmax = 0 THEN 1 ELSE 0 END"""
_DELETE_RECORD = "DELETE FROM records WHERE did = %s AND collection = %s AND rkey = %s RETURNING -1"


class _BatchWrites:
    """A batch's record writes, each on its own cursor so they can be sent pipelined and their results
    (+1 a record created, -1 one deleted) read afterwards; then the per-collection counts and the
    ledger's head, rev and record count are written once per repo."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.sent: list[tuple[psycopg.Cursor, str, str]] = []  # (cursor, did, collection)
        self.heads: dict[str, tuple[str, str]] = {}  # did -> (head, rev) of its last applied commit

    def commit(self, event: CommitEvent, records: dict[CID, tuple], collections: CollectionFilter) -> None:
        for op in event.ops:
            collection, rkey = op.collection_rkey
            if not collections.matches(collection):
                continue
            cur = self.conn.cursor()
            if op.action == "delete":
                cur.execute(_DELETE_RECORD, (event.repo, collection, rkey))
            else:
                _, text, _, exact = records[op.cid]
                cur.execute(_UPSERT_RECORD, (event.repo, collection, rkey, str(op.cid), text, exact))
            self.sent.append((cur, event.repo, collection))
        self.heads[event.repo] = (str(event.commit), event.rev)

    def finish(self) -> None:
        """After the writes' results arrived (the pipeline synced)."""
        by_collection: Counter = Counter()
        for cur, did, collection in self.sent:
            row = cur.fetchone()
            by_collection[(did, collection)] += row[0] if row else 0
        by_repo: Counter = Counter()
        with self.conn.cursor() as cur:
            for (did, collection), change in by_collection.items():
                by_repo[did] += change
                if change:
                    add_collection_count(cur, did, collection, change)
            for did, (head, rev) in self.heads.items():
                ledger.advance_head(cur, did, head, rev, by_repo[did])


def add_collection_count(cur: psycopg.Cursor, did: str, collection: str, change: int) -> None:
    cur.execute(
        """INSERT INTO repo_collection_counts AS c (did, collection, records) VALUES (%s, %s, %s)
           ON CONFLICT (did, collection) DO UPDATE SET records = c.records + excluded.records""",
        (did, collection, change),
    )
    cur.execute("DELETE FROM repo_collection_counts WHERE did = %s AND collection = %s AND records <= 0",
                (did, collection))


# --- the stream's cursor, kept in the same transaction as the changes it covers -----------------------


def load_cursor(conn: psycopg.Connection, host: str) -> int | None:
    row = conn.execute("SELECT cursor FROM repo_stream_cursors WHERE host = %s", (host,)).fetchone()
    return row[0] if row else None


def save_cursor(conn: psycopg.Connection, host: str, cursor: int) -> None:
    conn.execute(
        """INSERT INTO repo_stream_cursors (host, cursor) VALUES (%s, %s)
           ON CONFLICT (host) DO UPDATE SET cursor = excluded.cursor, updated_at = now()""",
        (host, cursor),
    )
