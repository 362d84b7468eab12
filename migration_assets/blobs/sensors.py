"""The request sensor: each new queued row of blob_migrations becomes its account's partition and one
run request. Runs beyond the `atproto_blobs` pool's limit wait in Dagster's run queue; nothing here
re-queues anything (the seed's gate that did so livelocked)."""

import dagster as dg

from migration_assets.blobs import store
from migration_assets.blobs.assets import BLOBS, REQUEST_TAG, accounts
from migration_assets.core.resources import PostgresResource

MAX_REQUESTS_PER_TICK = 500


def blob_run_requests(migrations: list[store.BlobMigration]) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(
            run_key=f"blob-migration-{migration.id}",  # one run per request, even if the cursor were lost
            partition_key=migration.did,
            asset_selection=[BLOBS],
            tags={REQUEST_TAG: str(migration.id)},
        )
        for migration in migrations
    ]


@dg.sensor(
    name="atproto_blob_requests",
    minimum_interval_seconds=30,
    asset_selection=[BLOBS],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Turns new blob migration requests (rows in blob_migrations) into account partitions and runs.",
)
def blob_migration_requests(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    after = int(context.cursor or 0)
    migrations = store.queued_after(postgres.pool(), after, MAX_REQUESTS_PER_TICK)
    new_keys = sorted(
        did for did in {m.did for m in migrations} if not context.instance.has_dynamic_partition(accounts.name, did)
    )
    if migrations:
        context.log.info(f"{len(migrations)} new blob migration requests, {len(new_keys)} new accounts")
    return dg.SensorResult(
        run_requests=blob_run_requests(migrations),
        dynamic_partitions_requests=[accounts.build_add_request(new_keys)] if new_keys else [],
        cursor=str(max((m.id for m in migrations), default=after)),
    )
