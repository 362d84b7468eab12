"""When the file pipeline runs: ranges expanded (and stale claims released) hourly, pending ranges
launched while the run window is open (with the seed's idle backoff), retries every 30 minutes."""

from datetime import datetime, timedelta, timezone

import dagster as dg
from pydantic import BaseModel

from migration_assets.core.resources import PostgresResource
from migration_assets.files.assets import COPIED_FILES, FILE_RETRIES, MIGRATION_RANGES
from migration_assets.files.ranges import range_key
from migration_assets.files.report import RETRY_EVERY
from migration_assets.files.resources import FilesResource
from migration_assets.files.window import RunWindow

# The seed's documented steps after 1, 2, 3, 4, 5+ idle polls: a fixed table, not an exponential, so
# not core.backoff.Backoff (whose doubling and jitter would change them).
IDLE_BACKOFF_SECONDS = (30, 300, 600, 1800, 3600)

files_ranges_hourly = dg.ScheduleDefinition(
    name="files_ranges_hourly", cron_schedule="0 * * * *", target=[MIGRATION_RANGES],
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Expands migration_ranges from new source_files and releases stale claims.",
)


def _tick_time(context) -> datetime:
    scheduled = getattr(context, "scheduled_execution_time", None)
    return scheduled or datetime.now(timezone.utc)


@dg.schedule(
    name="files_retries", cron_schedule=f"*/{RETRY_EVERY.seconds // 60} * * * *", target=[FILE_RETRIES],
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Retries FAIL files in batches while the run window is open.",
)
def files_retries(context: dg.ScheduleEvaluationContext, files: FilesResource):
    window = RunWindow(files.settings().window)
    at = _tick_time(context)
    if not window.is_open(at):
        return dg.SkipReason(f"run window closed ({window.describe()})")
    return dg.RunRequest(run_key=None)


class PendingCursor(BaseModel):
    idle_polls: int = 0
    next_poll: float = 0.0  # epoch seconds: no polling before this (idle backoff)


def window_run_key(window: RunWindow, at: datetime) -> str:
    """Names the window a tick belongs to, so each window requests each pending range once more."""
    local = at.astimezone(window.zone)
    shift = timedelta(hours=window.settings.end.hour, minutes=window.settings.end.minute)
    return (local - shift).date().isoformat()


def plan_pending(pending: list[tuple[int, int, int]], window: RunWindow, at: datetime, limit: int) -> list[dg.RunRequest]:
    tag = window_run_key(window, at)
    return [
        dg.RunRequest(run_key=f"{range_key(lo, hi)}:{attempts}:{tag}", partition_key=range_key(lo, hi),
                      asset_selection=[COPIED_FILES])
        for lo, hi, attempts in pending[:limit]
    ]


@dg.sensor(
    name="files_pending_ranges", minimum_interval_seconds=30, asset_selection=[COPIED_FILES],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="While the run window is open, launches runs for PENDING ranges (FILES_MAX_RANGE_RUNS per "
    "tick; the files_s3 pool bounds how many copy at once); idle backoff 30 s to 60 min when none are left.",
)
def files_pending_ranges(context: dg.SensorEvaluationContext, postgres: PostgresResource, files: FilesResource):
    settings = files.settings()
    window = RunWindow(settings.window)
    now = datetime.now(timezone.utc)
    cursor = PendingCursor.model_validate_json(context.cursor) if context.cursor else PendingCursor()
    if not window.is_open(now):
        return dg.SkipReason(f"run window closed ({window.describe()})")
    if now.timestamp() < cursor.next_poll:
        return dg.SkipReason(f"idle backoff: next poll at {datetime.fromtimestamp(cursor.next_poll, timezone.utc):%H:%M:%S} UTC")
    with postgres.connection() as conn:
        pending = conn.execute(
            "SELECT min_id, max_id, attempts FROM migration_ranges WHERE status = 'PENDING' ORDER BY min_id LIMIT %s",
            (settings.max_range_runs,),
        ).fetchall()
    if not pending:
        idle = cursor.idle_polls + 1
        wait = IDLE_BACKOFF_SECONDS[min(idle, len(IDLE_BACKOFF_SECONDS)) - 1]
        context.update_cursor(PendingCursor(idle_polls=idle, next_poll=now.timestamp() + wait).model_dump_json())
        return dg.SkipReason(f"no PENDING ranges; polling again in {wait} s")
    return dg.SensorResult(
        run_requests=plan_pending(pending, window, now, settings.max_range_runs),
        cursor=PendingCursor().model_dump_json(),
    )
