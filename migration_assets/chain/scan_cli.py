"""`chain migrate --method auto|scan|query`: which path to take, and the Scan path's run."""

import argparse

from migration_assets.chain.event_source import HeightIndexMissing, NoEventHistory
from migration_assets.chain.events import MissingBlocksError
from migration_assets.chain.items import SourceDataError
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.scan import BLOCKS, EVENTS, ScanRequest, ScanSummary, choose_method, run_scan
from migration_assets.chain.source import latest_height
from migration_assets.chain.scan_report import report_in_run
from migration_assets.chain.settings import NetworkConfig
from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import data_dir

WHOLE_TABLE_END = 2**62  # a scan of the whole table: clipped at the watermark it starts with


def choose_path(args: argparse.Namespace, source: ChainSourceResource, network: NetworkConfig) -> str | None:
    """"scan" or "query" (printed, with why); an omitted --end-height becomes the watermark's next
    height. None (with the error printed) when there is nothing to migrate."""
    args.whole_table = args.end_height is None and args.start_height == 0
    if args.end_height is None:
        settings, table = source.settings, network.tables(source.settings)[0]
        tip = latest_height(source.client(), table, settings.block_tag)
        if tip is None:
            print(f"error: {table} has no watermark ({settings.block_tag}-latest): "
                  "no blocks to migrate yet; pass --end-height to migrate heights anyway")
            return None
        args.end_height = tip + 1
    if not 0 <= args.start_height < args.end_height:
        return "query"  # the caller reports the bad span
    method, why = choose_method(
        args.method, args.start_height, args.end_height, source.settings.block_range_size, args.whole_table
    )
    print(f"method: {method} ({why})")
    return method


def scan_request(
    source: ChainSourceResource, kind: str, start: int, end: int, database_url: str | None = None,
    network: NetworkConfig = NetworkConfig(),
) -> ScanRequest:
    """A Scan of the network's block (or event) table, into its schema, set by the CHAIN_* settings."""
    settings = source.settings
    block_table, event_table = network.tables(settings)
    table, tag = (block_table, settings.block_tag) if kind == BLOCKS else (event_table, settings.event_tag)
    return ScanRequest(
        kind, table, tag, start, end,
        range_size=settings.block_range_size if kind == BLOCKS else settings.event_range_size,
        database_url=database_url or PostgresResource().resolved_url(),
        segments=settings.scan_segments, processes=settings.scan_processes,
        chunk=settings.load_chunk_heights if kind == BLOCKS else settings.load_chunk_events,
        max_read_units=settings.scan_max_read_units,
        limiter_path=str(data_dir() / f"chain-scan-{table}.bucket"),
        client_spec=source.client_spec(),
        schema=network.schema,
    )


def migrate_by_scan(args: argparse.Namespace, source: ChainSourceResource, event_ids, network: NetworkConfig) -> int:
    """Blocks, then events, each by a parallel Scan of the network's tables. `event_ids(source, start,
    end, network)` finds the event ids of a height span (None when it has no events)."""
    end = WHOLE_TABLE_END if args.whole_table else args.end_height
    instance = project_instance()
    try:
        if not args.skip_blocks:
            blocks = run_scan(scan_request(source, BLOCKS, args.start_height, end, network=network), source.client())
            if print_scan("blocks", blocks, instance, network):
                print("events: not migrated, since block ranges failed (events need their blocks)")
                return _failed()
        if not args.skip_events:
            ids = (1, WHOLE_TABLE_END) if args.whole_table else event_ids(source, args.start_height, args.end_height, network)
            if ids is None:
                print(f"error: no events found at heights {args.start_height} and {args.end_height - 1}")
                return 1
            events = run_scan(scan_request(source, EVENTS, *ids, network=network), source.client())
            if print_scan("events", events, instance, network):
                return _failed()
    except (SourceDataError, MissingBlocksError, HeightIndexMissing, NoEventHistory) as error:
        print(f"error: {error}")
        return _failed()
    return 0


def print_scan(what: str, summary: ScanSummary, instance, network: NetworkConfig) -> int:
    """Print the scan's outcome and its failed range checks, report its ranges to the Dagster
    instance (as partitions of the chain assets, with their checks); return how many ranges failed."""
    request = summary.request
    report_in_run(instance, summary, network)
    ran = (f"{request.segments} segments" if summary.segments_run == request.segments
           else f"the {summary.segments_run} unfinished of {request.segments} segments (resumed)")
    print(f"{what}: scanned {request.table} up to its watermark {request.watermark}, {ran} in "
          f"{request.processes} processes: {summary.items} items, {len(summary.counts)} ranges checked, "
          f"{summary.seconds:.1f} s")
    for key, outcomes in summary.checks.items():
        for outcome in outcomes:
            if not outcome.passed:
                label = "FAILED" if outcome.severity == "ERROR" else "WARNING"
                print(f"{what} {key}: {label} {outcome.name}: {outcome.summary}")
    return len(summary.failed_ranges)


def _failed() -> int:
    print("next step: fix the cause named above and run the same command again: the scan resumes "
          "where it stopped, and every load is idempotent.")
    return 1
