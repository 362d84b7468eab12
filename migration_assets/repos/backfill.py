"""Backfill the due repos of some buckets: resolve each DID, fetch its CAR, verify, diff and store.

One repo's failure never fails the others: each ends as an outcome (synced, deleted, deactivated,
takendown, suspended, retry scheduled, rate limited) written to the ledger. Only a failure of the
target database itself stops the run, since then no outcome could be recorded.
"""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import psycopg
from psycopg_pool import ConnectionPool

from migration_assets.atproto import xrpc
from migration_assets.atproto.identity import DidNotFound, DidTombstoned, IdentityResolver
from migration_assets.core.concurrency import ordered_map
from migration_assets.repos import ledger, store
from migration_assets.repos.ledger import ClaimedRepo
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.snapshot import RepoSnapshot, read_snapshot, verify_snapshot
from migration_assets.repos.store import RecordChanges

_GONE = {
    xrpc.RepoDeactivated: "deactivated",
    xrpc.RepoTakendown: "takendown",
    xrpc.RepoSuspended: "suspended",
}


@dataclass(frozen=True)
class RepoOutcome:
    did: str
    status: str  # synced | deleted | deactivated | takendown | suspended | retry | rate_limited
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


class RepoSyncer:
    """Syncs one claimed repo at a time; safe to call from many threads (clients are per PDS host).

    Only the download (with the CAR parse it streams into) is limited to `settings.concurrency` at
    once; resolving the DID and storing run outside that limit, in the extra threads that
    `backfill_buckets` starts, so the PDSes always have `concurrency` downloads in flight."""

    def __init__(self, pool: ConnectionPool, resolver: IdentityResolver,
                 client_for: Callable[[str], xrpc.XrpcClient], settings: RepoSettings) -> None:
        self.pool = pool
        self.resolver = resolver
        self.client_for = client_for
        self.settings = settings
        self._downloads = threading.BoundedSemaphore(settings.concurrency)

    def sync(self, repo: ClaimedRepo) -> RepoOutcome:
        started = time.monotonic()
        return replace(self._sync(repo), seconds=time.monotonic() - started)

    def _sync(self, repo: ClaimedRepo) -> RepoOutcome:
        did, pds = repo.did, None
        try:
            self.resolver.invalidate(did)  # a moved account must be fetched from its new PDS
            document = self.resolver.resolve(did)
            pds = document.pds_endpoint
            with self.fetch(did, pds) as snapshot:
                if self.settings.verify_signatures:
                    verify_snapshot(snapshot, document.signing_key)
                with self.pool.connection() as conn:
                    changes = store.store_snapshot(conn, snapshot, pds)
            return RepoOutcome(did, "synced", snapshot.records, changes, snapshot.car_bytes)
        except psycopg.Error:
            raise  # the target is failing: no outcome can be recorded, so stop the run
        except (xrpc.RepoNotFound, DidNotFound, DidTombstoned) as exc:
            with self.pool.connection() as conn:
                store.delete_repo(conn, did, pds, describe(exc))
            return RepoOutcome(did, "deleted", error=describe(exc))
        except tuple(_GONE) as exc:
            status = _GONE[type(exc)]
            with self.pool.connection() as conn:
                store.mark_gone(conn, did, status, pds, describe(exc))
            return RepoOutcome(did, status, error=describe(exc))
        except xrpc.RateLimited as exc:
            retry_at = datetime.fromtimestamp(exc.retry_at, timezone.utc)
            with self.pool.connection() as conn:
                store.mark_failed(conn, did, describe(exc), retry_at, count_attempt=False)
            return RepoOutcome(did, "rate_limited", error=describe(exc), retry_at=retry_at)
        except Exception as exc:  # noqa: BLE001 - any other failure of one repo schedules its retry
            retry_at = ledger.next_retry_at(repo.attempts + 1)
            with self.pool.connection() as conn:
                store.mark_failed(conn, did, describe(exc), retry_at, count_attempt=True)
            return RepoOutcome(did, "retry", error=describe(exc), retry_at=retry_at)

    def fetch(self, did: str, pds: str) -> RepoSnapshot:
        client = self.client_for(pds)
        with self._downloads, client.stream("com.atproto.sync.getRepo", {"did": did}) as response:
            chunks = _within(response.iter_bytes(), self.settings.fetch_timeout_seconds, did, pds)
            return read_snapshot(did, chunks, self.settings.max_car_bytes, self.settings.scope)


class FetchTimeout(Exception):
    pass


def _within(chunks: Iterable[bytes], seconds: float, did: str, pds: str) -> Iterator[bytes]:
    """A deadline for the whole download (httpx's timeouts are per read, so a slow drip never ends)."""
    deadline = time.monotonic() + seconds
    for chunk in chunks:
        if time.monotonic() > deadline:
            raise FetchTimeout(
                f"getRepo of {did} from {pds} took over {seconds:.0f} s; raise REPO_FETCH_TIMEOUT_SECONDS for big repos"
            )
        yield chunk


def backfill_buckets(
    pool: ConnectionPool, syncer: RepoSyncer, buckets: list[int],
    on_outcome: Callable[[RepoOutcome, int, int], None] | None = None,
) -> BackfillReport:
    """Claim the due repos of `buckets` and sync them: `concurrency` downloads at a time (the syncer's
    settings), and as many repos again being resolved or stored meanwhile."""
    started = time.monotonic()
    with pool.connection() as conn:
        claimed = ledger.claim_due(conn, buckets, syncer.settings.stale_claim_minutes)
    report = BackfillReport()
    for outcome in ordered_map(syncer.sync, claimed, syncer.settings.sync_threads):
        report.outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome, len(report.outcomes), len(claimed))
    report.seconds = time.monotonic() - started
    return report
