"""`migration-assets chain migrate`: the seed's direct mode, as partition runs of the chain assets."""

import argparse

import dagster as dg

from migration_assets.chain.assets import BLOCK_METADATA, block_metadata
from migration_assets.chain.partitions import register_block_ranges
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.core.instance import project_instance
from migration_assets.core.postgres import PostgresResource
from migration_assets.core.settings import ChainSettings


def add_commands(commands: argparse._SubParsersAction) -> None:
    chain = commands.add_parser("chain", help="chain data from DynamoDB to PostgreSQL")
    actions = chain.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser("migrate", help="migrate the block ranges covering [start, end)")
    migrate.add_argument("--start-height", type=int, required=True, help="first height (inclusive)")
    migrate.add_argument("--end-height", type=int, required=True, help="last height (exclusive)")
    migrate.add_argument("--tag", type=int, default=None, help="block tag (default CHAIN_BLOCK_TAG)")
    migrate.add_argument("--skip-events", action="store_true", help="migrate block metadata only")
    migrate.set_defaults(handler=migrate_command)


def migrate_command(args: argparse.Namespace) -> int:
    if not 0 <= args.start_height < args.end_height:
        print(f"error: need 0 <= --start-height < --end-height, got [{args.start_height}, {args.end_height})")
        return 2
    settings = ChainSettings.from_env()
    instance = project_instance()
    keys = register_block_ranges(instance, args.start_height, args.end_height, settings.block_range_size)
    first, last = parse_range_key(keys[0])[0], parse_range_key(keys[-1])[1]
    if (first, last) != (args.start_height, args.end_height):
        print(
            f"note: [{args.start_height}, {args.end_height}) snapped to partition boundaries "
            f"[{first}, {last}) (CHAIN_BLOCK_RANGE_SIZE={settings.block_range_size})"
        )
    resources = {"postgres": PostgresResource(), "chain_source": ChainSourceResource(block_tag=args.tag)}
    failures = 0
    for key in keys:
        result = dg.materialize(
            [block_metadata], partition_key=key, instance=instance, resources=resources,
            raise_on_error=False, tags={"migration-assets/cli": "chain migrate"},
        )
        failures += not print_partition_summary(key, result)
    total = len(keys)
    print(f"{total - failures}/{total} block ranges migrated and verified")
    if failures:
        print("next step: read the failures above (or the runs in the Dagster UI), fix the cause, "
              "and run the same command again: every load is idempotent.")
    return 1 if failures else 0


def print_partition_summary(key: str, result: dg.ExecuteInProcessResult) -> bool:
    """One line for the partition, plus each failing check and error; True when all went well."""
    ok = result.success
    materializations = result.asset_materializations_for_node(block_metadata.node_def.name)
    if materializations:
        meta = {name: value.value for name, value in materializations[-1].metadata.items()}
        print(
            f"{key}: {meta['heights']} heights, {meta['blocks']} blocks, {meta['reorged_blocks']} reorged, "
            f"{meta['missing_canonicals']} missing canonical, {meta['heights_per_second']} heights/s"
        )
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.asset_key == BLOCK_METADATA and not evaluation.passed:
            ok = ok and evaluation.severity.value == "WARN"
            print(f"  check {evaluation.check_name} FAILED ({evaluation.severity.value}): {evaluation.description}")
    for event in result.all_events:
        if event.is_step_failure:
            print(f"{key}: FAILED: {root_cause(event.step_failure_data.error)}")
    return ok


def root_cause(error) -> str:
    """The user's own error under Dagster's wrappers (a SerializableErrorInfo chain)."""
    while error is not None and error.cls_name and error.cls_name.startswith("Dagster") and error.cause:
        error = error.cause
    return error.message.strip() if error else "unknown error"
