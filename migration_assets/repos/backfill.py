"""Backfill the due repos of some buckets: resolve each DID, fetch its CAR, verify, diff and store.

One repo's failure never fails the others: each ends as an outcome (synced, deleted, deactivated,
takendown, suspended, retry scheduled, rate limited) written to the ledger, even when PostgreSQL
refuses that repo's data. Only losing the target database itself stops the run, since then no
outcome could be recorded.

A run leases its repos a batch at a time (`REPO_CLAIM_BATCH`) and claims the next batch as it works
through them, heartbeating meanwhile, so several runs share one bucket. Every write of a repo's
outcome is fenced by the lease: a run whose lease was taken over writes nothing for that repo
(outcome `lost`) and logs it; the run that took it over syncs it.
"""

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.atproto import xrpc
from migration_assets.atproto.identity import DidDocument, DidNotFound, DidTombstoned, IdentityResolver
from migration_assets.atproto.signature import SignatureError
from migration_assets.core.concurrency import NOT_YET, ByteBudget, HostBusy, HostSlots, completed_map
from migration_assets.core.lease import Heartbeat, Lease, LeaseLost
from migration_assets.repos import ledger, store
from migration_assets.repos.ledger import ClaimedRepo
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.snapshot import RepoSnapshot, read_snapshot, verify_snapshot
from migration_assets.repos.store import RecordChanges

log = logging.getLogger(__name__)

_GONE = {
    xrpc.RepoDeactivated: "deactivated",
    xrpc.RepoTakendown: "takendown",
    xrpc.RepoSuspended: "suspended",
}


class RunStopping(Exception):
    """The run is stopping (an error or an interrupt in its main thread): a download in flight ends at its
    next chunk, and its repo is given back, due again at once (no attempt counted)."""


@dataclass(frozen=True)
class RepoOutcome:
    did: str
    status: str  # synced | deleted | deactivated | takendown | suspended | retry | rate_limited | lost
    records: int = 0
    changes: RecordChanges = RecordChanges()
    car_bytes: int = 0
    error: str | None = None
    retry_at: datetime | None = None
    seconds: float = 0.0


@dataclass
class BackfillReport:
    outcomes: list[RepoOutcome] = field(default_factory=list)
    seconds: float = 0.0
    # host -> repos that waited aside for it at least once, the host holding its share of the downloads
    waited_for_host: Counter = field(default_factory=Counter)

    def by_status(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    @property
    def records_written(self) -> int:
        return sum(o.changes.created + o.changes.updated + o.changes.deleted for o in self.outcomes)

    @property
    def records_seen(self) -> int:
        return sum(o.records for o in self.outcomes)

    @property
    def repos_per_minute(self) -> float:
        return 60 * len(self.outcomes) / self.seconds if self.seconds else 0.0

    @property
    def records_per_second(self) -> float:
        return self.records_seen / self.seconds if self.seconds else 0.0

    def failures(self) -> list[RepoOutcome]:
        return [o for o in self.outcomes if o.status in ("retry", "rate_limited")]


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def is_connection_failure(exc: psycopg.Error) -> bool:
    """The database is unreachable or the session broke: no repo's outcome can be written."""
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def refused_data(did: str, exc: psycopg.Error) -> str:
    return (f"PostgreSQL refused the data of {did} ({describe(exc)}); nothing of it was stored. This is "
            "the repo's data, not the database: it is retried with backoff; if it keeps failing, report "
            f"the record named above and resync it with `migration-assets repos backfill --did {did}`")


class RepoSyncer:
    """Syncs one claimed repo at a time; safe to call from many threads (clients are per PDS host).

    Only the download (with the CAR parse it streams into) is limited to `settings.concurrency` at
    once, and `settings.host_concurrency` of them from any one host; resolving the DID and storing run
    outside that limit, in the extra threads that `backfill_buckets` starts, so the PDSes always have
    `concurrency` downloads in flight."""

    def __init__(self, pool: ConnectionPool, resolver: IdentityResolver,
                 client_for: Callable[[str], xrpc.XrpcClient], settings: RepoSettings) -> None:
        self.pool = pool
        self.resolver = resolver
        self.client_for = client_for
        self.settings = settings
        self.downloads = HostSlots(settings.concurrency, settings.host_concurrency)
        self.whole_cars = ByteBudget(settings.whole_car_memory_bytes)  # shared by every thread's snapshot

    def sync(self, repo: ClaimedRepo, lease: Lease, wait_for_host: bool = True) -> RepoOutcome:
        """Sync one leased repo; every ledger and records write is fenced by `lease` (LeaseLost).
        Unless `wait_for_host`, a repo whose host holds its share of the downloads raises HostBusy
        before anything is written, to be synced later."""
        started = time.monotonic()
        return replace(self._sync(repo, lease, wait_for_host), seconds=time.monotonic() - started)

    def _sync(self, repo: ClaimedRepo, lease: Lease, wait_for_host: bool) -> RepoOutcome:
        did, pds = repo.did, None
        try:
            # Cached for ATPROTO_IDENTITY_TTL_SECONDS; a fetched one is stored with the repo it synced.
            document = self.resolver.resolve(did, save=False)
            pds = document.pds_endpoint
            try:
                return self._fetch_and_store(did, document, lease, wait_for_host)
            except (xrpc.RepoNotFound, SignatureError):
                # The cached identity may be stale: the account moved to another PDS or rotated its
                # key. Resolve once more; only a changed document is worth a second try.
                fresh = self.resolver.resolve(did, fresh=True, save=False)
                if (fresh.pds_endpoint, fresh.signing_key) == (document.pds_endpoint, document.signing_key):
                    raise
                pds = fresh.pds_endpoint
                return self._fetch_and_store(did, fresh, lease, wait_for_host)
        except psycopg.Error as exc:
            if is_connection_failure(exc):
                raise  # the target is failing: no outcome can be recorded, so stop the run
            return self._failed(lease, did, refused_data(did, exc), repo.attempts)
        except (xrpc.RepoNotFound, DidNotFound, DidTombstoned) as exc:
            with self.pool.connection() as conn, lease.holding(conn, did):
                store.delete_repo(conn, did, pds, describe(exc))
            return RepoOutcome(did, "deleted", error=describe(exc))
        except tuple(_GONE) as exc:
            status = _GONE[type(exc)]
            with self.pool.connection() as conn, lease.holding(conn, did):
                store.mark_gone(conn, did, status, pds, describe(exc))
            return RepoOutcome(did, status, error=describe(exc))
        except xrpc.RateLimited as exc:
            retry_at = datetime.fromtimestamp(exc.retry_at, timezone.utc)
            with self.pool.connection() as conn, lease.holding(conn, did):
                store.mark_failed(conn, did, describe(exc), retry_at, count_attempt=False)
            return RepoOutcome(did, "rate_limited", error=describe(exc), retry_at=retry_at)
        except (LeaseLost, RunStopping, HostBusy):
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure of one repo schedules its retry
            return self._failed(lease, did, describe(exc), repo.attempts)

    def _fetch_and_store(self, did: str, document: DidDocument, lease: Lease, wait_for_host: bool) -> RepoOutcome:
        pds = document.pds_endpoint
        with self.fetch(did, pds, lease, wait_for_host) as snapshot:
            if self.settings.verify_signatures:
                verify_snapshot(snapshot, document.signing_key)
            with self.pool.connection() as conn, lease.holding(conn, did):
                changes = store.store_snapshot(conn, snapshot, pds)
                self.resolver.save_fetched(conn, did)
        return RepoOutcome(did, "synced", snapshot.records, changes, snapshot.car_bytes)

    def _failed(self, lease: Lease, did: str, error: str, attempts: int) -> RepoOutcome:
        retry_at = ledger.next_retry_at(attempts + 1)
        with self.pool.connection() as conn, lease.holding(conn, did):
            store.mark_failed(conn, did, error, retry_at, count_attempt=True)
        return RepoOutcome(did, "retry", error=error, retry_at=retry_at)

    def fetch(self, did: str, pds: str, lease: Lease, wait_for_host: bool = True) -> RepoSnapshot:
        """The repo's snapshot; a download in flight when `lease`'s holder stops ends with RunStopping."""
        client = self.client_for(pds)
        # The deadline grows with the bytes moved: the heaviest accounts' exports (hundreds of MB) get
        # the time their size needs at a fair rate, and a host that drips is still cut.
        deadline = client.deadline("com.atproto.sync.getRepo", seconds=self.settings.fetch_timeout_seconds,
                                   min_bytes_per_second=self.settings.fetch_min_bytes_per_second,
                                   max_bytes=self.settings.max_car_bytes,
                                   what=f"getRepo of {did} (for a slow host, raise REPO_FETCH_TIMEOUT_SECONDS "
                                        "or lower REPO_FETCH_MIN_BYTES_PER_SECOND)")
        with self.downloads.hold(xrpc.host_key(pds), wait_for_host):
            if lease.stopping.is_set():  # stopped while this waited for a slot
                raise RunStopping("the run is stopping: the repo was given back before its download")
            with client.stream("com.atproto.sync.getRepo", {"did": did}, deadline=deadline) as response:
                chunks = _until_stopped(response.iter_bytes(), lease)
                return read_snapshot(did, chunks, self.settings.max_car_bytes, self.settings.scope, self.whole_cars)


def _until_stopped(chunks: Iterable[bytes], lease: Lease) -> Iterator[bytes]:
    """The chunks, until the run holding `lease` stops: a big export can take an hour at a fair rate."""
    for chunk in chunks:
        if lease.stopping.is_set():
            raise RunStopping("the run is stopping: the download was cut and the repo given back")
        yield chunk


SyncOne = Callable[[ClaimedRepo, Lease], RepoOutcome]


def backfill_buckets(
    pool: ConnectionPool, syncer: RepoSyncer, buckets: list[int],
    on_outcome: Callable[[RepoOutcome, int, int], None] | None = None,
) -> BackfillReport:
    """Lease the due repos of `buckets` a batch at a time and sync them: `concurrency` downloads at
    a time (the syncer's settings), and as many repos again being resolved or stored meanwhile; a
    repo whose host holds its share of the downloads is put aside for later (HostBusy)."""
    settings = syncer.settings
    return sync_leased(pool, partial(syncer.sync, wait_for_host=False), buckets,
                       ledger.repo_lease(settings.lease_seconds), settings.claim_batch, settings.sync_threads,
                       on_outcome, on_claim=lambda repos: syncer.resolver.load(repo.did for repo in repos),
                       slots=syncer.downloads)


class _PutAside:
    """Repos whose host held its share of the downloads when their turn came (HostBusy): handed out
    again, ahead of new claims, once that host has a slot free. Their threads take other repos
    meanwhile, so a slow host holds its share of the threads too, never all of them."""

    def __init__(self, slots: HostSlots | None) -> None:
        self.slots = slots
        self.by_host: dict[str, deque[ClaimedRepo]] = {}  # hosts with repos aside only
        self.out = 0  # repos handed out and not finished: any of them may still be put aside
        self.again: Counter[str] = Counter()  # of those, the ones handed out again, by host
        self._host_of: dict[str, str] = {}  # did -> host, of the repos handed out again
        self.waited: Counter[str] = Counter()  # host -> repos put aside for it at least once
        self._lock = threading.Lock()

    def handed_out(self, repo: ClaimedRepo, again_to: str | None = None) -> ClaimedRepo:
        with self._lock:
            self.out += 1
            if again_to is not None:
                self.again[again_to] += 1
                self._host_of[repo.did] = again_to
        return repo

    def finished(self, repo: ClaimedRepo, busy_host: str | None) -> None:
        with self._lock:
            self.out -= 1
            if (host := self._host_of.pop(repo.did, None)) is not None:
                self.again[host] -= 1
            if busy_host is None:
                return
            self.by_host.setdefault(busy_host, deque()).append(repo)
            first_for_host = False
            if host is None:  # a repo handed out again was counted when first put aside
                self.waited[busy_host] += 1
                first_for_host = self.waited[busy_host] == 1
        if first_for_host:
            log.info("%s holds its share of the download slots (REPO_HOST_CONCURRENCY): its next repos wait "
                     "aside while the other hosts' go on", busy_host)

    def waiting(self) -> int:
        with self._lock:
            return sum(map(len, self.by_host.values()))

    def ready(self) -> tuple[ClaimedRepo, str] | None:
        """A repo put aside, and its host, if that host has a slot free now and fewer than its share
        handed out again (a slot freed would otherwise send the whole queue to it, all but one to be
        put aside again)."""
        with self._lock:
            for host, repos in self.by_host.items():
                if self.slots is None or (self.slots.has_room(host) and self.again[host] < self.slots.per_host):
                    repo = repos.popleft()
                    if not repos:
                        del self.by_host[host]
                    return repo, host
        return None

    def done(self) -> bool:
        """Nothing put aside, and nothing out that could be."""
        with self._lock:
            return self.out == 0 and not self.by_host


def sync_leased(
    pool: ConnectionPool, sync_one: SyncOne, buckets: list[int], lease: Lease, batch: int, threads: int,
    on_outcome: Callable[[RepoOutcome, int, int], None] | None = None,
    on_claim: Callable[[list[ClaimedRepo]], object] | None = None,
    slots: HostSlots | None = None,
) -> BackfillReport:
    """The claim loop: lease up to `batch` due repos, sync them `threads` at a time while a heartbeat
    renews the lease, claim the next batch once these are handed out, stop when none is left.
    `sync_one` writes each outcome inside `lease.holding`; a repo whose lease was lost ends `lost`.
    `on_claim` sees each claimed batch first (the backfill loads its stored DID documents at once).
    A repo that `sync_one` finds its host busy for (HostBusy, a host at its share of `slots`) is put
    aside and handed out again once that host has room (_PutAside); while `batch` repos are aside,
    no more are claimed (the others are left to the runs sharing the bucket)."""
    started, claimed = time.monotonic(), 0
    aside = _PutAside(slots)
    report = BackfillReport(waited_for_host=aside.waited)

    def attempt(repo: ClaimedRepo) -> RepoOutcome | None:
        busy_host = None
        try:
            if repo.did not in lease.lost:  # else taken over while it waited in this run's queue
                try:
                    return sync_one(repo, lease)
                except HostBusy as busy:
                    busy_host = busy.host
                    return None
                except LeaseLost:
                    pass
                except BaseException:
                    lease.stopping.set()  # the run fails: the downloads in flight end now
                    raise
            return RepoOutcome(repo.did, "lost", error=f"lost the lease on {repo.did}: another run took it "
                               "over after this one stopped renewing it; that run syncs it, this one wrote nothing")
        finally:
            aside.finished(repo, busy_host)

    def claimed_repos() -> Iterator[ClaimedRepo]:
        nonlocal claimed
        run_start = datetime.now(timezone.utc)
        while True:
            with pool.connection() as conn:
                repos = ledger.claim_due(conn, lease, buckets, batch, due_before=run_start)
            if not repos:
                return
            claimed += len(repos)
            if on_claim:
                on_claim(repos)
            yield from repos

    def claims() -> Iterator[ClaimedRepo | object]:
        """Each repo put aside as soon as its host has room, ahead of the claimed ones; while `batch`
        are aside, or once no claim is left, none claimed (NOT_YET meanwhile: outcomes go on)."""
        fresh, left = claimed_repos(), True
        while left or not aside.done():
            if (ready := aside.ready()) is not None:
                yield aside.handed_out(*ready)
            elif left and aside.waiting() < batch:
                repo = next(fresh, None)
                left = repo is not None
                if left:
                    yield aside.handed_out(repo)
            else:
                yield NOT_YET

    outcomes = completed_map(attempt, claims(), threads)
    try:
        with Heartbeat(lease, pool.connection):
            try:
                for outcome in outcomes:
                    if outcome is None:
                        continue  # put aside: handed out again once its host has room
                    report.outcomes.append(outcome)
                    if outcome.status == "lost":
                        log.warning("%s: %s", outcome.did, outcome.error)
                    if on_outcome:
                        on_outcome(outcome, len(report.outcomes), claimed)
            except BaseException:
                lease.stopping.set()  # the downloads in flight end now, not when their repos are done
                raise
            finally:
                outcomes.close()  # waits for the repos in flight, leases still renewed
    finally:
        _give_back(pool, lease)
    report.seconds = time.monotonic() - started
    return report


def _give_back(pool: ConnectionPool, lease: Lease) -> None:
    """Repos claimed but never finished (an error stopped the run): due again at once, not at expiry."""
    if not lease.held:
        return
    try:
        with pool.connection() as conn:
            lease.release(conn, set_sql="status = 'pending', claimed_at = NULL")
    except psycopg.Error as error:
        log.warning("could not give back %d repos (%s); they are due again once their lease expires",
                    len(lease.held), error)
