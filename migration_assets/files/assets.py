"""Dagster assets of the file pipeline: a thin shell over `store` (ranges) and `worker` (copies)."""

import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import dagster as dg
from botocore.exceptions import BotoCoreError, ClientError
from dagster_aws.s3 import S3Resource

from migration_assets.core.dagster_glue import check_result, check_specs
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import data_dir
from migration_assets.files import checks, report, report_store, store
from migration_assets.files.bandwidth import describe_rate, shared_limiter
from migration_assets.files.mover import S3Target
from migration_assets.files.partitions import file_ranges, register_ranges
from migration_assets.files.ranges import parse_range_key
from migration_assets.files.resources import FilesResource
from migration_assets.files.s3client import copy_client
from migration_assets.files.settings import FilesSettings
from migration_assets.files.window import RunWindow
from migration_assets.files.worker import Progress, RangeJob, StopReason, claimed, migrate_claimed_range, retry_failed, worker_name

MIGRATION_RANGES = dg.AssetKey(["files", "migration_ranges"])
COPIED_FILES = dg.AssetKey(["files", "copied_files"])
FILE_RETRIES = dg.AssetKey(["files", "file_retries"])
POOL = "files_s3"
PROGRESS_LOG_SECONDS = 5.0  # a copy pass logs its progress at most this often (and once at its end)
BANDWIDTH_BUCKET_FILE = "files-bandwidth.bucket"  # the machine's shared token bucket, in MIGRATION_DATA_DIR


class WindowConfig(dg.Config):
    ignore_window: bool = False  # copy even outside the run window (the CLI's --ignore-window)


def window_stop(settings: FilesSettings, ignore: bool) -> StopReason:
    window = RunWindow(settings.window)
    return lambda: None if ignore or window.is_open() else f"the run window closed ({window.describe()})"


def start_pass(
    context: dg.AssetExecutionContext, config: WindowConfig, postgres: PostgresResource,
    files_s3: S3Resource, files: FilesResource,
) -> tuple[RangeJob, "BandwidthUse"]:
    """What every copying pass does first: refuse outside the window, build the job, log the bandwidth."""
    settings = files.settings()
    refuse_outside_window(settings, config.ignore_window)
    job = make_job(postgres, files_s3, settings, config.ignore_window)
    return job, BandwidthUse(context, job)


def make_job(postgres: PostgresResource, files_s3: S3Resource, settings: FilesSettings, ignore_window: bool) -> RangeJob:
    if not settings.source_root.is_dir():
        raise dg.Failure(f"FILES_SOURCE_ROOT {settings.source_root} is not a directory: set it to the files' root")
    limiter = shared_limiter(settings.bandwidth, ZoneInfo(settings.run_window_tz), data_dir() / BANDWIDTH_BUCKET_FILE)
    target = S3Target(copy_client(files_s3, settings.concurrency), settings.bucket, settings.key_prefix, limiter)
    return RangeJob(postgres.pool(), target, settings, window_stop(settings, ignore_window))


def progress_metadata(progress: Progress) -> dict:
    rate = progress.bytes_copied / progress.seconds / 1e6 if progress.seconds else 0.0
    return {
        "files_listed": dg.MetadataValue.int(progress.listed),
        "files_copied": dg.MetadataValue.int(progress.copied),
        "files_skipped": dg.MetadataValue.int(progress.skipped),
        "files_failed": dg.MetadataValue.int(progress.failed),
        "files_awaiting_retry": dg.MetadataValue.int(progress.awaiting_retry),
        "bytes_copied": dg.MetadataValue.int(progress.bytes_copied),
        "mb_per_second": dg.MetadataValue.float(round(rate, 2)),
        "files_per_second": dg.MetadataValue.float(round(progress.done / progress.seconds, 1) if progress.seconds else 0.0),
        "seconds": dg.MetadataValue.float(round(progress.seconds, 2)),
        "failures": dg.MetadataValue.text("\n".join(f"{fid}: {err}" for fid, err in progress.failures) or "none"),
    }


def bandwidth_in_force(settings: FilesSettings) -> str:
    """The upload limit FILES_BANDWIDTH sets now: a window can be throttled rather than closed."""
    if settings.bandwidth is None:
        return "no limit (FILES_BANDWIDTH unset)"
    rate = settings.bandwidth.limit_at(datetime.now(timezone.utc), ZoneInfo(settings.run_window_tz))
    if rate is None:
        return "no limit now (FILES_BANDWIDTH slot 'off')"
    return f"throttled to {describe_rate(rate)} for the whole machine (FILES_BANDWIDTH)"


class BandwidthUse:
    """The limit in force when a pass starts, logged, and how often the pass waited for the limiter
    (waits counted by the process's shared limiter, so concurrent passes of one process add up)."""

    def __init__(self, context: dg.AssetExecutionContext, job: RangeJob) -> None:
        self._limiter = job.target.limiter
        self._waits_before = self._limiter.waits if self._limiter else 0
        self.limit = bandwidth_in_force(job.settings)
        context.log.info(f"bandwidth: {self.limit}")

    def metadata(self) -> dict:
        waits = (self._limiter.waits - self._waits_before) if self._limiter else 0
        return {"bandwidth_limit": dg.MetadataValue.text(self.limit),
                "bandwidth_waits": dg.MetadataValue.int(waits)}


def failure_report(context: dg.AssetExecutionContext, job: RangeJob, failures: list[report.FailedFile]) -> dict:
    """The run's failure report: its first rows as a table, all of them as a CSV in S3 (when any)."""
    settings = job.settings
    window = RunWindow(settings.window)
    rows = report.report_rows(failures, report.next_retry_tick(datetime.now(timezone.utc), window.is_open))
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in report.COLUMNS])
    metadata = {"failure_report": dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in rows[:report.TABLE_ROWS]], schema=schema)}
    if not rows:
        return metadata
    key = report.report_key(settings.key_prefix, settings.report_prefix, context.run.run_id)
    try:
        uri = report.upload_report(job.target.client, settings.bucket, key, report.report_csv(rows))
    except (ClientError, BotoCoreError) as error:  # the copies are recorded: a lost report fails nothing
        context.log.warning(f"failure report not written to s3://{settings.bucket}/{key}: {error}; "
                            "the table above lists the first failures, the next run writes its own report")
        return {**metadata, "failure_report_csv": dg.MetadataValue.text(f"not written: {error}")}
    context.log.info(f"{len(rows)} failed files: report at {uri}")
    return {**metadata, "failure_report_csv": dg.MetadataValue.url(uri)}


def files_result(copied: int, unchanged: int, failed: int, awaiting_retry: int, verified: bool | None) -> str:
    """The one wording of a pass's outcome, in the run's metadata and on the CLI. `failed`: files not
    SUCCESS at the end (of them, `awaiting_retry` have retries left); `verified` None: not checked."""
    line = f"{copied} copied, {unchanged} unchanged, {failed} failed"
    if awaiting_retry:
        line += f" ({awaiting_retry} awaiting a retry)"
    if verified is None:
        return line
    return line + (": verified (every file SUCCESS, every object as recorded)" if verified else ": NOT verified")


def range_verdict(progress: Progress, outcomes: list) -> dict:
    """`result` and `verified` of a range after its pass (failures counted over the whole range, not
    only this pass): verified only when every file is SUCCESS (count check) and every object matches
    its record (checksum check)."""
    counts = next(o.metadata for o in outcomes if o.name == checks.CHECK_COUNT)
    verified = all(o.passed for o in outcomes if o.name in {checks.CHECK_COUNT, checks.CHECK_CHECKSUMS})
    failed = counts["failed_awaiting_retry"] + counts["failed_final"] + counts["not_attempted"]
    text = files_result(progress.copied, progress.skipped, failed, counts["failed_awaiting_retry"], verified)
    return {"result": dg.MetadataValue.text(text), "verified": dg.MetadataValue.bool(verified),
            "range_files_failed": dg.MetadataValue.int(failed),
            "range_files_awaiting_retry": dg.MetadataValue.int(counts["failed_awaiting_retry"])}


def refuse_outside_window(settings: FilesSettings, ignore: bool) -> None:
    window = RunWindow(settings.window)
    if not ignore and not window.is_open():
        raise dg.Failure(description=f"Nothing copied: {window.closed_message()}", allow_retries=False)


@dg.asset(
    key=MIGRATION_RANGES,
    group_name="files",
    kinds={"postgres"},
    description="Expands migration_ranges from source_files (FILES_RANGE_SIZE ids each), reopens completed "
    "ranges that gained files, releases ranges whose lease expired, and registers the partitions.",
)
def migration_ranges(context: dg.AssetExecutionContext, postgres: PostgresResource, files: FilesResource) -> dg.MaterializeResult:
    settings = files.settings()
    with postgres.connection() as conn:
        released = store.release_stale(conn)
        added, reopened = store.expand_ranges(conn, settings.range_size)
        ranges = store.all_ranges(conn)
    register_ranges(context.instance, [(lo, hi) for lo, hi, _ in ranges])
    if released:
        context.log.warning(f"released {len(released)} ranges whose lease expired: {released[:10]}")
    by_status = {s: sum(1 for *_, status in ranges if status == s) for s in ("PENDING", "PROCESSING", "COMPLETE")}
    return dg.MaterializeResult(metadata={
        "ranges_added": dg.MetadataValue.int(len(added)),
        "ranges_reopened": dg.MetadataValue.int(len(reopened)),
        "stale_ranges_released": dg.MetadataValue.int(len(released)),
        **{f"ranges_{s.lower()}": dg.MetadataValue.int(n) for s, n in by_status.items()},
    })


@dg.asset(
    key=COPIED_FILES,
    partitions_def=file_ranges,
    deps=[MIGRATION_RANGES],
    check_specs=check_specs(COPIED_FILES, checks.DESCRIPTIONS, file_ranges, warn=checks.WARN_CHECKS),
    group_name="files",
    kinds={"s3", "postgres"},
    pool=POOL,
    description="Copies the range's files from FILES_SOURCE_ROOT to S3 with their SHA-256, verified, and "
    "records each in migration_files. Stops cleanly when the run window closes (range back to PENDING).",
)
def copied_files(
    context: dg.AssetExecutionContext, config: WindowConfig, postgres: PostgresResource,
    files_s3: S3Resource, files: FilesResource,
) -> dg.MaterializeResult:
    job, bandwidth = start_pass(context, config, postgres, files_s3, files)
    settings = job.settings
    min_id, max_id = parse_range_key(context.partition_key)

    logged = [0.0]  # when progress was last logged

    def log_progress(progress: Progress, final: bool = False) -> None:
        """At most every PROGRESS_LOG_SECONDS, and once at the end: each log line is an event Dagster
        stores (a line per recorded batch was ~3% of the client CPU of 10,000 small files)."""
        now = time.monotonic()
        if final or now - logged[0] >= PROGRESS_LOG_SECONDS:
            logged[0] = now
            context.log.info(f"[{min_id}, {max_id}): {progress.done}/{progress.listed} files, "
                             f"{progress.bytes_copied / 1e6:.1f} MB, {progress.failed} failed")

    try:
        with claimed(job, min_id, max_id, worker_name()) as claim:
            progress = migrate_claimed_range(job, claim, on_progress=log_progress)
        log_progress(progress, final=True)
    except store.ClaimRefused as refused:
        raise dg.Failure(description=str(refused), allow_retries=False) from None
    if progress.stopped:
        raise dg.Failure(
            description=f"Stopped cleanly: {progress.stopped}. {progress.done}/{progress.listed} files done; "
            f"range [{min_id}, {max_id}) released to PENDING; it resumes in the next window.",
            metadata={**progress_metadata(progress), **bandwidth.metadata()}, allow_retries=False,
        )
    checks_started = time.monotonic()
    outcomes = checks.range_checks(job.pool, job.target, settings, min_id, max_id)
    check_seconds = time.monotonic() - checks_started
    with job.pool.connection() as conn:
        failures = report_store.failed_in_ranges(conn, [(min_id, max_id)], settings.max_retries)
    return dg.MaterializeResult(
        metadata={**progress_metadata(progress), **range_verdict(progress, outcomes), **bandwidth.metadata(),
                  **failure_report(context, job, failures),
                  "dagster/row_count": dg.MetadataValue.int(progress.listed),
                  "check_seconds": dg.MetadataValue.float(round(check_seconds, 2))},
        check_results=[check_result(outcome) for outcome in outcomes],
    )


@dg.asset(
    key=FILE_RETRIES,
    deps=[COPIED_FILES],
    group_name="files",
    kinds={"s3", "postgres"},
    pool=POOL,
    description="Copies FAIL files again (up to FILES_MAX_RETRIES times each, FILES_RETRY_BATCH per run); "
    "files out of retries stay FAIL with their error.",
)
def file_retries(
    context: dg.AssetExecutionContext, config: WindowConfig, postgres: PostgresResource,
    files_s3: S3Resource, files: FilesResource,
) -> dg.MaterializeResult:
    job, bandwidth = start_pass(context, config, postgres, files_s3, files)
    settings = job.settings
    progress = retry_failed(job)
    result = files_result(progress.copied, progress.skipped, progress.failed, 0, None)
    context.log.info(f"retried {progress.listed} files: {result}")
    with job.pool.connection() as conn:
        failures = report_store.failed_among(conn, progress.batch_ids, settings.max_retries)
    return dg.MaterializeResult(metadata={**progress_metadata(progress), **bandwidth.metadata(),
                                          **failure_report(context, job, failures),
                                          "result": dg.MetadataValue.text(result)})
