"""Continuous sync: page listRepos across ticks, mark moved repos due, run the buckets that have due repos."""

import json

import dagster as dg

from migration_assets.core.postgres import PostgresResource
from migration_assets.core.settings import _env_int
from migration_assets.repos import ledger
from migration_assets.repos.assets import REPOS
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.discovery import discover
from migration_assets.repos.resources import RepoSourceResource

PAGES_PER_TICK = 5  # x 1000 repos per host: keeps a tick well under the 60 s sensor timeout
MAX_RUNS_PER_TICK = 64
SYNC_TAG = "migration-assets/repo-sync"


def sync_interval_seconds() -> int:
    return _env_int("REPO_SYNC_INTERVAL_SECONDS", 60)


@dg.sensor(
    name="repo_sync",
    minimum_interval_seconds=sync_interval_seconds(),
    asset_selection=[REPOS],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Lists repos of REPO_DISCOVERY_HOSTS a few pages per tick (cursor kept across ticks), marks "
    "new repos and repos whose head moved as due, and runs each bucket that has due repos (incl. retries).",
)
def repo_sync(
    context: dg.SensorEvaluationContext, postgres: PostgresResource, repo_source: RepoSourceResource
) -> dg.SensorResult:
    settings = repo_source.settings
    cursors: dict[str, str | None] = json.loads(context.cursor) if context.cursor else {}
    clients = repo_source.clients(postgres.resolved_url())
    try:
        with postgres.connection() as conn:
            for host in settings.discovery_hosts:
                try:
                    progress = discover(conn, clients(host), settings.buckets, cursors.get(host), PAGES_PER_TICK)
                except Exception as exc:  # noqa: BLE001 - one dead host must not stop the others' sync
                    context.log.warning(f"listRepos of {host} failed, will try again next tick: {exc}")
                    continue
                cursors[host] = progress.cursor  # None after the last page: the next tick starts over
                context.log.info(f"{host}: {progress.listed} listed, {progress.new} new, {progress.due} due"
                                 + (" (pass complete)" if progress.finished else ""))
            conn.commit()
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
