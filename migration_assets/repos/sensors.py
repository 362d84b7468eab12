"""Continuous sync: page listRepos across ticks, mark moved repos due, run the buckets that have due repos."""

import json
import time

import dagster as dg
import psycopg

from migration_assets.core.resources import PostgresResource
from migration_assets.repos import ledger
from migration_assets.repos.assets import REPOS
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.discovery import discover, mark_out_of_scope
from migration_assets.repos.resources import HostClients, RepoSourceResource
from migration_assets.repos.settings import RepoSettings

MAX_RUNS_PER_TICK = 64
SYNC_TAG = "migration-assets/repo-sync"


@dg.sensor(
    name="repo_sync",
    minimum_interval_seconds=RepoSettings.load().sync_interval_seconds,
    asset_selection=[REPOS],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Lists repos of REPO_DISCOVERY_HOSTS for up to REPO_SENSOR_TICK_SECONDS per tick (cursor kept "
    "across ticks), marks new repos and repos whose head moved as due, and runs each bucket that has due "
    "repos (incl. retries); repos stored under another REPO_COLLECTIONS / REPO_SIGNAL_COLLECTION become due.",
)
def repo_sync(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, repo_source: RepoSourceResource
) -> dg.SensorResult:
    settings = repo_source.settings
    cursors: dict[str, str | None] = json.loads(context.cursor) if context.cursor else {}
    clients = repo_source.clients(postgres.resolved_url())
    try:
        with postgres.connection() as conn:
            list_hosts(context, conn, clients, settings, cursors)
            conn.commit()
            if widened := mark_out_of_scope(conn, settings.scope):
                context.log.info(f"{widened} repos stored under another REPO_COLLECTIONS / REPO_SIGNAL_COLLECTION "
                                 f"are due again (now {settings.scope.key})")
            due = ledger.due_buckets(conn)
    finally:
        clients.close()
    requests = [
        dg.RunRequest(
            partition_key=bucket_key(bucket),
            run_key=f"repos-{bucket_key(bucket)}-{count}-{latest:.6f}",
            tags={SYNC_TAG: "true"},
        )
        for bucket, (count, latest) in list(due.items())[:MAX_RUNS_PER_TICK]
    ]
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursors))


def list_hosts(context: dg.SensorEvaluationContext, conn: psycopg.Connection, clients: HostClients,
               settings: RepoSettings, cursors: dict[str, str | None]) -> None:
    """Page each host's listRepos from its cursor, within the tick's time budget shared evenly by the
    hosts (what one leaves unused goes to the next), so the tick stays under Dagster's sensor timeout
    however slow a host is; each host goes on from its updated cursor next tick."""
    hosts = settings.discovery_hosts
    end = time.monotonic() + settings.sensor_tick_seconds
    for index, host in enumerate(hosts):
        now = time.monotonic()
        deadline = now + (end - now) / (len(hosts) - index)
        try:
            progress = discover(conn, clients(host), settings.buckets, cursors.get(host), deadline,
                                signal=settings.signal_collection)
        except Exception as exc:  # noqa: BLE001 - one dead host must not stop the others' sync
            context.log.warning(f"listRepos of {host} failed, will try again next tick: {exc}")
            continue
        cursors[host] = progress.cursor  # None after the last page: the next tick starts over
        context.log.info(f"{host}: {progress.pages} pages, {progress.listed} listed, {progress.new} new, "
                         f"{progress.due} due" + (" (pass complete)" if progress.finished else " (goes on next tick)"))
