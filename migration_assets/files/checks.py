"""Checks of a file range, free of Dagster: counts against the source, checksums against S3, claims."""

import os
from collections.abc import Callable
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
    CHECK_CHECKSUMS: "every SUCCESS object in S3 is the one copied: size and ETag as recorded when S3 verified its "
    "SHA-256 (listing), stored checksum and sha256 metadata by HEAD (a sample, or all with FILES_CHECK_MODE=head)",
    CHECK_HEARTBEATS: "no PROCESSING range anywhere whose lease expired (warns; cleanup releases them)",
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


def _key(target: S3Target, copied: store.CopiedFile) -> str:
    return copied.new_uri.removeprefix(f"s3://{target.bucket}/")


def _object_problem(target: S3Target, copied: store.CopiedFile) -> str | None:
    """HEAD the object: size, `sha256` metadata and S3's stored checksum against the record."""
    try:
        head = target.client.head_object(Bucket=target.bucket, Key=_key(target, copied), ChecksumMode="ENABLED")
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


LIST_PAGE = 1000  # S3's most keys per ListObjectsV2 response


def _list_slice(target: S3Target, keys: list[str], start_after: str | None) -> dict[str, tuple[int, str]]:
    """Size and ETag of `keys` (sorted, consecutive in the range) from ListObjectsV2 starting just
    after the key before them, giving up a few pages past the slice (a prefix shared with others)."""
    wanted, found = set(keys), {}
    params = {"Bucket": target.bucket, "Prefix": os.path.commonprefix(keys), "MaxKeys": LIST_PAGE}
    if start_after is not None:
        params["StartAfter"] = start_after
    for _ in range(3):
        page = target.client.list_objects_v2(**params)
        contents = page.get("Contents", [])
        found.update({o["Key"]: (o["Size"], o["ETag"]) for o in contents if o["Key"] in wanted})
        if len(found) == len(wanted) or not page.get("IsTruncated") or (contents and contents[-1]["Key"] >= keys[-1]):
            break
        params["ContinuationToken"] = page["NextContinuationToken"]
    return found


def _listing(target: S3Target, files: list[store.CopiedFile], concurrency: int) -> dict[str, tuple[int, str]]:
    """Size and ETag of the range's objects. The keys are known, so the listing is cut into slices of
    a page each (StartAfter the key before the slice) listed concurrently, not page after page:
    10,000 objects take the time of two pages, not ten."""
    keys = sorted(_key(target, f) for f in files)  # S3 lists in UTF-8 byte order: code point order
    starts = range(0, len(keys), LIST_PAGE)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-list") as pool:
        slices = pool.map(lambda i: _list_slice(target, keys[i:i + LIST_PAGE], keys[i - 1] if i else None), starts)
        return {key: entry for found in slices for key, entry in found.items()}


def _listed_problem(copied: store.CopiedFile, size: int, etag: str) -> str | None:
    if size != copied.size:
        return f"{copied.new_uri}: {size} bytes, recorded {copied.size}"
    if etag != copied.s3_etag:
        return f"{copied.new_uri}: ETag {etag}, recorded {copied.s3_etag} (the object changed since it was copied)"
    return None


def checksum_check(target: S3Target, files: list[store.CopiedFile], concurrency: int, mode: str = "list",
                   on_mismatch: Callable[[list[int]], None] = lambda file_ids: None) -> CheckOutcome:
    """"head": HEAD every object (a request each). "list" (default): S3 verified each object's SHA-256
    when it was uploaded and its ETag was recorded then; a listing (a request per 1,000 objects) shows
    size and ETag unchanged since, and a sample of HEADs (1%, 1 to 20) re-reads stored checksums.
    Objects missing from the listing, or without a recorded ETag, get a HEAD."""
    problems: dict[int, str] = {}  # file_id: what is wrong with its object
    to_head = files
    if mode == "list" and files:
        listed = _listing(target, files, concurrency)
        to_head = []
        for copied in files:
            entry = listed.get(_key(target, copied))
            if entry is None or copied.s3_etag is None:
                to_head.append(copied)
            elif problem := _listed_problem(copied, *entry):
                problems[copied.file_id] = problem
        step = max(1, len(files) // min(20, max(1, len(files) // 100)))
        to_head += [f for f in files[::step] if f not in to_head][:20]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-check") as pool:
        for copied, problem in zip(to_head, pool.map(lambda f: _object_problem(target, f), to_head)):
            if problem:
                problems.setdefault(copied.file_id, problem)  # the listing's finding first
    if problems:
        on_mismatch(sorted(problems))
    how = f"listing, {len(to_head)} by HEAD" if mode == "list" else "HEAD of each"
    summary = (f"{len(files)} objects match their records ({how})" if not problems else
               f"{len(problems)}/{len(files)} objects do not match: {listing(sorted(problems.values()), 5)}. "
               "Their files are marked FAIL: the retry schedule copies them again")
    return CheckOutcome(CHECK_CHECKSUMS, not problems, summary, metadata={
        "objects_checked": len(files), "objects_headed": len(to_head), "mismatches": len(problems)})


def heartbeat_check(pool: ConnectionPool, settings: FilesSettings) -> CheckOutcome:
    with pool.connection() as conn:
        stale = store.stale_processing(conn)
    summary = ("every PROCESSING range has a live lease" if not stale else
               f"{len(stale)} PROCESSING ranges whose worker stopped renewing its lease for "
               f"{settings.stale_minutes:g} min (FILES_STALE_MINUTES): "
               f"{listing([f'[{lo}, {hi})' for lo, hi, _ in stale], 5)}; the next cleanup or run of the range takes them")
    return CheckOutcome(CHECK_HEARTBEATS, not stale, summary, severity="WARN", metadata={"stale_ranges": len(stale)})


def range_checks(pool: ConnectionPool, target: S3Target, settings: FilesSettings, min_id: int, max_id: int) -> list[CheckOutcome]:
    """A re-verification of a whole range from the tables and S3 (HEAD of every copied object)."""
    with pool.connection() as conn:
        counts = store.range_counts(conn, min_id, max_id, settings.max_retries)
        copied = store.copied_files(conn, min_id, max_id)

    def copy_again(file_ids: list[int]) -> None:  # a copy recorded SUCCESS that S3 no longer holds
        with pool.connection() as conn:
            store.mark_not_copied(conn, file_ids, "its object in S3 is missing or no longer matches its record "
                                                  f"(found by the {CHECK_CHECKSUMS} check); the retry copies it again")

    checksums = checksum_check(target, copied, settings.concurrency, settings.check_mode, copy_again)
    return [count_check(counts), checksums, heartbeat_check(pool, settings)]
