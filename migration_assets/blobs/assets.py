"""The `atproto/blobs` asset: one dynamic partition per account (its DID), a thin shell over job.py."""

from collections.abc import Iterator

import dagster as dg

from migration_assets.blobs import store
from migration_assets.blobs.credentials import CredentialsError
from migration_assets.blobs.job import AccountOutcome, held_elsewhere, hold_migration, run_blob_migration
from migration_assets.blobs.resources import BlobMigrationResource
from migration_assets.blobs.settings import BlobSettings
from migration_assets.blobs.store import BlobMigration
from migration_assets.blobs.transfer import (
    CHECK_BYTES_VERIFIED, CHECK_NO_FAILED_BLOBS, CHECK_NOTHING_MISSING, LeaseLost, PermanentFailure,
)
from migration_assets.core.checks import listing
from migration_assets.core.dagster_glue import check_result, check_specs, step_retry_policy
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import settings_of

BLOBS = dg.AssetKey(["atproto", "blobs"])
BLOB_POOL = "atproto_blobs"  # limit 15, run granularity (dagster.yaml): the 16th account waits queued
REQUEST_TAG = "migration-assets/blob-migration"  # the blob_migrations id a run serves
SKIPPED = "skipped"  # metadata key of the observation a run that leaves the account alone records

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
            + ": request one (`migration-assets blobs migrate`, or a row in blob_migrations) and let the sensor run it",
            allow_retries=False,
        )
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
        "failed_blobs": dg.MetadataValue.int(progress.failures),
        "failures": dg.MetadataValue.text(listing([f"{f.cid}: {f.reason}" for f in failed], 10) or "none"),
        "estimated_memory_mb": dg.MetadataValue.int(progress.estimated_memory_mb or 0),
        "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
    }


def leave_alone(context: dg.AssetExecutionContext, message: str) -> dg.AssetObservation:
    """A run with nothing to do here ends cleanly: no materialization, a note on the partition."""
    context.log.warning(message)
    return dg.AssetObservation(asset_key=BLOBS, partition=context.partition_key,
                               metadata={SKIPPED: dg.MetadataValue.text(message)})


def build_blobs_asset(job_retries: int, job_retry_delay_seconds: float) -> dg.AssetsDefinition:
    """The asset, with Dagster retrying a whole account's step `job_retries` times (exponential
    backoff, full jitter) before the migration fails for good. Tests build it with short waits."""

    # A multi-asset of one spec only for `can_subset`: it makes the check outputs optional, so a run
    # that finds the account held by another run can end cleanly without a materialization.
    @dg.multi_asset(
        name="atproto__blobs",
        specs=[dg.AssetSpec(
            BLOBS, partitions_def=accounts, group_name="atproto", kinds={"atproto"},
            description="Every blob of an account moved from its old PDS to its new PDS (one partition per DID), "
            "streamed through disk one at a time, each verified against its CID; progress in blob_migrations.",
        )],
        check_specs=check_specs(BLOBS, _CHECKS, accounts),
        can_subset=True,
        pool=BLOB_POOL,
        retry_policy=step_retry_policy(job_retries, job_retry_delay_seconds),
    )
    def blobs(
        context: dg.AssetExecutionContext, postgres: PostgresResource, blob_migration: BlobMigrationResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetObservation]:
        pool = postgres.pool()
        migration = find_migration(pool, context)
        if migration.status != "pending_blobs":
            yield leave_alone(context, f"{migration.describe()} is {migration.status}, not pending_blobs: nothing to do")
            return
        with hold_migration(pool, migration.id, blob_migration.lease_seconds, context.run.run_id) as hold:
            if hold is None:
                yield leave_alone(context, held_elsewhere(pool, migration))
                return
            context.log.info(f"starting blob import of {migration.describe()} from {migration.old_pds} to {migration.new_pds}")
            try:
                outcome = run_blob_migration(
                    pool, migration, blob_migration.transfer_settings(), hold,
                    blob_migration.limiter(postgres.resolved_url()), log=context.log.info,
                    timeout=blob_migration.request_timeout_seconds,
                )
            except LeaseLost as lost:
                yield leave_alone(context, f"{lost}: the run that took it over finishes the account")
                return
            except CredentialsError as error:  # the deployment's key, not the account: it stays pending
                store.note_error(pool, hold.lease, migration.id, str(error))
                raise dg.Failure(description=str(error), allow_retries=False) from None
            except PermanentFailure as error:
                store.mark_failed(pool, hold.lease, migration.id, str(error))
                raise dg.Failure(description=str(error), allow_retries=False) from None
            except Exception as error:  # noqa: BLE001 - any other failure of the account is retried, then recorded
                message = f"{migration.describe()} failed: {error}"
                if context.retry_number < job_retries:
                    store.note_error(pool, hold.lease, migration.id, message)
                    context.log.warning(f"{message}; Dagster retries the step ({context.retry_number + 1}/{job_retries})")
                    raise
                store.mark_failed(pool, hold.lease, migration.id, message)
                raise dg.Failure(
                    description=f"{message} (after {job_retries} retries). Blobs already sent stay on the new PDS; "
                    "request the migration again with both passwords once the cause is fixed: only the missing "
                    "ones are sent", allow_retries=False,
                ) from None
        selected = context.selected_asset_check_keys  # can_subset: a run may select some checks only
        yield dg.MaterializeResult(
            asset_key=BLOBS, metadata=outcome_metadata(outcome),
            check_results=[check_result(check) for check in outcome.checks
                           if dg.AssetCheckKey(BLOBS, check.name) in selected],
        )

    return blobs


_ENV = settings_of(BlobSettings)
blobs = build_blobs_asset(_ENV.job_retries, _ENV.job_retry_delay_seconds)
