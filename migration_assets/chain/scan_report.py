"""A finished Scan's ranges, shown in Dagster as partitions of the chain assets: each covered range
a materialization of chain/block_metadata (or chain/block_events), with the asset's checks evaluated
against the counts the scan gathered.

The events are logged inside a run (the block_scan asset's, or a small report run for the CLI):
Dagster 1.13 keeps one runless check evaluation per check and partition, so a second runless report
of a range (a re-run scan) would fail on its unique index.
"""

from collections.abc import Callable

import dagster as dg

from migration_assets.chain.assets import ChainAssetKeys
from migration_assets.chain.partitions import range_partitions
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.scan import BLOCKS, ScanSummary
from migration_assets.chain.settings import NetworkConfig


def report_ranges(
    instance: dg.DagsterInstance, summary: ScanSummary, log_event: Callable[[object], None],
    network: NetworkConfig = NetworkConfig(),
) -> list[str]:
    """Add every covered range's partition (the network's) and log its events with `log_event` (a
    run's `context.log_event`); return the partition keys."""
    blocks = summary.request.kind == BLOCKS
    keys_of, (block_ranges, event_ranges) = ChainAssetKeys.of(network), range_partitions(network)
    asset, partitions = (keys_of.block_metadata, block_ranges) if blocks else (keys_of.block_events, event_ranges)
    keys = list(summary.checks)
    known = set(instance.get_dynamic_partitions(partitions.name))
    instance.add_dynamic_partitions(partitions.name, [k for k in keys if k not in known])
    for key, outcomes in summary.checks.items():
        counts = summary.counts[parse_range_key(key)]
        rows = counts.blocks if blocks else counts.events
        metadata = ({"heights": counts.heights, "blocks": counts.blocks, "canonical": counts.canonical}
                    if blocks else {"events": counts.events})
        log_event(dg.AssetMaterialization(
            asset_key=asset, partition=key,
            metadata={**metadata, "dagster/row_count": rows, "migrated_by": f"scan {summary.request.scan_id}"},
        ))
        for outcome in outcomes:
            log_event(dg.AssetCheckEvaluation(
                asset_key=asset, check_name=outcome.name, passed=outcome.passed,
                severity=dg.AssetCheckSeverity.WARN if outcome.severity == "WARN" else dg.AssetCheckSeverity.ERROR,
                description=outcome.summary, metadata=outcome.metadata, partition=key,
            ))
    return keys


def report_in_run(instance: dg.DagsterInstance, summary: ScanSummary, network: NetworkConfig = NetworkConfig()) -> list[str]:
    """Report the ranges from a run of their own (the CLI runs no Dagster run for a scan)."""
    keys: list[str] = []

    @dg.op(name="report_scan_ranges")
    def report(context: dg.OpExecutionContext) -> None:
        keys.extend(report_ranges(context.instance, summary, context.log_event, network))

    job = dg.GraphDefinition(name="chain_scan_report", node_defs=[report]).to_job()
    job.execute_in_process(instance=instance, tags={"migration-assets/scan": summary.request.scan_id})
    return keys
