"""Follow a host's event stream (subscribeRepos) and apply it to PostgreSQL, resyncing what can't be applied.

Events are read in batches; a batch's changes and the host's cursor (`repo_stream_cursors`) commit in one
transaction, so a follower killed at any point resumes from the last committed event: nothing lost,
nothing applied twice. A batch's commits are checked (commit_check.py: signature, MST, records) in worker
processes while the previous batch is written, and its record writes are one statement per batch.

- `#commit`: applied to a synced repo when it follows the stored state: its `since` is the stored rev and
  its `prevData` the stored MST root, its commit block is present, for this repo and rev, and signed by the
  DID's key (cached; resolved anew on a failure, at most once a minute per DID), and every created or
  updated record's block is present.
  Events at or below the stored rev are replays and skipped. Only records of REPO_COLLECTIONS are stored
  (the backfill's filter). An event that doesn't follow marks the repo due (desynchronized) and it is
  resynced through getRepo after the batch commits (a failed resync retries with the ledger's backoff).
  An unknown DID (an account created on the host) is added and synced the same way; with
  REPO_SIGNAL_COLLECTION, only once it writes a record in that collection. A repo stored without records
  (no signal record) keeps none until it writes one, and is then synced whole; one whose commit deletes its
  last signal record is resynced, and keeps none from then on.
- `#sync`: resync the repo (one whose last fetch failed waits for its retry). `#identity`: forget its
  cached DID document. `#account`: inactive with a status sets it (a deleted account loses its records,
  as in the backfill); active again resyncs it.
- `#info` OutdatedCursor: events were missed, those made before the next event (the oldest the host keeps):
  every synced repo of the host (of any host, from a relay) not fetched whole since then is made due.

One follower per host: `run` holds the host's lease (follow_lease.py) and every batch's transaction is
fenced by it.

Pure core: no Dagster.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.identity import DidDocument
from migration_assets.atproto.xrpc import host_key
from migration_assets.core.backoff import Backoff
from migration_assets.core.concurrency import completed_map
from migration_assets.core.lease import Heartbeat, Lease, LeaseLost
from migration_assets.repos import follow_lease, ledger, store
from migration_assets.repos.backfill import RepoOutcome, RepoSyncer, describe
from migration_assets.repos.collections import CollectionFilter
from migration_assets.repos.commit_check import Checked, CommitChecker, CommitToCheck, check_commit, recheck_with
from migration_assets.repos.ledger import GONE_STATUSES, HeadAdvance, RepoState
from migration_assets.repos.stream import (
    AccountEvent, CommitEvent, IdentityEvent, InfoEvent, StreamError, StreamEvent, Subscription, SyncEvent,
    WebSocketException, frame_too_big,
)

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
    oversize: int = 0  # frames over MAX_FRAME_BYTES, stepped past (their repos resync when they don't follow)
    cursor: int | None = None
    lag_seconds: float = 0.0  # between the last applied event's time and when it was applied
    seconds: float = 0.0
    last_error: str | None = None
    last_desync: str | None = None  # the latest event that didn't follow, and why
    # Where the time went: reading the stream, waiting for commit checks, the batch transactions.
    reading_seconds: float = 0.0
    check_wait_seconds: float = 0.0
    writing_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.events} events ({self.applied} commits applied, {self.skipped} skipped), "
                f"{self.desyncs} desyncs, {self.resyncs} resyncs ({self.resync_failures} failed), "
                f"{self.identities} identity, {self.accounts} account, {self.malformed} malformed frames, "
                f"{self.oversize} over the size limit; "
                f"cursor {self.cursor}; "
                f"lag {self.lag_seconds:.1f} s; {self.events_per_second:.1f} events/s")


# Events per transaction while catching up (a quiet stream's batches close sooner: see _read_batch). Each
# batch pays its fixed queries, statements and commit once: 1,000 instead of 200 made the follow 8-13%
# faster in bench/repo_stream.py, PostgreSQL's CPU per event a quarter to a third lower. A killed
# follower reads up to one batch again (nothing lost, nothing applied twice).
BATCH_EVENTS = 1000
DEADLOCK_TRIES = 5  # a batch's transaction aborted as a deadlock's victim is tried again, up to this often
# A DID whose commit's signature failed is resolved anew at most this often: a key rotation shows at the
# first failure, and a host sending forged commits does not have the PLC asked once per commit.
RESOLVE_ANEW_SECONDS = 60.0
# A batch's resyncs at once: a burst of desyncs (or of a relay's new accounts) holds the stream up while
# they download; each thread holds one pooled connection at a time (follow_assets.FOLLOW_CONNECTIONS).
RESYNC_THREADS = 4
GAP_CLOCK_MARGIN = timedelta(minutes=10)  # a repo fetched this soon after a gap's end is made due all the same


class Follower:
    """Follows one host. `run` reads until `stop` is set or `seconds` pass, committing every batch."""

    def __init__(self, pool: ConnectionPool, host: str, syncer: RepoSyncer, *, buckets: int,
                 batch_size: int = BATCH_EVENTS, batch_seconds: float = 0.5, start_cursor: int | None = 0,
                 on_batch: Callable[[FollowReport], None] | None = None, check_processes: int | None = None,
                 checker: CommitChecker | None = None, holder: str | None = None,
                 resync_threads: int = RESYNC_THREADS) -> None:
        self.pool, self.host, self.syncer = pool, host.rstrip("/"), syncer
        self.holder = holder or f"pid {os.getpid()} on {socket.gethostname()}"  # a run's id, in Dagster
        self._lease: Lease | None = None  # the host's, while `run` follows
        self._lease_lost = threading.Event()
        self._host_key = host_key(self.host)
        self.buckets, self.batch_size, self.batch_seconds = buckets, batch_size, batch_seconds
        self.on_batch, self.resync_threads = on_batch, resync_threads
        self.start_cursor = start_cursor
        self.report = FollowReport(self.host)
        scope = syncer.settings.scope
        self.collections, self.signal = scope.collections, scope.signal  # as the backfill stores them
        self.check_processes = syncer.settings.follow_check_processes if check_processes is None else check_processes
        self._checker = CommitChecker(0, self.collections)  # in this process, until `run` starts workers
        self._given_checker = checker  # started by the caller, who closes it (a bench measures without start-up)
        # Repos a bucket run held while newer commits (or a #sync) went by: {did: newest rev seen}. Once the run has
        # stored its (maybe older) snapshot, a repo still behind is resynced.
        self._behind_claims: dict[str, str] = {}
        self._read_seq: int | None = None  # the last seq read from the stream
        self._resolved_anew: dict[str, float] = {}  # did -> when its document was last fetched anew
        self._gap = False  # an OutdatedCursor was read, and no event after it yet
        self._relay = False  # the stream carried a repo hosted elsewhere (saved with the cursor: is_relay)

    # --- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, seconds: float | None = None) -> FollowReport:
        """Hold the host's lease (waiting up to REPO_LEASE_SECONDS for a gone follower's to lapse), then
        follow it. Raises HostBusy when another follower holds it, LeaseLost when one took it over."""
        stop = stop or threading.Event()
        started = time.monotonic()
        lease = follow_lease.hold(self.pool, self.host, self.holder, self.syncer.settings.lease_seconds, stop)
        if lease is None:  # stopped while waiting for the lease
            return self.report
        try:
            with Heartbeat(lease, self.pool.connection) as heartbeat:
                self._lease, self._lease_lost = lease, heartbeat.lost
                return self._run(stop, started, None if seconds is None else started + seconds)
        finally:
            self._lease, self._lease_lost = None, threading.Event()
            follow_lease.release(self.pool, lease)

    def _run(self, stop: threading.Event, started: float, deadline: float | None) -> FollowReport:
        failures, past_oversize = 0, _PastOversize()
        with self.pool.connection() as conn:
            stored = load_cursor(conn, self.host)
        # First follow of a host: replay what it keeps (0), so changes since the backfill aren't missed.
        self.report.cursor = self.start_cursor if stored is None else stored
        inline = self._checker
        self._checker = self._given_checker or CommitChecker(self.check_processes, self.collections)
        try:
            while not stop.is_set() and not _past(deadline):
                try:
                    # Read ahead while a batch is written (the host waits once the queue is full).
                    start = past_oversize.cursor(self.report.cursor)
                    with Subscription(self.host, start, max_queue=2 * self.batch_size) as subscription:
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
                    if frame_too_big(exc) and past_oversize.step(self.report.cursor):
                        self.report.oversize += 1
                        self.report.last_error = (f"{describe(exc)}: the frame after seq {self.report.cursor} is "
                                                  "stepped past (its repo resyncs when its next commit does not follow)")
                    if not _RECONNECT.sleep(failures, stop):
                        break
                finally:
                    self.report.seconds = time.monotonic() - started
        finally:
            if self._checker is not self._given_checker:
                self._checker.close()
            self._checker = inline
        return self.report

    def _follow(self, subscription: Subscription, stop: threading.Event, deadline: float | None) -> None:
        """Read a batch and send its commits to be checked, then write the previous one meanwhile. With a
        batch waiting, an idle stream doesn't hold it back: reading returns at once."""
        pending: tuple[list[StreamEvent], Callable[[], dict[int, Checked]]] | None = None
        self._read_seq = self.report.cursor  # the subscription starts after it
        try:
            while not stop.is_set() and not _past(deadline):
                if self._lease_lost.is_set():  # an idle stream has no batch to find it out
                    raise LeaseLost(f"lost the lease on {self.host}: another follower took it over after this one "
                                    "stopped renewing it (stalled?); it goes on from the last committed event")
                started = time.monotonic()
                batch = self._read_batch(subscription, stop, deadline, waiting=pending is not None)
                self.report.reading_seconds += time.monotonic() - started
                checking = self._submit(batch) if batch else None
                if pending is not None:
                    (events, results), pending = pending, None
                    started = time.monotonic()
                    checked = results()
                    self.report.check_wait_seconds += time.monotonic() - started
                    self._apply_checked(events, checked)
                if checking is not None:
                    pending = (batch, checking)
                elif self._behind_claims:
                    self._apply_checked([], {})
        finally:
            if pending is not None:  # read and checked: commit it before stopping or reconnecting
                self._apply_checked(pending[0], pending[1]())

    def _read_batch(self, subscription: Subscription, stop: threading.Event, deadline: float | None,
                    waiting: bool = False) -> list[StreamEvent]:
        """Up to `batch_size` events; the batch closes after `batch_seconds`, or as soon as the stream
        pauses (`_IDLE_SECONDS`), so a quiet stream's events don't wait for a full batch. `waiting`: a
        batch is waiting to be written, so don't wait for the first event."""
        batch: list[StreamEvent] = []
        until = time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_size and not stop.is_set() and not _past(deadline):
            wait = until - time.monotonic()
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            if waiting and not batch:
                wait = 0.0  # take only what has arrived already
            elif wait <= 0:
                break
            elif batch:
                wait = min(wait, _IDLE_SECONDS)
            try:
                event = subscription.next(timeout=wait)
            except WebSocketException:
                if not batch:
                    raise
                break  # the host hung up: apply what was read (the next read raises it again)
            if event is None:
                break
            seq = getattr(event, "seq", None)  # #info has none
            if seq is not None:
                if self._read_seq is not None and seq <= self._read_seq:
                    self.report.skipped += 1  # the host went back: read already (a seq only grows)
                    continue
                self._read_seq = seq
            batch.append(event)
        return batch

    # --- checking a batch (before its transaction) ----------------------------------------------------

    def apply(self, batch: list[StreamEvent]) -> None:
        """Check and apply one batch (the loop overlaps the two; see `_follow`)."""
        self._apply_checked(batch, self._submit(batch)())

    def _submit(self, batch: list[StreamEvent]) -> Callable[[], dict[int, Checked]]:
        """Send the batch's commits to be checked; returns a call that waits for the results, keyed by
        id(event). Commits of DIDs the ledger doesn't hold are not checked: they are never applied."""
        commits = [e for e in batch if isinstance(e, CommitEvent)]
        closing = [e.did for e in batch if isinstance(e, AccountEvent) and e.status in GONE_STATUSES]
        with self.pool.connection() as conn:
            tracked = ledger.known(conn, {e.repo for e in commits} | set(closing)) if commits or closing else set()
        keys, unresolved = self._signing_keys(batch, tracked)
        self._prefetch([did for did in closing if did in tracked])  # is this host their PDS? (_apply_account)
        items = {id(e): _to_check(e, keys.get(e.repo)) for e in commits if e.repo in tracked and id(e) not in unresolved}
        results = self._checker.submit(list(items.values()))

        def finish() -> dict[int, Checked]:
            checked = dict(zip(items, results()))
            for key, result in checked.items():
                if result.bad_signature:
                    checked[key] = self._with_fresh_key(items[key], result)
            return checked | {key: Checked(problem=problem) for key, problem in unresolved.items()}

        return finish

    def _signing_keys(self, batch: list[StreamEvent], tracked: set[str]) -> tuple[dict[str, str], dict[int, str]]:
        """({did: signing key}, {id(commit): why its key is unknown}), in stream order: an #identity
        event forgets the cached document, so the commits after it are checked against the new key."""
        resolver, verify = self.syncer.resolver, self.syncer.settings.verify_signatures
        failed = self._prefetch([e.repo for e in batch if isinstance(e, CommitEvent) and e.repo in tracked]) if verify else {}
        keys: dict[str, str] = {}
        unresolved: dict[int, str] = {}
        for event in batch:
            if isinstance(event, IdentityEvent):
                resolver.invalidate(event.did)
                keys.pop(event.did, None)
                failed.pop(event.did, None)
            elif verify and isinstance(event, CommitEvent) and event.repo in tracked and event.repo not in keys:
                try:
                    if event.repo in failed:
                        raise failed[event.repo]
                    keys[event.repo] = resolver.resolve(event.repo).signing_key
                except AtprotoError as exc:  # the DID didn't resolve: the resync decides
                    failed[event.repo] = exc
                    unresolved[id(event)] = describe(exc)
            elif isinstance(event, CommitEvent) and event.repo in failed:
                unresolved[id(event)] = describe(failed[event.repo])
        return keys, unresolved

    def _prefetch(self, dids: list[str]) -> dict[str, AtprotoError]:
        """Resolve the DIDs not cached yet, at once rather than one after another (those stored by another
        process in one query), before the batch's transaction needs them; returns the failures."""
        resolver = self.syncer.resolver
        missing = [did for did in dict.fromkeys(dids) if resolver.cached(did) is None]
        stored = resolver.load(missing) if missing else {}
        missing = [did for did in missing if did not in stored]
        if not missing:
            return {}

        def resolve(did: str) -> AtprotoError | None:
            try:
                self.syncer.resolver.resolve(did)
            except AtprotoError as exc:
                return exc
            return None

        with ThreadPoolExecutor(min(8, len(missing)), thread_name_prefix="resolve") as threads:
            return {did: exc for did, exc in zip(missing, threads.map(resolve, missing)) if exc is not None}

    def _with_fresh_key(self, item: CommitToCheck, checked: Checked) -> Checked:
        """The signature failed: the key may have rotated. Resolve the DID anew; check again if it changed."""
        try:
            document = self._resolve_anew(item.repo)
        except AtprotoError as exc:
            return replace(checked, problem=f"{checked.problem}; resolving the DID again: {describe(exc)}")
        key = item.signing_key if document is None else document.signing_key
        return checked if key == item.signing_key else recheck_with(item, key, self.collections)

    def _resolve_anew(self, did: str) -> DidDocument | None:
        """The DID's document fetched again; or, fetched again within RESOLVE_ANEW_SECONDS, the one then
        fetched (None once forgotten)."""
        now = time.monotonic()
        if now - self._resolved_anew.get(did, -RESOLVE_ANEW_SECONDS) < RESOLVE_ANEW_SECONDS:
            return self.syncer.resolver.cached(did)
        if len(self._resolved_anew) >= 10_000:  # only the recent ones matter
            self._resolved_anew = {d: t for d, t in self._resolved_anew.items() if now - t < RESOLVE_ANEW_SECONDS}
        self._resolved_anew[did] = now
        return self.syncer.resolver.resolve(did, fresh=True)

    def _check_now(self, event: CommitEvent) -> Checked:
        """A commit whose repo was not tracked yet when its batch was sent to be checked."""
        keys, unresolved = self._signing_keys([event], {event.repo})
        if unresolved:
            return Checked(problem=unresolved[id(event)])
        item = _to_check(event, keys.get(event.repo))
        checked = check_commit(item, self.collections)
        return self._with_fresh_key(item, checked) if checked.bad_signature else checked

    # --- one batch ------------------------------------------------------------------------------------

    def _apply_checked(self, batch: list[StreamEvent], checked: dict[int, Checked]) -> None:
        """Apply the events and store the cursor in one transaction, then resync the repos that need it.
        A transaction PostgreSQL aborts as a deadlock's victim is tried again: followers of hosts that
        overlap (a relay and a PDS), or a bucket run, can lock the same repos in another order."""
        started = time.monotonic()
        for attempt in range(1, DEADLOCK_TRIES + 1):
            before = (replace(self.report), dict(self._behind_claims), self._gap)
            try:
                resync, cursor, last_time = self._write_batch(batch, checked)
                break
            except psycopg.errors.DeadlockDetected as exc:
                vars(self.report).update(vars(before[0]))  # what the rolled-back attempt counted
                self._behind_claims, self._gap = before[1], before[2]
                if attempt == DEADLOCK_TRIES:
                    raise
                self.report.last_error = f"a batch's transaction was a deadlock's victim; tried again: {exc}"
                time.sleep(0.1 * attempt)
        self.report.writing_seconds += time.monotonic() - started
        self.report.cursor = cursor
        self.report.events += sum(not isinstance(e, InfoEvent) for e in batch)
        if last_time is not None:
            self.report.lag_seconds = max(0.0, (datetime.now(timezone.utc) - last_time).total_seconds())
        self._resync(resync)
        if self.on_batch:
            self.on_batch(self.report)

    def _write_batch(self, batch: list[StreamEvent], checked: dict[int, Checked]
                     ) -> tuple[list[str], int | None, datetime | None]:
        """One transaction: the events and the cursor. The repos' states are read (and locked) once per
        batch and the record writes are one statement: a batch costs a few round trips, not several per
        event. Returns the repos to resync, the cursor and the last event's time."""
        resync: list[str] = []
        cursor, last_time = self.report.cursor, None
        with self.pool.connection() as conn, self._fenced(conn):
            resync += self._recheck_claimed(conn)
            states = ledger.lock_states(conn, [e.repo for e in batch if isinstance(e, CommitEvent)])
            writes = _BatchWrites(self.collections)
            for event in batch:
                if self._gap and not isinstance(event, InfoEvent):
                    writes.flush(conn)
                    self._after_gap(conn, event, states)
                    states.clear()  # read again: some were made due
                if isinstance(event, (AccountEvent, SyncEvent)):
                    writes.flush(conn)  # they read or change what the writes touch: keep the order
                resync += self._apply_event(conn, event, checked.get(id(event)), states, writes)
                if not isinstance(event, InfoEvent):
                    cursor, last_time = event.seq, event.time
            writes.flush(conn)
            resync += self._lost_their_signal(conn, writes.signal_deleted)
            if cursor is not None:
                save_cursor(conn, self.host, cursor, self._relay)
        return resync, cursor, last_time

    def _after_gap(self, conn: psycopg.Connection, oldest: StreamEvent, states: dict[str, RepoState]) -> None:
        """After an OutdatedCursor, `oldest` is the oldest event the host still keeps: only changes made
        before it were missed. The repos they may hide (this host's; any host's when it is a relay) are
        made due unless fetched whole since (GAP_CLOCK_MARGIN: the host's clock is not ours). Done in the
        transaction that first moves the cursor past the gap: a follower stopped before that reads the
        OutdatedCursor again, since its cursor has not moved."""
        relay = (self._relay or is_relay(conn, self.host)
                 or (isinstance(oldest, CommitEvent) and self._hosted_elsewhere(oldest.repo, states.get(oldest.repo))))
        self.report.desyncs += ledger.make_host_due(conn, self.host, every_repo=relay,
                                                    fetched_before=oldest.time + GAP_CLOCK_MARGIN)
        self._gap = False

    def _fenced(self, conn: psycopg.Connection):
        """The batch's transaction, fenced by the host's lease while `run` holds it (LeaseLost: another
        follower took the host over; nothing is written)."""
        return conn.transaction() if self._lease is None else self._lease.holding(conn, self.host, keep=True)

    def _apply_event(self, conn: psycopg.Connection, event: StreamEvent, checked: Checked | None,
                     states: dict[str, RepoState], writes: _BatchWrites) -> list[str]:
        if isinstance(event, CommitEvent):
            return self._apply_commit(conn, event, checked, states, writes)
        if isinstance(event, IdentityEvent):  # its cached document was forgotten when it was read
            self.report.identities += 1
            return []
        if isinstance(event, InfoEvent):
            if event.name == "OutdatedCursor":  # events were missed: seen to at the next event (_after_gap)
                self.report.outdated_cursor += 1
                self._gap = True
            return []
        states.pop(event.did, None)  # #sync and #account change the ledger row: read it again when needed
        if isinstance(event, SyncEvent):
            return self._apply_sync(conn, event)
        return self._apply_account(conn, event)

    def _apply_commit(self, conn: psycopg.Connection, event: CommitEvent, checked: Checked | None,
                      states: dict[str, RepoState], writes: _BatchWrites) -> list[str]:
        if event.repo not in states:
            states.update(ledger.lock_states(conn, [event.repo]))
        state = states.get(event.repo)
        if not self._relay and self._hosted_elsewhere(event.repo, state):
            self._relay = True  # saved with this batch's cursor
        if state is None:
            if self.signal is not None and not _writes_in(event, self.signal):
                self.report.skipped += 1  # not tracked: only repos with a record in the signal collection are
                return []
            states[event.repo] = RepoState("pending")
            return self._due(conn, event.repo)  # an account new to us: backfill it
        if state.status == "in_progress" and (state.rev is None or event.rev > state.rev):
            self._note_behind_claim(event.repo, event.rev)
        if state.status != "synced" or (state.rev is not None and event.rev <= state.rev):
            self.report.skipped += 1  # a resync is due or running, the account is inactive, or a replay
            return []
        checked = checked or self._check_now(event)
        problem = _gap(event, state) or checked.problem
        if problem is None and self.signal is not None and state.signal_missing and _writes_in(event, self.signal):
            problem = f"a record in the signal collection {self.signal}: the repo is tracked from now on"
        if problem is not None:
            states[event.repo] = replace(state, status="pending")
            return self._due(conn, event.repo, f"desynchronized at rev {event.rev}: {problem}")
        stored = not (self.signal is not None and state.signal_missing)  # else no records kept, only the head
        data = writes.commit(event, checked, stored)
        if stored and self.signal is not None and _deletes_in(event, self.signal):
            writes.signal_deleted.add(event.repo)
        states[event.repo] = RepoState(state.status, event.rev, data, state.signal_missing, state.pds)
        self.report.applied += 1
        return []

    def _lost_their_signal(self, conn: psycopg.Connection, dids: set[str]) -> list[str]:
        """Tracked repos that this batch's commits deleted records of the signal collection from, and that
        now have none: the backfill keeps no records of such a repo, so the stream does not either (the
        resync stores it the backfill's way). A signal collection the filter leaves out is not counted:
        only the resync can tell whether a record is left."""
        if not dids:
            return []
        lost = sorted(dids)
        if self.collections.matches(self.signal):
            lost = [row[0] for row in conn.execute(
                """SELECT did FROM unnest(%s::text[]) AS d(did) WHERE NOT EXISTS (
                       SELECT 1 FROM repo_collection_counts c WHERE c.did = d.did AND c.collection = %s AND c.records > 0)""",
                (lost, self.signal)).fetchall()]
        resync = []
        for did in lost:
            resync += self._due(conn, did, f"a commit deleted a record of the signal collection {self.signal}: "
                                           "resynced to keep its records only while one is left")
        return resync

    def _note_behind_claim(self, did: str, rev: str) -> None:
        self._behind_claims[did] = max(rev, self._behind_claims.get(did, ""))

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
        """The host can't give a diff (or the account is new): resync, unless we already hold that rev, or
        the repo's last fetch failed and its retry is not due yet (a host that keeps sending #sync for a
        repo it fails to serve gets a getRepo per ledger backoff, not per event)."""
        row = conn.execute("SELECT rev, next_retry_at > now(), status FROM repos WHERE did = %s",
                           (event.did,)).fetchone()
        if row is None and self.signal is not None:
            self.report.skipped += 1  # not tracked (a signal collection decides which repos are)
            return []
        if row is not None and ((row[0] is not None and event.rev <= row[0]) or row[1]):
            self.report.skipped += 1
            return []
        if row is not None and row[2] == "in_progress":  # a bucket run's fetch may predate it: checked once stored
            self._note_behind_claim(event.did, event.rev)
            self.report.skipped += 1
            return []
        return self._due(conn, event.did)

    def _apply_account(self, conn: psycopg.Connection, event: AccountEvent) -> list[str]:
        self.report.accounts += 1
        row = conn.execute("SELECT status FROM repos WHERE did = %s", (event.did,)).fetchone()
        if row is None:
            return self._due(conn, event.did) if event.active and self.signal is None else []
        if event.active:
            return self._due(conn, event.did) if row[0] in GONE_STATUSES else []
        if event.status not in GONE_STATUSES:
            return []  # throttled, desynchronized: the host's own states; nothing to change here
        if not self._is_its_pds(event.did):  # unknown, a relay, or a host claiming another's account: ask the DID's PDS
            return self._due(conn, event.did, f"#account {event.status} from {self.host}, which is not the "
                                              "DID's PDS: the resync asks its PDS")
        reason = f"#account event: {event.status}"
        if event.status == "deleted":
            store.delete_repo(conn, event.did, None, reason)  # a savepoint inside this batch's transaction
        else:
            store.mark_gone(conn, event.did, event.status, None, reason)
        return []

    def _is_its_pds(self, did: str) -> bool | None:
        """Whether this host is the DID's PDS, as its document (resolved before the batch) says; None when
        the document is not at hand. Only the DID's PDS is believed about the account (an #account event
        is not signed); a stream carrying a repo whose PDS is elsewhere is a relay's."""
        document = self.syncer.resolver.cached(did)
        return None if document is None else self._is_this_host(document.pds_endpoint)

    def _hosted_elsewhere(self, did: str, state: RepoState | None) -> bool:
        """Whether the DID's PDS is another host (a stream carrying its repo is a relay's), as its document
        says. With none at hand (--no-verify resolves none for commits), a repo last fetched from another
        host has its document resolved to confirm: an account that moved here since would otherwise mark
        this PDS a relay for good."""
        its_pds = self._is_its_pds(did)
        if its_pds is None and state is not None and state.pds is not None and not self._is_this_host(state.pds):
            try:
                its_pds = self._is_this_host(self.syncer.resolver.resolve(did).pds_endpoint)
            except AtprotoError:
                return False  # unknown: a stale row alone does not decide
        return its_pds is False

    def _is_this_host(self, url: str) -> bool:
        return url.rstrip("/") == self.host or host_key(url) == self._host_key

    def _due(self, conn: psycopg.Connection, did: str, reason: str | None = None) -> list[str]:
        ledger.request_sync(conn, [did], self.buckets)
        if reason:
            self.report.last_desync = f"{did}: {reason}"
            conn.execute("UPDATE repos SET last_error = %s WHERE did = %s", (ledger.error_text(reason), did))
        self.report.desyncs += 1
        return [did]

    def _resync(self, dids: list[str]) -> None:
        """getRepo the repos made due by this batch (after its commit: the stream doesn't wait on a lock),
        `resync_threads` at a time, each claimed alone: no lease waits behind another repo's fetch."""
        if not dids:
            return
        lease = ledger.repo_lease(self.syncer.settings.lease_seconds)
        for outcome in completed_map(partial(self._resync_one, lease), list(dict.fromkeys(dids)), self.resync_threads):
            if outcome is None:
                continue
            self.report.resyncs += 1
            if outcome.status in ("retry", "rate_limited"):
                self.report.resync_failures += 1
                self.report.last_error = outcome.error

    def _resync_one(self, lease: Lease, did: str) -> RepoOutcome | None:
        """The repo claimed and fetched again; None when a bucket run holds it (that run syncs it)."""
        with self.pool.connection() as conn:
            claimed = ledger.claim_dids(conn, lease, [did])
        for repo in claimed:
            try:
                return self.syncer.sync(repo, lease)
            except LeaseLost:
                return None  # a bucket run took it over (this fetch outlived the lease)
        return None


class _PastOversize:
    """A frame over MAX_FRAME_BYTES closes the connection, and the host sends it again to every reconnect
    from the same cursor: the stream would stay stuck there. Its seq can't be read, but a cursor one
    further asks for what comes after it; sequence numbers may skip, so each time the same cursor meets
    one again, one more. Only the frame that can't be read is passed over; its repo's next commit won't
    follow the stored state and resyncs it (or repo_sync's listing finds its head moved)."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.steps = 0

    def step(self, cursor: int | None) -> bool:
        if cursor is None:
            return False  # following live: a reconnect starts after it anyway
        self.steps = self.steps + 1 if cursor == self.at else 1
        self.at = cursor
        return True

    def cursor(self, stored: int | None) -> int | None:
        """Where to reconnect: past the frames stepped over, while nothing after them was applied."""
        return stored + self.steps if stored is not None and stored == self.at else stored


def _to_check(event: CommitEvent, signing_key: str | None) -> CommitToCheck:
    return CommitToCheck(event.repo, event.rev, bytes(event.commit), event.blocks,
                         tuple((op.action, op.path, None if op.cid is None else bytes(op.cid)) for op in event.ops),
                         event.too_big, signing_key)


def _gap(event: CommitEvent, state: RepoState) -> str | None:
    """Why the event doesn't follow the stored repo, if it doesn't: a commit was missed in between."""
    if event.since != state.rev:
        return f"event since {event.since}, stored rev {state.rev}: events were missed"
    if event.prev_data is not None and state.data is not None and str(event.prev_data) != state.data:
        return f"event prevData {event.prev_data}, stored data root {state.data}: the repo changed in between"
    return None


def _writes_in(event: CommitEvent, collection: str) -> bool:
    return any(op.action != "delete" and op.collection_rkey[0] == collection for op in event.ops)


def _deletes_in(event: CommitEvent, collection: str) -> bool:
    return any(op.action == "delete" and op.collection_rkey[0] == collection for op in event.ops)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


# --- writes (the records the same way the backfill stores them) -------------------------------------------

# The batch's record writes in one statement: upserts and deletes (each record once: its last write in the
# batch), then the per-collection counts moved by what they did (xmax = 0: a row created, not updated).
# Returns each repo's change in records. Arrays go in binary (%b): no text escaping of each element.
_WRITE_RECORDS = """
    WITH written AS (
        INSERT INTO records (did, collection, rkey, cid, record, record_cbor)
        SELECT did, collection, rkey, cid, record::jsonb, record_cbor
        FROM unnest(%(did)b::text[], %(collection)b::text[], %(rkey)b::text[], %(cid)b::text[], %(record)b::text[],
                    %(record_cbor)b::bytea[]) AS w(did, collection, rkey, cid, record, record_cbor)
        WHERE cid IS NOT NULL
        ON CONFLICT (did, collection, rkey)
        DO UPDATE SET cid = excluded.cid, record = excluded.record, record_cbor = excluded.record_cbor, indexed_at = now()
        RETURNING did, collection, CASE WHEN xmax = 0 THEN 1 ELSE 0 END AS change
    ), gone AS (
        DELETE FROM records r
        USING unnest(%(did)b::text[], %(collection)b::text[], %(rkey)b::text[], %(cid)b::text[]) AS d(did, collection, rkey, cid)
        WHERE d.cid IS NULL AND r.did = d.did AND r.collection = d.collection AND r.rkey = d.rkey
        RETURNING r.did, r.collection, -1 AS change
    ), changes AS (
        SELECT did, collection, sum(change)::int AS change FROM (SELECT * FROM written UNION ALL SELECT * FROM gone) c
        GROUP BY did, collection HAVING sum(change) <> 0
    ), counted AS (
        INSERT INTO repo_collection_counts AS c (did, collection, records) SELECT did, collection, change FROM changes
        ON CONFLICT (did, collection) DO UPDATE SET records = c.records + excluded.records
    )
    SELECT did, sum(change)::int, bool_or(change < 0) FROM changes GROUP BY did"""


class _BatchWrites:
    """A batch's applied commits: each record's last write (a row, or None for a delete) and each repo's
    last head, written by `flush` in a few statements."""

    def __init__(self, collections: CollectionFilter) -> None:
        self.collections = collections
        self.records: dict[tuple[str, str, str], tuple | None] = {}  # (did, collection, rkey) -> (cid, json, cbor)
        self.heads: dict[str, tuple[str, str, str]] = {}  # did -> (head, rev, data) of its last applied commit
        self.signal_deleted: set[str] = set()  # repos a commit deleted a signal-collection record from

    def commit(self, event: CommitEvent, checked: Checked, store_records: bool = True) -> str:
        """Stage the commit's writes; returns its data root as text (the repo's state keeps it too)."""
        for op in event.ops if store_records else ():
            collection, rkey = op.collection_rkey
            if not self.collections.matches(collection):
                continue
            self.records[(event.repo, collection, rkey)] = None if op.action == "delete" else checked.records[op.path]
        self.heads[event.repo] = (checked.head, event.rev, checked.data)
        return checked.data

    def flush(self, conn: psycopg.Connection) -> None:
        if not self.heads and not self.records:
            return
        changes: dict[str, int] = {}
        with conn.cursor() as cur:
            if self.records:
                keys, rows = list(self.records), list(self.records.values())
                cur.execute(_WRITE_RECORDS, {
                    "did": [k[0] for k in keys], "collection": [k[1] for k in keys], "rkey": [k[2] for k in keys],
                    "cid": [r and r[0] for r in rows], "record": [r and r[1] for r in rows],
                    "record_cbor": [r and r[2] for r in rows],
                })
                rows_changed = cur.fetchall()
                changes = {did: change for did, change, _ in rows_changed}
                emptied = [did for did, _, fell in rows_changed if fell]
                if emptied:
                    cur.execute("DELETE FROM repo_collection_counts WHERE did = ANY(%s) AND records <= 0", (emptied,))
            ledger.advance_heads(cur, [HeadAdvance(did, head, rev, data, changes.get(did, 0))
                                       for did, (head, rev, data) in self.heads.items()])
        self.records, self.heads = {}, {}


# --- the stream's cursor, kept in the same transaction as the changes it covers -----------------------


def load_cursor(conn: psycopg.Connection, host: str) -> int | None:
    row = conn.execute("SELECT cursor FROM repo_stream_cursors WHERE host = %s", (host,)).fetchone()
    return row[0] if row else None


def save_cursor(conn: psycopg.Connection, host: str, cursor: int, relay: bool = False) -> None:
    """The cursor; and that the host is a relay, once its stream has carried a repo hosted elsewhere."""
    conn.execute(
        """INSERT INTO repo_stream_cursors (host, cursor, relay) VALUES (%s, %s, %s)
           ON CONFLICT (host) DO UPDATE SET cursor = excluded.cursor, updated_at = now(),
               relay = repo_stream_cursors.relay OR excluded.relay""",
        (host, cursor, relay),
    )


def is_relay(conn: psycopg.Connection, host: str) -> bool:
    row = conn.execute("SELECT relay FROM repo_stream_cursors WHERE host = %s", (host,)).fetchone()
    return bool(row and row[0])
