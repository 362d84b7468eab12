"""A run's failure report: each file that failed or awaits a retry, with the reason, the attempts
made and when it is tried next; as table rows (the UI) and as a CSV written next to the data in S3
(`{FILES_S3_PREFIX}{FILES_REPORT_PREFIX}{run_id}.csv`). Pure: no Dagster, no database."""

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

DEFAULT_REPORT_PREFIX = "_reports/"
TABLE_ROWS = 100  # rows shown in the UI; the CSV holds them all
RETRY_EVERY = timedelta(minutes=30)  # the files_retries schedule's cadence (its cron is made from this)
NO_RETRY_LEFT = "none: out of retries; fix the cause, then re-run the range (its partition)"

# (name, Dagster TableColumn type) in row order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("file_id", "int"), ("file_uri", "string"), ("status", "string"), ("reason", "string"),
    ("attempts", "int"), ("next_retry", "string"),
)


@dataclass(frozen=True)
class FailedFile:
    file_id: int
    file_uri: str
    status: str            # FAIL (RETRYING only inside a retry run's open transaction)
    reason: str
    attempts: int          # the first copy plus the retries spent
    retries_left: bool     # False: the retry schedule will not take it again


def next_retry_tick(after: datetime, is_open: Callable[[datetime], bool], every: timedelta = RETRY_EVERY) -> datetime | None:
    """The first retry-schedule tick after `after` (ticks at whole multiples of `every` since the epoch,
    in UTC) at which the run window `is_open`; None when it does not open within a week."""
    step = every.total_seconds()
    tick = datetime.fromtimestamp((after.timestamp() // step + 1) * step, timezone.utc)
    for _ in range(int(timedelta(days=8) / every)):
        if is_open(tick):
            return tick
        tick += every
    return None


def report_rows(failures: Iterable[FailedFile], next_retry: datetime | None) -> list[dict[str, Any]]:
    """One row per file, keys in COLUMNS order; `next_retry` (e.g. next_retry_tick(...)) for files
    with retries left, None when no retry is scheduled (window never opens)."""
    when = next_retry.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if next_retry else "not scheduled"
    return [
        {"file_id": f.file_id, "file_uri": f.file_uri, "status": f.status, "reason": f.reason,
         "attempts": f.attempts, "next_retry": when if f.retries_left else NO_RETRY_LEFT}
        for f in failures
    ]


def column_names() -> list[str]:
    return [name for name, _ in COLUMNS]


def report_csv(rows: Iterable[dict[str, Any]]) -> str:
    """RFC 4180 CSV with a header: fields with commas, quotes or line breaks are quoted, so any
    file_uri reads back as it was (csv.reader on the text, newline='')."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=column_names(), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def report_key(key_prefix: str, report_prefix: str, run_id: str) -> str:
    """`{key_prefix}{report_prefix}{run_id}.csv`; key_prefix as FilesSettings.key_prefix gives it ("" or
    ending in "/"), report_prefix normalized to end in one "/" ("" puts reports right under the prefix)."""
    if not run_id or "/" in run_id or run_id in {".", ".."}:
        raise ValueError(f"run id {run_id!r} cannot name a report file")
    folder = report_prefix.strip("/")
    return f"{key_prefix}{folder + '/' if folder else ''}{run_id}.csv"


def upload_report(client: Any, bucket: str, key: str, text: str) -> str:
    """Write the CSV at s3://bucket/key (S3 checks its SHA-256); returns that URI."""
    client.put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"), ContentType="text/csv; charset=utf-8",
                      ChecksumAlgorithm="SHA256")
    return f"s3://{bucket}/{key}"
