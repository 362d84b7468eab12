"""`chain/block_scan`: the bulk Scan of the block table in Dagster, one partition per Scan segment.

Each partition runs (or resumes) its segment of the whole-table scan (the same scan as
`chain migrate --start-height 0 --method scan`, so either resumes the other). The run that finds every
segment done reports the height ranges the scan covered as materializations of `chain/block_metadata`,
with that asset's checks evaluated per range against the counts the scan gathered.
"""

from dataclasses import replace

import dagster as dg
import psycopg

from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.scan import (
    BLOCKS, ScanRequest, begin_scan, range_checks, scan_segment, scan_summary,
)
from migration_assets.chain.scan_cli import WHOLE_TABLE_END, scan_request
from migration_assets.chain.scan_report import report_ranges
from migration_assets.chain.settings import ChainSettings
from migration_assets.core.resources import PostgresResource

BLOCK_SCAN = dg.AssetKey(["chain", "block_scan"])
scan_segments = dg.StaticPartitionsDefinition([str(s) for s in range(ChainSettings.load().scan_segments)])


@dg.asset(
    key=BLOCK_SCAN,
    partitions_def=scan_segments,
    group_name="chain",
    kinds={"dynamodb", "postgres"},
    pool="chain_dynamodb",
    description="One segment of a parallel Scan of the whole block table (CHAIN_SCAN_SEGMENTS), resumed "
    "where it stopped; when the last segment ends, the covered ranges of chain/block_metadata show as "
    "materialized, with their checks.",
)
def block_scan(
    context: dg.AssetExecutionContext, postgres: PostgresResource, chain_source: ChainSourceResource
) -> dg.MaterializeResult:
    client = chain_source.client()
    request = scan_request(chain_source, BLOCKS, 0, WHOLE_TABLE_END, postgres.resolved_url())
    request = replace(request, segments=len(scan_segments.get_partition_keys()), processes=1)
    request = begin_scan(request, client)
    if request.watermark is None:
        context.log.warning(f"{request.table} has no watermark ({request.tag}-latest) yet: nothing to scan")
        return dg.MaterializeResult(metadata={"items_read": dg.MetadataValue.int(0)})
    read = scan_segment(request, int(context.partition_key), client)
    context.log.info(f"segment {context.partition_key}/{request.segments} of {request.table}: {read} items read")
    reported = report_if_complete(context, request)
    return dg.MaterializeResult(metadata={
        "items_read": dg.MetadataValue.int(read),
        "watermark": dg.MetadataValue.int(request.watermark if request.watermark is not None else -1),
        "ranges_reported": dg.MetadataValue.int(len(reported)),
    })


def report_if_complete(context: dg.AssetExecutionContext, request: ScanRequest) -> list[str]:
    """When every segment is done: the covered ranges (partition keys), reported from this run."""
    with psycopg.connect(request.database_url, autocommit=True) as conn:
        [left] = conn.execute(
            "SELECT count(*) FROM chain_scan_segments WHERE scan_id = %s AND NOT done", (request.scan_id,)
        ).fetchone()
        if left:
            return []
        summary = scan_summary(conn, request)
        summary.checks = range_checks(conn, summary)
    return report_ranges(context.instance, summary, context.log_event)
