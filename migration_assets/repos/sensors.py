"""Continuous sync: page listRepos across ticks, mark moved repos due, run the buckets that have due repos
(several runs on a busy bucket); keep one event-stream run alive per followed host."""

import json
import time

import dagster as dg
import psycopg

from migration_assets.core.backoff import Backoff
from migration_assets.core.resources import PostgresResource
from migration_assets.repos import ledger
from migration_assets.repos.assets import REPOS
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.discovery import discover, mark_out_of_scope
from migration_assets.repos.follow_assets import FOLLOW_HOST_TAG, REPO_STREAM, followed_hosts
from migration_assets.repos.follow_lease import why_gone
from migration_assets.repos.resources import HostClients, RepoSourceResource
from migration_assets.repos.settings import RepoSettings

MAX_RUNS_PER_TICK = 64
CLAIM_BATCHES_PER_RUN = 4  # a bucket gets another run only when each would have this many claims to work on
SYNC_TAG = "migration-assets/repo-sync"
FOLLOW_RESTART = Backoff(base=30.0, cap=1800.0)  # wait after a host's runs failed in a row (ceiling: no jitter)
RECENT_FOLLOW_RUNS = 8
START_GRACE_SECONDS = 300.0  # a follow run takes its host's lease this soon after it starts (plus a lease's ttl)
ALIVE = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
         dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING}


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
            run_key=f"repos-{bucket_key(bucket)}-{count}-{latest:.6f}" + (f"-{n}" if n else ""),
            tags={SYNC_TAG: "true"},
        )
        for bucket, (count, latest) in due.items()
        for n in range(runs_for(count, settings))
    ]
    return dg.SensorResult(run_requests=requests[:MAX_RUNS_PER_TICK], cursor=json.dumps(cursors))


def runs_for(due: int, settings: RepoSettings) -> int:
    """Runs to start on a bucket with `due` repos: one per CLAIM_BATCHES_PER_RUN claim batches, at most
    REPO_RUNS_PER_BUCKET (their leases share the bucket: each claims its own batches)."""
    wanted = -(-due // (settings.claim_batch * CLAIM_BATCHES_PER_RUN))
    return max(1, min(settings.runs_per_bucket, wanted))


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


@dg.sensor(
    name="repo_follow",
    minimum_interval_seconds=30,
    asset_selection=[REPO_STREAM],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Keeps one atproto/repo_stream run alive per host of REPO_FOLLOW_HOSTS (default "
    "REPO_DISCOVERY_HOSTS): a host whose run is queued or running gets nothing; one whose run ended gets the "
    "next (after a run that failed, with backoff). A running run whose lease on its host lapsed (its worker "
    "is gone) is marked failed. Reads only run records and leases: the stream is followed in the runs.",
)
def repo_follow(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    settings = RepoSettings.load()
    hosts = settings.followed_hosts
    known = set(context.instance.get_dynamic_partitions(followed_hosts.name))
    new = [host for host in hosts if host not in known]
    requests = []
    with postgres.connection() as conn:
        for host in hosts:
            request, why = follow_request(context.instance, conn, host, settings)
            if request:
                requests.append(request)
            elif why:
                context.log.info(f"{host}: {why}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[followed_hosts.build_add_request(new)] if new else [],
    )


def follow_request(instance: dg.DagsterInstance, conn: psycopg.Connection, host: str, settings: RepoSettings
                   ) -> tuple[dg.RunRequest | None, str]:
    """The next follow run of `host`, or None and why not. Its run key names the run it follows, so a
    tick repeated before that run shows up asks for the same run."""
    records = instance.get_run_records(dg.RunsFilter(tags={FOLLOW_HOST_TAG: host}), limit=RECENT_FOLLOW_RUNS)
    if alive := [record for record in records if record.dagster_run.status in ALIVE]:
        # Not only the latest: the command's run may have started beside the sensor's.
        return None, "; ".join(filter(None, (fail_if_gone(instance, conn, host, r, settings) for r in alive)))
    failures = next((n for n, r in enumerate(records) if r.dagster_run.status != dg.DagsterRunStatus.FAILURE),
                    len(records))
    if failures and records[0].end_time is not None:
        wait = records[0].end_time + FOLLOW_RESTART.ceiling(failures) - time.time()
        if wait > 0:
            return None, f"{failures} runs failed in a row, the next starts in {wait:.0f} s"
    previous = records[0].dagster_run.run_id if records else "none"
    return dg.RunRequest(
        partition_key=host,
        run_key=f"repo-follow {host} after {previous}",
        tags={
            FOLLOW_HOST_TAG: host,
            # Run monitoring fails a run that overruns well past its time (a hung stream or worker).
            "dagster/max_runtime": str(int(2 * settings.follow_run_seconds + 600)),
            # This sensor restarts follow runs, with backoff: Dagster's retries would start a second one.
            "dagster/max_retries": "0",
        },
    ), ""


def fail_if_gone(instance: dg.DagsterInstance, conn: psycopg.Connection, host: str, record: dg.RunRecord,
                 settings: RepoSettings) -> str:
    """Mark a running follow run failed when its worker is gone (its lease on the host lapsed): the
    default run launcher cannot tell, and the host would go unfollowed until the run's max_runtime."""
    run = record.dagster_run
    if run.status != dg.DagsterRunStatus.STARTED:
        return ""
    started = record.start_time or record.create_timestamp.timestamp()
    why = why_gone(conn, host, run.run_id, started, START_GRACE_SECONDS + settings.lease_seconds)
    if why is None:
        return ""
    instance.report_run_failed(run, message=(
        f"The repo_follow sensor found this run's worker gone: {why}. Nothing is lost: the next follow run of "
        f"{host} resumes from the last committed event, after the restart backoff."))
    return f"run {run.run_id} was running but its worker is gone ({why}): marked failed"
