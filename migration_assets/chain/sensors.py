"""The continuous-sync sensor: reads the block and event watermarks, registers new ranges, requests
runs. Each tick does two GetItem calls and bounded bookkeeping, far below Dagster's 60 s limit."""

from collections.abc import Callable
from typing import TypeVar

import dagster as dg

from migration_assets.chain.assets import SYNC_ASSET_TAG, SYNC_TAG, ChainAssetKeys
from migration_assets.chain.event_source import EventLayout, NoEventHistory, max_event_id
from migration_assets.chain.partitions import block_ranges, event_ranges
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.settings import ChainSettings, NetworkConfig
from migration_assets.chain.items import SourceDataError
from migration_assets.chain.source import SourceTableMissing, latest_block
from migration_assets.chain.sync import StreamCursor, StreamPlan, SyncCursor, plan_stream
from migration_assets.core.settings import settings_of

REORG_MARGIN_HEIGHTS = 64
MAX_NEW_RANGES_PER_TICK = 100
T = TypeVar("T")


def _unless_missing(context: dg.SensorEvaluationContext, table: str, read: Callable[[], T]) -> T | None:
    """A watermark, or None (and a warning) when its table does not exist, has no history yet or holds a
    malformed watermark: the other stream goes on."""
    try:
        return read()
    except (SourceTableMissing, NoEventHistory) as error:
        context.log.warning(f"{error}: not syncing it")
        return None
    except SourceDataError as error:
        context.log.warning(f"{error}; not syncing {table} until its watermark reads")
        return None


_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]


def _tip_in_flight(context: dg.SensorEvaluationContext, asset: dg.AssetKey, partition: str) -> bool:
    tags = {SYNC_TAG: "tip", SYNC_ASSET_TAG: asset.to_user_string(), "dagster/partition": partition}
    return bool(context.instance.get_run_records(dg.RunsFilter(tags=tags, statuses=_IN_FLIGHT), limit=1))


def _without_tips_in_flight(context: dg.SensorEvaluationContext, plan: StreamPlan, asset: dg.AssetKey,
                            cursor: StreamCursor) -> StreamPlan:
    """The plan, less tip runs of partitions whose last tip run is still queued or running: each move of
    the tip asked for one more, and a backlog queued them by the hundred (132 in an hour), each reading the
    whole range again. The cursor keeps the tip it had, so the next tick asks again."""
    busy = {run.key for run in plan.runs if not run.complete and _tip_in_flight(context, asset, run.key)}
    if not busy:
        return plan
    runs = [run for run in plan.runs if run.complete or run.key not in busy]
    return StreamPlan(plan.new_keys, runs, plan.cursor.model_copy(update={"synced_tip": cursor.synced_tip}))


def _requests(plan: StreamPlan, asset: dg.AssetKey) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(
            run_key=run.run_key, partition_key=run.key, asset_selection=[asset],
            tags={SYNC_TAG: "complete" if run.complete else "tip", SYNC_ASSET_TAG: asset.to_user_string()},
        )
        for run in plan.runs
    ]


def chain_sync_sensor(
    network: NetworkConfig, block_ranges: dg.DynamicPartitionsDefinition, event_ranges: dg.DynamicPartitionsDefinition
) -> dg.SensorDefinition:
    """The continuous-sync sensor of one network."""
    keys = ChainAssetKeys.of(network)

    @dg.sensor(
        name=network.prefixed("chain_sync"),
        minimum_interval_seconds=settings_of(ChainSettings).sync_interval_seconds,
        asset_selection=[keys.block_metadata, keys.block_events],
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Keeps PostgreSQL in sync with the chain: new ranges as partitions, runs for completed "
        "ranges once, and the open range at the tip re-run whenever the watermark moves.",
    )
    def chain_sync(context: dg.SensorEvaluationContext, chain_source: ChainSourceResource) -> dg.SensorResult:
        settings = chain_source.settings
        block_table, event_table = network.tables(settings)
        client = chain_source.client()
        cursor = SyncCursor.model_validate_json(context.cursor) if context.cursor else SyncCursor()
        latest = _unless_missing(context, block_table, lambda: latest_block(client, block_table, settings.block_tag))
        block_tip = latest[0] if latest else None
        event_tip = _unless_missing(
            context, event_table, lambda: max_event_id(client, event_table, EventLayout(settings.event_tag))
        )
        blocks = _without_tips_in_flight(context, plan_stream(
            "blocks", cursor.blocks, block_tip, settings.block_range_size, MAX_NEW_RANGES_PER_TICK, REORG_MARGIN_HEIGHTS,
            tip_marker=f"{latest[0]}:{latest[1]}" if latest else None,
        ), keys.block_metadata, cursor.blocks)
        events = _without_tips_in_flight(context, plan_stream(
            "events", cursor.events, event_tip, settings.event_range_size, MAX_NEW_RANGES_PER_TICK, first_id=1,
        ), keys.block_events, cursor.events)
        context.log.info(
            f"block tip {block_tip}, event tip {event_tip}: "
            f"{len(blocks.runs)} block runs, {len(events.runs)} event runs requested"
        )
        return dg.SensorResult(
            run_requests=_requests(blocks, keys.block_metadata) + _requests(events, keys.block_events),
            dynamic_partitions_requests=[
                partitions.build_add_request(plan.new_keys)
                for partitions, plan in ((block_ranges, blocks), (event_ranges, events))
                if plan.new_keys
            ],
            cursor=SyncCursor(blocks=blocks.cursor, events=events.cursor).model_dump_json(),
        )

    return chain_sync


chain_sync = chain_sync_sensor(NetworkConfig(), block_ranges, event_ranges)
