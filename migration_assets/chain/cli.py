"""`migration-assets chain migrate`: the seed's direct mode, as partition runs of the chain assets."""

import argparse

import dagster as dg

from migration_assets.chain.assets import MISSING_BLOCK_HEIGHTS
from migration_assets.chain.definitions import NetworkAssets, network_assets
from migration_assets.chain.event_source import (
    EventLayout, HeightIndexMissing, NoEventHistory, event_ids_at_height, find_height_index, max_event_id,
)
from migration_assets.chain.partitions import register_ranges
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.scan import SCAN_MIN_RANGES
from migration_assets.chain.scan_cli import choose_path, migrate_by_scan
from migration_assets.chain.settings import NetworkConfig
from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.core.runs import materialize_partition, print_partition_summary


def add_commands(commands: argparse._SubParsersAction) -> None:
    chain = commands.add_parser("chain", help="chain data from DynamoDB to PostgreSQL")
    actions = chain.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser("migrate", help="migrate the blocks and events of heights [start, end)")
    migrate.add_argument("--start-height", type=int, required=True, help="first height (inclusive)")
    migrate.add_argument("--end-height", type=int, default=None,
                         help="last height (exclusive); default: up to the watermark (from 0: the whole table)")
    migrate.add_argument("--tag", type=int, default=None, help="block tag (default CHAIN_BLOCK_TAG)")
    migrate.add_argument("--event-tag", type=int, default=None, help="event tag (default CHAIN_EVENT_TAG)")
    migrate.add_argument("--blockchain", default=None, help="with --network: one of CHAIN_NETWORKS' chains, e.g. ethereum")
    migrate.add_argument("--network", default=None, help="with --blockchain: e.g. mainnet (default: the chain configured the old way)")
    migrate.add_argument("--skip-blocks", action="store_true", help="events only (blocks already migrated)")
    migrate.add_argument("--skip-events", action="store_true", help="block metadata only")
    migrate.add_argument("--method", choices=("auto", "scan", "query"), default="auto",
                         help="scan: parallel Scan of the tables; query: per height; auto: scan for the whole "
                         f"table or >= {SCAN_MIN_RANGES} block ranges")
    migrate.set_defaults(handler=migrate_command)


def migrate_command(args: argparse.Namespace) -> int:
    if (args.blockchain is None) != (args.network is None):
        print("error: give --blockchain and --network together (or neither, for the chain configured the old way)")
        return 2
    network = NetworkConfig() if args.blockchain is None else NetworkConfig.parse(f"{args.blockchain}-{args.network}")
    source = ChainSourceResource(block_tag=args.tag, event_tag=args.event_tag)
    method = choose_path(args, source, network)
    if method is None:
        return 1
    if not 0 <= args.start_height < args.end_height:
        print(f"error: need 0 <= --start-height < --end-height, got [{args.start_height}, {args.end_height})")
        return 2
    if args.skip_blocks and args.skip_events:
        print("error: --skip-blocks and --skip-events together leave nothing to migrate")
        return 2
    if method == "scan":
        return migrate_by_scan(args, source, event_id_range, network)
    chain = network_assets(network)
    resources = {"postgres": PostgresResource(), "chain_source": source}
    instance = project_instance()
    failures = total = 0
    if not args.skip_blocks:
        keys = register_ranges(instance, chain.block_ranges, args.start_height, args.end_height, source.settings.block_range_size)
        announce_snap("heights", (args.start_height, args.end_height), keys, "CHAIN_BLOCK_RANGE_SIZE")
        failures += run_partitions(instance, chain.block_metadata, keys, resources, block_summary)
        total += len(keys)
    if not args.skip_events:
        if failures:
            print("events: not migrated, since block ranges failed (events need their blocks)")
        else:
            try:
                ids = event_id_range(source, args.start_height, args.end_height, network)
            except (HeightIndexMissing, NoEventHistory) as error:
                print(f"error: {error}")
                return 1
            if ids is None:
                print(f"error: no events found at heights {args.start_height} and {args.end_height - 1}")
                return 1
            print(f"events: heights [{args.start_height}, {args.end_height}) are event ids [{ids[0]}, {ids[1]})")
            keys = register_ranges(instance, chain.event_ranges, ids[0], ids[1], source.settings.event_range_size)
            announce_snap("event ids", ids, keys, "CHAIN_EVENT_RANGE_SIZE")
            for key in keys:
                failures += not migrate_event_partition(instance, chain, key, resources, blocks_allowed=not args.skip_blocks)
            total += len(keys)
    print(f"{total - failures}/{total} ranges migrated and verified")
    if failures:
        print("next step: read the failures above (or the runs in the Dagster UI), fix the cause, "
              "and run the same command again: every load is idempotent.")
    return 1 if failures else 0


def event_id_range(
    source: ChainSourceResource, start_height: int, end_height: int, network: NetworkConfig = NetworkConfig()
) -> tuple[int, int] | None:
    """As the seed's tool: from the first event at the start height to the last at the end height - 1."""
    settings = source.settings
    layout, client, table = EventLayout(settings.event_tag), source.client(), network.tables(settings)[1]
    max_event_id(client, table, layout)  # NoEventHistory while chainstorage repopulates the table
    index = find_height_index(client, table, layout, settings.event_height_index)
    first = event_ids_at_height(client, table, layout, start_height, index)
    last = event_ids_at_height(client, table, layout, end_height - 1, index)
    if not first or not last:
        return None
    return first[0], last[-1] + 1


def announce_snap(what: str, wanted: tuple[int, int], keys: list[str], size_variable: str) -> None:
    first, last = parse_range_key(keys[0])[0], parse_range_key(keys[-1])[1]
    if (first, last) != wanted:
        print(f"note: {what} [{wanted[0]}, {wanted[1]}) snapped to partition boundaries [{first}, {last}) ({size_variable})")


def materialize(instance, asset, key, resources) -> dg.ExecuteInProcessResult:
    return materialize_partition(instance, asset, key, resources, "chain migrate")


def run_partitions(instance, asset, keys, resources, summary) -> int:
    """Materialize each partition in-process; print its summary; return how many failed."""
    failures = 0
    for key in keys:
        failures += not print_partition_summary(key, asset.key, materialize(instance, asset, key, resources), summary)
    return failures


def migrate_event_partition(instance, chain: NetworkAssets, key: str, resources: dict, blocks_allowed: bool) -> bool:
    """An event range snapped to partition bounds may reach heights beyond the ones asked for: when
    its events need blocks not migrated yet, migrate those block ranges and run the range again."""
    result = materialize(instance, chain.block_events, key, resources)
    heights = missing_block_heights(result)
    if heights and blocks_allowed:
        print(f"{key}: its events need blocks at heights {heights[0]}-{heights[1]}; migrating those first")
        size = resources["chain_source"].settings.block_range_size
        block_keys = register_ranges(instance, chain.block_ranges, heights[0], heights[1] + 1, size)
        if run_partitions(instance, chain.block_metadata, block_keys, resources, block_summary):
            return False
        result = materialize(instance, chain.block_events, key, resources)
    return print_partition_summary(key, chain.block_events.key, result, event_summary)


def missing_block_heights(result: dg.ExecuteInProcessResult) -> list[int] | None:
    for event in result.all_events:
        failure = event.step_failure_data if event.is_step_failure else None
        if failure and failure.user_failure_data and MISSING_BLOCK_HEIGHTS in failure.user_failure_data.metadata:
            return failure.user_failure_data.metadata[MISSING_BLOCK_HEIGHTS].value
    return None


def block_summary(meta: dict) -> str:
    return (f"{meta['heights']} heights, {meta['blocks']} blocks, {meta['reorged_blocks']} reorged, "
            f"{meta['missing_canonicals']} missing canonical, {meta['heights_per_second']} heights/s")


def event_summary(meta: dict) -> str:
    return f"{meta['events']} events (ids {meta['ids_read']}), {meta['events_per_second']} events/s"
