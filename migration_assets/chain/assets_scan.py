"""`chain/block_scan` and `chain/event_scan`: the bulk Scan of a network's block and event tables in
Dagster, one partition per Scan segment.

Each partition runs (or resumes) its segment of the whole-table scan (the same scan as
`chain migrate --start-height 0 --method scan`, so either resumes the other: the segment's place is
stored with its rows). The run that finds every segment done reports the ranges the scan covered as
materializations of `chain/block_metadata` (or `chain/block_events`), with that asset's checks
evaluated per range against the counts the scan gathered. Events need their blocks: the event scan
depends on the whole block scan, and a segment whose events miss their blocks fails naming them.
"""

from dataclasses import replace

import dagster as dg

from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.scan import (
    BLOCKS, EVENTS, ScanMissingBlocksError, ScanRequest, begin_scan, connect, range_checks, scan_segment,
    scan_summary,
)
from migration_assets.chain.scan_cli import WHOLE_TABLE_END, scan_request
from migration_assets.chain.scan_report import report_ranges
from migration_assets.chain.settings import ChainSettings, NetworkConfig
from migration_assets.core.resources import PostgresResource

scan_segments = dg.StaticPartitionsDefinition([str(s) for s in range(ChainSettings.load().scan_segments)])
_FIRST = {BLOCKS: 0, EVENTS: 1}  # heights start at 0, event ids at 1
_REPORTS = {BLOCKS: "chain/block_metadata height ranges", EVENTS: "chain/block_events event-id ranges"}


def scan_key(network: NetworkConfig, kind: str) -> dg.AssetKey:
    return dg.AssetKey([*network.key_prefix, "chain", "block_scan" if kind == BLOCKS else "event_scan"])


def scan_asset(network: NetworkConfig, kind: str) -> dg.AssetsDefinition:
    """The Scan asset of one network's block (or event) table."""
    deps = [] if kind == BLOCKS else [dg.AssetDep(scan_key(network, BLOCKS), partition_mapping=dg.AllPartitionMapping())]

    @dg.asset(
        key=scan_key(network, kind),
        partitions_def=scan_segments,
        deps=deps,
        group_name=network.prefixed("chain"),
        kinds={"dynamodb", "postgres"},
        pool="chain_dynamodb",
        description=f"One segment of a parallel Scan of the whole {kind[:-1]} table (CHAIN_SCAN_SEGMENTS), "
        f"resumed where it stopped; when the last segment ends, the covered {_REPORTS[kind]} show as "
        "materialized, with their checks.",
    )
    def scan(
        context: dg.AssetExecutionContext, postgres: PostgresResource, chain_source: ChainSourceResource
    ) -> dg.MaterializeResult:
        client = chain_source.client()
        request = scan_request(chain_source, kind, _FIRST[kind], WHOLE_TABLE_END, postgres.resolved_url(), network)
        request = replace(request, segments=len(scan_segments.get_partition_keys()), processes=1)
        request = begin_scan(request, client)
        if request.watermark is None:
            context.log.warning(f"{request.table} has no watermark yet: nothing to scan")
            return dg.MaterializeResult(metadata={"items_read": dg.MetadataValue.int(0)})
        try:
            read = scan_segment(request, int(context.partition_key), client)
        except ScanMissingBlocksError as error:
            raise dg.Failure(description=str(error), allow_retries=False) from error
        context.log.info(f"segment {context.partition_key}/{request.segments} of {request.table}: {read} items read")
        reported = report_if_complete(context, request, network)
        return dg.MaterializeResult(metadata={
            "items_read": dg.MetadataValue.int(read),
            "watermark": dg.MetadataValue.int(request.watermark),
            "ranges_reported": dg.MetadataValue.int(len(reported)),
        })

    return scan


def report_if_complete(context: dg.AssetExecutionContext, request: ScanRequest, network: NetworkConfig) -> list[str]:
    """When every segment is done: the covered ranges (partition keys), reported from this run."""
    with connect(request) as conn:
        [left] = conn.execute(
            "SELECT count(*) FROM chain_scan_segments WHERE scan_id = %s AND NOT done", (request.scan_id,)
        ).fetchone()
        if left:
            return []
        summary = scan_summary(conn, request)
        summary.checks = range_checks(conn, summary)
    return report_ranges(context.instance, summary, context.log_event, network)


# The chain configured the old way: unprefixed keys.
BLOCK_SCAN, EVENT_SCAN = scan_key(NetworkConfig(), BLOCKS), scan_key(NetworkConfig(), EVENTS)
block_scan, event_scan = scan_asset(NetworkConfig(), BLOCKS), scan_asset(NetworkConfig(), EVENTS)
