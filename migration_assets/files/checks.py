"""Checks of a file range, free of Dagster: counts against the source, checksums against S3, claims."""

from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import BotoCoreError, ClientError
from psycopg_pool import ConnectionPool

from migration_assets.core.checks import CheckOutcome, listing
from migration_assets.files import store
from migration_assets.files.mover import S3Target
from migration_assets.files.settings import FilesSettings

CHECK_COUNT = "files_copied"
CHECK_CHECKSUMS = "s3_checksums"
CHECK_HEARTBEATS = "live_claims"
DESCRIPTIONS = {
    CHECK_COUNT: "SUCCESS rows in migration_files = source_files rows in the range",
    CHECK_CHECKSUMS: "every SUCCESS object in S3 has the recorded size, SHA-256 (metadata) and stored checksum",
    CHECK_HEARTBEATS: "no PROCESSING range anywhere without a fresh heartbeat (warns; cleanup releases them)",
}
WARN_CHECKS = frozenset({CHECK_HEARTBEATS})


def count_check(counts: store.RangeCounts) -> CheckOutcome:
    """Failing with retries still to come only warns: the retry schedule may yet fix the range."""
    passed = counts.success == counts.source
    final = counts.failed_final + counts.missing
    summary = (f"{counts.success}/{counts.source} files copied; {counts.failed_retrying} failed awaiting retry, "
               f"{counts.failed_final} failed with no retries left, {counts.missing} not attempted")
    if not passed:
        summary += ". First failures: " + listing([f"{fid}: {err}" for fid, err in counts.failure_samples], 5)
        summary += (". Next: fix the cause, then re-run this partition (or wait for the retry schedule)"
                    if final else ". The retry schedule tries them again")
    return CheckOutcome(CHECK_COUNT, passed, summary, severity="ERROR" if final else "WARN", metadata={
        "source_files": counts.source, "copied": counts.success, "failed_awaiting_retry": counts.failed_retrying,
        "failed_final": counts.failed_final, "not_attempted": counts.missing,
    })


def _object_problem(target: S3Target, copied: store.CopiedFile) -> str | None:
    key = copied.new_uri.removeprefix(f"s3://{target.bucket}/")
    try:
        head = target.client.head_object(Bucket=target.bucket, Key=key, ChecksumMode="ENABLED")
    except (ClientError, BotoCoreError) as error:
        return f"{copied.new_uri}: {error}"
    stored = head.get("ChecksumSHA256")
    if head.get("ContentLength") != copied.size:
        return f"{copied.new_uri}: {head.get('ContentLength')} bytes, recorded {copied.size}"
    if head.get("Metadata", {}).get("sha256") != copied.sha256:
        return f"{copied.new_uri}: sha256 metadata {head.get('Metadata', {}).get('sha256')}, recorded {copied.sha256}"
    if copied.s3_checksum and (stored or "").split("-")[0] != copied.s3_checksum.split("-")[0]:
        return f"{copied.new_uri}: stored checksum {stored}, recorded {copied.s3_checksum}"
    return None


def checksum_check(target: S3Target, files: list[store.CopiedFile], concurrency: int) -> CheckOutcome:
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-check") as pool:
        problems = [p for p in pool.map(lambda f: _object_problem(target, f), files) if p]
    summary = (f"{len(files)} objects match their recorded SHA-256" if not problems else
               f"{len(problems)}/{len(files)} objects do not match: {listing(problems, 5)}. "
               "Next: re-run this partition; it copies every file whose object no longer matches")
    return CheckOutcome(CHECK_CHECKSUMS, not problems, summary, metadata={"objects_checked": len(files),
                                                                          "mismatches": len(problems)})


def heartbeat_check(pool: ConnectionPool, settings: FilesSettings) -> CheckOutcome:
    max_age = settings.heartbeat_seconds * 3  # three missed beats
    with pool.connection() as conn:
        stale = store.stale_processing(conn, max_age)
    summary = ("every PROCESSING range has a fresh heartbeat" if not stale else
               f"{len(stale)} PROCESSING ranges without a heartbeat in {max_age:.0f} s: "
               f"{listing([f'[{lo}, {hi})' for lo, hi, _ in stale], 5)}; the cleanup releases them once "
               f"{settings.stale_minutes:.0f} min old (FILES_STALE_MINUTES)")
    return CheckOutcome(CHECK_HEARTBEATS, not stale, summary, severity="WARN", metadata={"stale_ranges": len(stale)})


def range_checks(pool: ConnectionPool, target: S3Target, settings: FilesSettings, min_id: int, max_id: int) -> list[CheckOutcome]:
    """A re-verification of a whole range from the tables and S3 (HEAD of every copied object)."""
    with pool.connection() as conn:
        counts = store.range_counts(conn, min_id, max_id, settings.max_retries)
        copied = store.copied_files(conn, min_id, max_id)
    return [count_check(counts), checksum_check(target, copied, settings.concurrency), heartbeat_check(pool, settings)]
