"""The `atproto/blobs` asset: one dynamic partition per account (its DID), a thin shell over job.py."""

import dagster as dg

from migration_assets.blobs import store
from migration_assets.blobs.credentials import CredentialsError
from migration_assets.blobs.job import AccountOutcome, run_blob_migration
from migration_assets.blobs.resources import BlobMigrationResource
from migration_assets.blobs.store import BlobMigration
from migration_assets.blobs.transfer import (
    CHECK_BYTES_VERIFIED, CHECK_NO_FAILED_BLOBS, CHECK_NOTHING_MISSING, PermanentFailure,
)
from migration_assets.core.checks import listing
from migration_assets.core.dagster_glue import check_result, check_specs
from migration_assets.core.resources import PostgresResource

BLOBS = dg.AssetKey(["atproto", "blobs"])
BLOB_POOL = "atproto_blobs"  # limit 15, run granularity (dagster.yaml): the 16th account waits queued
REQUEST_TAG = "migration-assets/blob-migration"  # the blob_migrations id a run serves

accounts = dg.DynamicPartitionsDefinition(name="atproto_blob_accounts")

_CHECKS = {
    CHECK_NOTHING_MISSING: "listMissingBlobs is empty and checkAccountStatus has importedBlobs >= expectedBlobs",
    CHECK_NO_FAILED_BLOBS: "no blob ended in progress_data.failed_blobs",
    CHECK_BYTES_VERIFIED: "every byte sent hashed to its CID and the new PDS stored as many as were sent",
}


def find_migration(pool, context: dg.AssetExecutionContext) -> BlobMigration:
    tagged = context.run.tags.get(REQUEST_TAG)
    migration = store.get_migration(pool, int(tagged)) if tagged else store.open_migration(pool, context.partition_key)
    if migration is None or migration.did != context.partition_key:
        raise dg.Failure(
            description=f"no pending blob migration of {context.partition_key}"
            + (f" with id {tagged}" if tagged else "")
            + ": request one (`migration-assets blobs migrate`, or a row in blob_migrations) and let the sensor run it"
        )
    if migration.status != "pending_blobs":
        raise dg.Failure(description=f"{migration.describe()} is {migration.status}, not pending_blobs: nothing to do")
    return migration


def outcome_metadata(outcome: AccountOutcome) -> dict:
    progress, result = outcome.migration.progress, outcome.result
    failed = progress.failed_blobs
    return {
        "did": dg.MetadataValue.text(outcome.migration.did),
        "migration_id": dg.MetadataValue.int(outcome.migration.id),
        "status": dg.MetadataValue.text(outcome.migration.status),
        "blobs": dg.MetadataValue.text(f"{progress.blobs_completed}/{progress.blobs_total}"),
        "blobs_completed": dg.MetadataValue.int(progress.blobs_completed),
        "blobs_total": dg.MetadataValue.int(progress.blobs_total or 0),
        "blobs_sent_this_run": dg.MetadataValue.int(result.transferred),
        "bytes_transferred": dg.MetadataValue.int(progress.bytes_transferred),
        "bytes_this_run": dg.MetadataValue.int(result.run_bytes),
        "mb_per_second": dg.MetadataValue.float(round(result.bytes_per_second / 1e6, 2)),
        "failed_blobs": dg.MetadataValue.int(len(failed)),
        "failures": dg.MetadataValue.text(listing([f"{f.cid}: {f.reason}" for f in failed], 10) or "none"),
        "estimated_memory_mb": dg.MetadataValue.int(progress.estimated_memory_mb or 0),
        "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
    }


@dg.asset(
    key=BLOBS,
    partitions_def=accounts,
    check_specs=check_specs(BLOBS, _CHECKS, accounts),
    group_name="atproto",
    kinds={"atproto"},
    pool=BLOB_POOL,
    description="Every blob of an account moved from its old PDS to its new PDS (one partition per DID), "
    "streamed through disk one at a time, each verified against its CID; progress in blob_migrations.",
)
def blobs(
    context: dg.AssetExecutionContext, postgres: PostgresResource, blob_migration: BlobMigrationResource
) -> dg.MaterializeResult:
    pool = postgres.pool()
    migration = find_migration(pool, context)
    context.log.info(f"starting blob import of {migration.describe()} from {migration.old_pds} to {migration.new_pds}")
    try:
        outcome = run_blob_migration(
            pool, migration, blob_migration.transfer_settings(), blob_migration.limiter(postgres.resolved_url()),
            log=context.log.info, timeout=blob_migration.request_timeout_seconds,
        )
    except (PermanentFailure, CredentialsError) as error:
        store.mark_failed(pool, migration.id, str(error))
        raise dg.Failure(description=str(error)) from None
    except Exception as error:  # noqa: BLE001 - any other failure of the account is retried, then recorded
        message = f"{migration.describe()} failed: {error}"
        if context.retry_number < blob_migration.job_retries:
            store.note_error(pool, migration.id, message)
            wait = blob_migration.retry_delay(context.retry_number)
            context.log.warning(f"{message}; retry {context.retry_number + 1}/{blob_migration.job_retries} in {wait:.0f} s")
            raise dg.RetryRequested(max_retries=blob_migration.job_retries, seconds_to_wait=wait) from error
        store.mark_failed(pool, migration.id, message)
        raise dg.Failure(
            description=f"{message} (after {blob_migration.job_retries} retries). Blobs already sent stay on the "
            "new PDS; request the migration again once the cause is fixed and only the missing ones are sent"
        ) from None
    return dg.MaterializeResult(
        metadata=outcome_metadata(outcome),
        check_results=[check_result(check) for check in outcome.checks],
    )
