"""Dagster assets of the chain pipeline: a thin shell over `blocks.migrate_block_range`."""

from dataclasses import dataclass

import dagster as dg
import psycopg
from botocore.exceptions import BotoCoreError, ClientError

from migration_assets.chain import checks, event_checks
from migration_assets.chain.blocks import BlockRangeRequest, BlockRangeResult, migrate_block_range
from migration_assets.chain.event_source import TableThrottled
from migration_assets.chain.events import EventRangeRequest, EventRangeResult, MissingBlocksError, migrate_event_range
from migration_assets.chain.partitions import block_ranges, event_ranges
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.resources import ChainSourceResource, network_pool
from migration_assets.chain.settings import NetworkConfig
from migration_assets.core.dagster_glue import check_result, check_specs, step_retry_policy
from migration_assets.core.resources import PostgresResource

SYNC_TAG = "migration-assets/sync"  # runs requested by the continuous-sync sensor
SYNC_ASSET_TAG = "migration-assets/sync-asset"  # and the asset each is for (range keys repeat across assets)
MISSING_BLOCK_HEIGHTS = "missing_block_heights"  # [first, last] on an event range's failure
# Continuous sync launches a range's block and event runs together: a synced event run whose blocks
# have not landed yet is retried (within 30 s, 90 s, 210 s, ...: full jitter) instead of failing. So is
# a run of either asset that met an error a later try may get past (TRANSIENT_ERRORS): the sensor asks
# for each completed range once, and a range whose run failed on a throttling burst stayed unsynced.
SYNC_RETRY = step_retry_policy(max_retries=5, base_seconds=30)
# DynamoDB throttling or an endpoint's error or connection (after botocore's own tries), keys left
# unprocessed, the target's connection lost. Anything else (a malformed item) fails at once, named.
TRANSIENT_ERRORS = (BotoCoreError, ClientError, TableThrottled, psycopg.OperationalError)


def _failed_for_good(error: Exception) -> dg.Failure:
    return dg.Failure(description=f"{type(error).__name__}: {error}", allow_retries=False)

_BLOCK_CHECKS = {
    checks.CHECK_BLOCK_COUNT: "block_metadata rows per height = distinct blocks in the source",
    checks.CHECK_CANONICAL: "one canonical_blocks row per height with a canonical item, pointing at it",
    checks.CHECK_CANONICAL_RESOLVES: "no canonical_blocks row without its block_metadata row",
    checks.CHECK_CONTINUITY: "parent-hash continuity along the canonical chain (skipped blocks excluded)",
}


def block_range_metadata(result: BlockRangeResult) -> dict:
    missing = result.missing_canonical
    return {
        "heights": dg.MetadataValue.int(result.heights),
        "heights_read": dg.MetadataValue.text(f"{result.start}-{result.read_end - 1}" if result.heights else "none"),
        "blocks": dg.MetadataValue.int(result.blocks),
        "reorged_blocks": dg.MetadataValue.int(result.reorged_blocks),
        "missing_canonicals": dg.MetadataValue.int(len(missing)),
        "missing_canonical_heights": dg.MetadataValue.text(", ".join(map(str, missing[:100])) or "none"),
        "empty_heights": dg.MetadataValue.int(result.empty_heights),
        "heights_per_second": dg.MetadataValue.float(round(result.heights_per_second, 1)),
        "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
        "dagster/row_count": dg.MetadataValue.int(result.blocks),
    }


_EVENT_CHECKS = {
    event_checks.CHECK_EVENT_COUNT: "block_events rows = source events in the range",
    event_checks.CHECK_EVENT_CONTIGUOUS: "max - min + 1 = count of event ids",
    event_checks.CHECK_EVENT_BLOCKS: "every event resolves to its block (tag, hash or skipped height)",
    event_checks.CHECK_EVENT_RULES: "BLOCK_ADDED goes up one height with a parent link, BLOCK_REMOVED down, "
    "a type change stays at one height",
    event_checks.CHECK_LAST_EVENT_CANONICAL: "the last event at each height adds the canonical block",
}


def event_range_metadata(result: EventRangeResult) -> dict:
    return {
        "events": dg.MetadataValue.int(result.events),
        "ids_read": dg.MetadataValue.text(f"{result.read_start}-{result.read_end - 1}" if result.read_end > result.read_start else "none"),
        "heights": dg.MetadataValue.text(f"{result.min_height}-{result.max_height}" if result.events else "none"),
        "by_type": dg.MetadataValue.json(result.by_type),
        "events_per_second": dg.MetadataValue.float(round(result.events_per_second, 1)),
        "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
        "dagster/row_count": dg.MetadataValue.int(result.events),
    }


@dataclass(frozen=True)
class ChainAssetKeys:
    block_metadata: dg.AssetKey
    block_events: dg.AssetKey

    @classmethod
    def of(cls, network: NetworkConfig) -> "ChainAssetKeys":
        prefix = network.key_prefix
        return cls(dg.AssetKey([*prefix, "chain", "block_metadata"]), dg.AssetKey([*prefix, "chain", "block_events"]))


def chain_assets(
    network: NetworkConfig, block_ranges: dg.DynamicPartitionsDefinition, event_ranges: dg.DynamicPartitionsDefinition
) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    """(block_metadata, block_events) of one network: its tables, partitions and PostgreSQL schema."""
    keys = ChainAssetKeys.of(network)

    @dg.asset(
        key=keys.block_metadata,
        partitions_def=block_ranges,
        check_specs=check_specs(keys.block_metadata, _BLOCK_CHECKS, block_ranges, warn=frozenset({checks.CHECK_CONTINUITY})),
        group_name=network.prefixed("chain"),
        kinds={"dynamodb", "postgres"},
        pool="chain_dynamodb",
        retry_policy=SYNC_RETRY,
        description="Every block of each height (reorged ones first, the canonical last) from DynamoDB "
        "into block_metadata, and the canonical one into canonical_blocks.",
    )
    def block_metadata(
        context: dg.AssetExecutionContext, postgres: PostgresResource, chain_source: ChainSourceResource
    ) -> dg.MaterializeResult:
        start, end = parse_range_key(context.partition_key)
        settings = chain_source.settings
        table = network.tables(settings)[0]
        request = BlockRangeRequest(
            client=chain_source.client(),
            table=table,
            tag=settings.block_tag,
            start=start,
            end=end,
            read_concurrency=chain_source.read_concurrency,
            chunk_heights=settings.load_chunk_heights,
            read_processes=chain_source.read_processes,
            client_spec=chain_source.client_spec(),
        )

        def progress(result: BlockRangeResult) -> None:
            context.log.info(
                f"{table} tag {settings.block_tag}: {result.heights}/{result.read_end - start} heights, "
                f"{result.blocks} blocks, {result.reorged_blocks} reorged, "
                f"{len(result.missing_canonical)} without canonical"
            )

        try:
            result = migrate_block_range(request, network_pool(postgres, network.schema), on_progress=progress)
        except TRANSIENT_ERRORS:
            raise  # SYNC_RETRY
        except Exception as error:
            raise _failed_for_good(error) from error
        if result.missing_canonical:
            context.log.warning(
                f"{len(result.missing_canonical)} heights have blocks but no canonical item: "
                f"{result.missing_canonical[:20]}"
            )
        return dg.MaterializeResult(
            metadata=block_range_metadata(result),
            check_results=[check_result(outcome) for outcome in result.checks],
        )

    @dg.asset(
        key=keys.block_events,
        partitions_def=event_ranges,
        deps=[dg.AssetDep(keys.block_metadata, partition_mapping=dg.AllPartitionMapping())],
        check_specs=check_specs(
            keys.block_events, _EVENT_CHECKS, event_ranges,
            warn=frozenset({event_checks.CHECK_EVENT_RULES, event_checks.CHECK_LAST_EVENT_CANONICAL}),
        ),
        group_name=network.prefixed("chain"),
        kinds={"dynamodb", "postgres"},
        pool="chain_dynamodb",
        retry_policy=SYNC_RETRY,
        description="Events with ids in the range from DynamoDB into block_events, each tied to its block.",
    )
    def block_events(
        context: dg.AssetExecutionContext, postgres: PostgresResource, chain_source: ChainSourceResource
    ) -> dg.MaterializeResult:
        start, end = parse_range_key(context.partition_key)
        settings = chain_source.settings
        table = network.tables(settings)[1]
        request = EventRangeRequest(
            client=chain_source.client(), table=table, event_tag=settings.event_tag,
            start=start, end=end, read_concurrency=chain_source.read_concurrency,
            chunk_events=settings.load_chunk_events,
            read_processes=chain_source.read_processes,
            client_spec=chain_source.client_spec(),
        )

        def progress(result: EventRangeResult) -> None:
            context.log.info(f"{table} event tag {settings.event_tag}: {result.events} events loaded")

        try:
            result = migrate_event_range(request, network_pool(postgres, network.schema), on_progress=progress)
        except MissingBlocksError as error:
            if SYNC_TAG in context.run.tags:
                raise  # SYNC_RETRY: the blocks' own run is on its way
            raise dg.Failure(
                description=str(error), allow_retries=False,
                metadata={MISSING_BLOCK_HEIGHTS: dg.MetadataValue.json([min(error.heights), max(error.heights)])},
            ) from error
        except TRANSIENT_ERRORS:
            raise  # SYNC_RETRY
        except Exception as error:
            raise _failed_for_good(error) from error
        return dg.MaterializeResult(
            metadata=event_range_metadata(result),
            check_results=[check_result(outcome) for outcome in result.checks],
        )

    return block_metadata, block_events


_KEYS = ChainAssetKeys.of(NetworkConfig())  # the chain configured the old way
BLOCK_METADATA, BLOCK_EVENTS = _KEYS.block_metadata, _KEYS.block_events
block_metadata, block_events = chain_assets(NetworkConfig(), block_ranges, event_ranges)
