"""`migration-assets files ...`: expand ranges and migrate every pending one in-process (runs show
in the Dagster UI), retry failed files, and seed demo files."""

import argparse
import time
from collections import Counter
from datetime import datetime, timezone

import dagster as dg

from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.core.runs import materialize_partition, materialized_metadata, print_partition_summary, root_cause
from migration_assets.files import assets
from migration_assets.files.partitions import register_ranges
from migration_assets.files.ranges import range_key
from migration_assets.files.resources import FilesResource, FilesS3Resource
from migration_assets.files.seed import seed_files
from migration_assets.files.window import RunWindow

EXIT_WINDOW_CLOSED = 3  # stopped cleanly at the window's close: run again in the next window
FAILURES_SHOWN = 5


def add_commands(commands: argparse._SubParsersAction) -> None:
    files = commands.add_parser("files", help="files from FILES_SOURCE_ROOT to S3")
    actions = files.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser("migrate", help="expand ranges, then copy every pending range")
    migrate.add_argument("--ignore-window", action="store_true", help="copy now, even outside the run window")
    migrate.add_argument("--no-wait", action="store_true",
                         help=f"outside the window, exit {EXIT_WINDOW_CLOSED} instead of waiting for it to open")
    migrate.set_defaults(handler=migrate_command)
    retry = actions.add_parser("retry", help="copy FAIL files with retries left again (one batch)")
    retry.add_argument("--ignore-window", action="store_true", help="copy now, even outside the run window")
    retry.set_defaults(handler=retry_command)
    seed = actions.add_parser("seed", help="demo data: N random files under FILES_SOURCE_ROOT and their source_files rows")
    seed.add_argument("--count", type=int, default=1000, help="how many files (default 1000)")
    seed.set_defaults(handler=seed_command)


def resources() -> dict:
    return {"postgres": PostgresResource(), "files_s3": FilesS3Resource(), "files": FilesResource()}


def wait_for_window(window: RunWindow, no_wait: bool) -> bool:
    """True once the window is open; False (after saying why) when told not to wait."""
    if window.is_open():
        return True
    print(window.closed_message())
    if no_wait:
        return False
    if window.next_open() is None:
        return False
    while not window.is_open():
        time.sleep(min(60.0, max(1.0, (window.next_open() - datetime.now(timezone.utc)).total_seconds())))
    return True


def materialize(instance, asset, resources: dict, partition_key: str | None = None, ignore_window: bool = False):
    config = None if asset is assets.migration_ranges else {"ops": {asset.op.name: {"config": {"ignore_window": ignore_window}}}}
    return materialize_partition(instance, asset, partition_key, resources, "files migrate", run_config=config)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    return "; ".join(root_cause(e.step_failure_data.error) for e in result.all_events if e.is_step_failure)


def metadata_of(result: dg.ExecuteInProcessResult, asset_key: dg.AssetKey) -> dict:
    return materialized_metadata(result, asset_key) or {}


def migrate_command(args: argparse.Namespace) -> int:
    res = resources()
    settings = res["files"].settings()
    if not args.ignore_window and not wait_for_window(RunWindow(settings.window), args.no_wait):
        return EXIT_WINDOW_CLOSED
    instance = project_instance()
    ranges = materialize(instance, assets.migration_ranges, res)
    if not ranges.success:
        print(f"expanding ranges FAILED: {failure_text(ranges)}")
        return 1
    meta = metadata_of(ranges, assets.MIGRATION_RANGES)
    print(f"ranges: {meta['ranges_added']} added, {meta['ranges_reopened']} reopened, "
          f"{meta['stale_ranges_released']} stale released, {meta['ranges_pending']} pending")
    with res["postgres"].connection() as conn:
        pending = conn.execute("SELECT min_id, max_id FROM migration_ranges WHERE status = 'PENDING' ORDER BY min_id").fetchall()
    register_ranges(instance, pending)
    totals: Counter = Counter()
    for lo, hi in pending:
        outcome = migrate_partition(instance, range_key(lo, hi), res, args.ignore_window, totals)
        if outcome == "stopped":
            print("stopped cleanly at the run window's close: run the same command in the next window")
            return EXIT_WINDOW_CLOSED
    unverified = len(pending) - totals["verified"]
    print("files: " + assets.files_result(totals["copied"], totals["unchanged"], totals["failed"],
                                          totals["awaiting_retry"], None))
    if unverified:
        print_first_failures(res["postgres"], pending)
    print(f"{totals['verified']}/{len(pending)} ranges migrated and verified")
    if unverified:
        print("next step: read the failures above (or the runs in the Dagster UI); failed files are retried "
              "every 30 min by the files_retries schedule, or now with `migration-assets files retry`")
    return 1 if unverified else 0


def migrate_partition(instance, key: str, res: dict, ignore_window: bool, totals: Counter) -> str:
    """Materialize one range and add its counts to `totals`; "verified" only when the run says so."""
    result = materialize(instance, assets.copied_files, res, key, ignore_window)
    print_partition_summary(key, assets.COPIED_FILES, result, range_summary)
    if failure_text(result).startswith("Stopped cleanly"):
        return "stopped"
    meta = metadata_of(result, assets.COPIED_FILES)
    print_report_location(meta)
    totals.update(copied=meta.get("files_copied", 0), unchanged=meta.get("files_skipped", 0),
                  failed=meta.get("range_files_failed", 0), awaiting_retry=meta.get("range_files_awaiting_retry", 0))
    verified = result.success and meta.get("verified") is True
    totals["verified"] += verified
    return "verified" if verified else "failed"


def print_report_location(meta: dict) -> None:
    if "failure_report_csv" in meta:
        print(f"  failure report: {meta['failure_report_csv']}")


def range_summary(meta: dict) -> str:
    line = (f"{meta['files_listed']} files: {meta['result']}; "
            f"{meta['bytes_copied'] / 1e6:.1f} MB at {meta['mb_per_second']} MB/s")
    if meta.get("bandwidth_waits"):
        line += f" ({meta['bandwidth_limit']}: waited {meta['bandwidth_waits']} times)"
    return line


def print_first_failures(postgres: PostgresResource, ranges: list[tuple[int, int]]) -> None:
    """The first files of these ranges not SUCCESS: file id, file_uri and the reason recorded."""
    with postgres.connection() as conn:
        rows = conn.execute(
            "SELECT m.file_id, m.old_uri, m.status, m.error FROM migration_files m "
            "JOIN unnest(%s::bigint[], %s::bigint[]) AS r(lo, hi) ON m.file_id >= r.lo AND m.file_id < r.hi "
            "WHERE m.status <> 'SUCCESS' ORDER BY m.file_id LIMIT %s",
            ([lo for lo, _ in ranges], [hi for _, hi in ranges], FAILURES_SHOWN),
        ).fetchall()
    if rows:
        print("first failures:")
    for file_id, uri, status, error in rows:
        print(f"  file {file_id} {uri!r} ({status}): {error or 'no reason recorded'}")


def retry_command(args: argparse.Namespace) -> int:
    instance = project_instance()
    result = materialize(instance, assets.file_retries, resources(), ignore_window=args.ignore_window)
    meta = metadata_of(result, assets.FILE_RETRIES)
    if meta:
        print(f"retried {meta['files_listed']} files: {meta['result']}")
        print_report_location(meta)
    if not result.success:
        print(f"retry FAILED: {failure_text(result)}")
    return 0 if result.success and not meta.get("files_failed") else 1


def seed_command(args: argparse.Namespace) -> int:
    if args.count <= 0:
        print("error: --count must be positive")
        return 2
    settings = FilesResource().settings()
    settings.source_root.mkdir(parents=True, exist_ok=True)
    with PostgresResource().connection() as conn:
        ids = seed_files(conn, settings.source_root, args.count)
    print(f"seeded {len(ids)} files (ids {ids[0]}-{ids[-1]}) under {settings.source_root}")
    return 0
