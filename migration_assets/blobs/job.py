"""One account's blob migration from request to status: the seed's ImportBlobsJob around transfer.py.
Plain Python (no Dagster), so the asset stays a thin shell and the tests can call it directly.

One run per account at a time: a run first takes the lease on the migration's row (core/lease.py)
and renews it while it works; every write of its result is fenced by the lease's token. A second run
finds the lease held and leaves the account (and its staging folder) alone."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.blobs import store
from migration_assets.blobs.credentials import decrypt
from migration_assets.blobs.store import BlobMigration, now_iso
from migration_assets.blobs.transfer import (
    LeaseLost, TransferResult, TransferSettings, logged_in_clients, migrate_blobs, verify_account,
)
from migration_assets.core.checks import CheckOutcome
from migration_assets.core.lease import Heartbeat, Lease


@dataclass
class AccountOutcome:
    migration: BlobMigration  # as stored after the run
    result: TransferResult
    checks: list[CheckOutcome]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


@dataclass
class Hold:
    """This run's lease on a migration; `lost` is set once another run took it over."""

    lease: Lease
    lost: threading.Event


@contextmanager
def hold_migration(pool: ConnectionPool, migration_id: int, ttl_seconds: float, run_id: str) -> Iterator[Hold | None]:
    """The migration's lease for this run, renewed in the background until the block ends (then
    given back unless a fenced write already ended it); None when another live run holds it."""
    lease = store.account_lease(ttl_seconds)
    if not store.claim(pool, lease, migration_id, run_id):
        yield None
        return
    try:
        with Heartbeat(lease, pool.connection) as heartbeat:
            yield Hold(lease, heartbeat.lost)
    finally:
        with pool.connection() as conn:
            lease.release(conn)


def held_elsewhere(pool: ConnectionPool, migration: BlobMigration) -> str:
    """What a run that found the migration held tells its user."""
    run_id, until = store.holder(pool, migration.id)
    expiry = f"until {until:%Y-%m-%d %H:%M:%S %Z}, " if until else ""
    return (
        f"{migration.describe()} is being moved by run {run_id or '(unknown)'} (its lease runs {expiry}renewed "
        "while that run lives): this run leaves the account and its staging files alone. Follow that run in "
        "the Dagster UI; if it was killed, run this again once its lease has lapsed"
    )


def run_blob_migration(
    pool: ConnectionPool, migration: BlobMigration, settings: TransferSettings, hold: Hold,
    limiter: HostRateLimiter | None = None, log: Callable[[str], None] = lambda _: None,
    timeout: float = 120.0,
) -> AccountOutcome:
    """Transfer what is missing, verify the account on the new PDS, and advance the migration: to
    pending_prefs (credentials erased) when every check passes, else to failed with the reason
    (credentials erased: a new request brings them). Raises JobFailure / CredentialsError when the
    account could not be processed at all (the caller retries or marks it failed), LeaseLost when
    another run took the migration over (nothing more is written)."""
    credentials = decrypt(store.credentials_token(pool, migration.id), migration.describe())

    def fenced(written: bool) -> None:
        if not written:
            raise LeaseLost(f"{migration.describe()}: another run took it over; this run wrote nothing more")

    def write(progress: store.ProgressData) -> None:
        fenced(store.write_progress(pool, hold.lease, migration.id, progress))

    with logged_in_clients(migration.did, migration.old_pds, migration.new_pds, credentials, limiter, timeout) as (
        old, new,
    ):
        result = migrate_blobs(old, new, migration.did, settings, migration.progress, write, log, lease_lost=hold.lost)
        checks = verify_account(new, result)
    progress = result.progress
    if all(check.passed for check in checks):
        progress.blobs_completed_at = now_iso()
        progress.blobs_completed = progress.blobs_total or progress.blobs_completed
        fenced(store.mark_completed(pool, hold.lease, migration.id, progress))
        log(f"{migration.did}: blob transfer complete: {progress.blobs_completed}/{progress.blobs_total}, "
            f"{progress.bytes_transferred / 1e6:.1f} MB in all")
    else:
        write(progress)
        fenced(store.mark_failed(pool, hold.lease, migration.id, failure_message(migration, checks)))
    stored = store.get_migration(pool, migration.id)
    assert stored is not None
    return AccountOutcome(stored, result, checks)


def failure_message(migration: BlobMigration, checks: list[CheckOutcome]) -> str:
    failing = "; ".join(f"{check.name}: {check.summary}" for check in checks if not check.passed)
    return (
        f"{migration.describe()} is incomplete: {failing}. Failed blobs and their reasons are in "
        "progress_data.failed_blobs; fix the cause and request the migration again with both passwords: "
        "blobs already on the new PDS are not sent again"
    )
