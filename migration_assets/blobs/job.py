"""One account's blob migration from request to status: the seed's ImportBlobsJob around transfer.py.
Plain Python (no Dagster), so the asset stays a thin shell and the tests can call it directly."""

from collections.abc import Callable
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.blobs import store
from migration_assets.blobs.credentials import decrypt
from migration_assets.blobs.store import BlobMigration, now_iso
from migration_assets.blobs.transfer import (
    TransferResult, TransferSettings, logged_in_clients, migrate_blobs, verify_account,
)
from migration_assets.core.checks import CheckOutcome


@dataclass
class AccountOutcome:
    migration: BlobMigration  # as stored after the run
    result: TransferResult
    checks: list[CheckOutcome]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def run_blob_migration(
    pool: ConnectionPool, migration: BlobMigration, settings: TransferSettings,
    limiter: HostRateLimiter | None = None, log: Callable[[str], None] = lambda _: None,
    timeout: float = 120.0,
) -> AccountOutcome:
    """Transfer what is missing, verify the account on the new PDS, and advance the migration: to
    pending_prefs (credentials erased) when every check passes, else to failed with the reason.
    Raises JobFailure / CredentialsError when the account could not be processed at all (the caller
    retries or marks it failed)."""
    credentials = decrypt(store.credentials_token(pool, migration.id), migration.describe())

    def write(progress: store.ProgressData) -> None:
        store.write_progress(pool, migration.id, progress)

    with logged_in_clients(migration.did, migration.old_pds, migration.new_pds, credentials, limiter, timeout) as (
        old, new,
    ):
        result = migrate_blobs(old, new, migration.did, settings, migration.progress, write, log)
        checks = verify_account(new, result)
    progress = result.progress
    if all(check.passed for check in checks):
        progress.blobs_completed_at = now_iso()
        progress.blobs_completed = progress.blobs_total or progress.blobs_completed
        store.mark_completed(pool, migration.id, progress)
        log(f"{migration.did}: blob transfer complete: {progress.blobs_completed}/{progress.blobs_total}, "
            f"{progress.bytes_transferred / 1e6:.1f} MB in all")
    else:
        store.write_progress(pool, migration.id, progress)
        store.mark_failed(pool, migration.id, failure_message(migration, checks))
    stored = store.get_migration(pool, migration.id)
    assert stored is not None
    return AccountOutcome(stored, result, checks)


def failure_message(migration: BlobMigration, checks: list[CheckOutcome]) -> str:
    failing = "; ".join(f"{check.name}: {check.summary}" for check in checks if not check.passed)
    return (
        f"{migration.describe()} is incomplete: {failing}. Failed blobs and their reasons are in "
        "progress_data.failed_blobs; fix the cause and request the migration again: blobs already on the "
        "new PDS are not sent again"
    )
