"""Dagster side of event-stream sync: `atproto/repo_stream`, one partition per followed host, whose run
follows that host's stream for a bounded time (REPO_FOLLOW_RUN_SECONDS) and ends. The repo_follow
sensor (sensors.py) keeps one such run alive per host; the CLI runs the same asset in-process."""

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from migration_assets.core.lease import LeaseLost
from migration_assets.core.resources import PostgresResource
from migration_assets.repos.backfill import describe
from migration_assets.repos.follow import BATCH_EVENTS, RESYNC_THREADS, Follower, FollowReport
from migration_assets.repos.follow_lease import HostBusy
from migration_assets.repos.stream import StreamError
from migration_assets.repos.resources import RepoSourceResource

REPO_STREAM = dg.AssetKey(["atproto", "repo_stream"])
followed_hosts = dg.DynamicPartitionsDefinition(name="repo_stream_hosts")
OBSERVE_SECONDS = 60.0  # how often a run reports its progress (an AssetObservation) while it follows
# The batch transaction (the resyncs come after it), a connection per resync thread (RESYNC_THREADS), the
# rate limiter, the lease's heartbeat, one spare.
FOLLOW_CONNECTIONS = 4 + RESYNC_THREADS
FOLLOW_HOST_TAG = "migration-assets/repo-follow-host"  # on every run that follows a host (sensor's and CLI's)


class FollowConfig(dg.Config):
    seconds: float | None = Field(default=None, description="how long to follow (default REPO_FOLLOW_RUN_SECONDS)")
    until_stopped: bool = Field(default=False, description="follow until the run is stopped (the CLI without --seconds)")
    batch_events: int = Field(default=BATCH_EVENTS, ge=1, description="events per transaction (committed with the cursor)")


def report_metadata(report: FollowReport) -> dict:
    return {
        "events": dg.MetadataValue.int(report.events),
        "events_applied": dg.MetadataValue.int(report.applied),
        "events_skipped": dg.MetadataValue.int(report.skipped),
        "desyncs": dg.MetadataValue.int(report.desyncs),
        "resyncs": dg.MetadataValue.int(report.resyncs),
        "resync_failures": dg.MetadataValue.int(report.resync_failures),
        "lag_seconds": dg.MetadataValue.float(round(report.lag_seconds, 2)),
        "events_per_second": dg.MetadataValue.float(round(report.events_per_second, 2)),
        "cursor": dg.MetadataValue.int(report.cursor or 0),
        "reconnects": dg.MetadataValue.int(report.reconnects),
        "malformed_frames": dg.MetadataValue.int(report.malformed),
        "oversize_frames": dg.MetadataValue.int(report.oversize),
        "seconds": dg.MetadataValue.float(round(report.seconds, 1)),
        "last_desync": dg.MetadataValue.text(report.last_desync or "none"),
        "last_error": dg.MetadataValue.text(report.last_error or "none"),
    }


def next_step(exc: Exception) -> str:
    if isinstance(exc, (HostBusy, LeaseLost)):
        return "none if the other follower is meant to follow this host; it goes on from the last committed event."
    if isinstance(exc, StreamError) and exc.error == "FutureCursor":
        return ("the stored cursor is ahead of the host (another host at this URL?): delete its row in "
                "repo_stream_cursors.")
    return "fix the cause: the next run resumes from the last committed event."


@contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (Ctrl-C, a run terminated from the UI), so the follower stops
    after committing its batch instead of being interrupted inside it. Signal handlers belong to the
    main thread: elsewhere the event is only set by the caller."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _observer(context: dg.AssetExecutionContext):
    last = [time.monotonic()]

    def observe(report: FollowReport) -> None:
        if time.monotonic() - last[0] >= OBSERVE_SECONDS:
            last[0] = time.monotonic()
            context.log_event(dg.AssetObservation(
                asset_key=REPO_STREAM, partition=context.partition_key, metadata=report_metadata(report)))
            context.log.info(report.summary())

    return observe


@dg.asset(
    key=REPO_STREAM, partitions_def=followed_hosts, group_name="atproto", kinds={"postgres"}, pool="atproto_stream",
    description="Follows the partition's host's event stream (com.atproto.sync.subscribeRepos) for "
    "REPO_FOLLOW_RUN_SECONDS and applies it to the stored repos (records, ledger, cursor in one transaction "
    "per batch). Reports events applied, desyncs, lag behind the stream and events/s, also every minute "
    "while it runs (observations). The repo_follow sensor starts the next run.",
)
def repo_stream(
    context: dg.AssetExecutionContext, config: FollowConfig, postgres: PostgresResource,
    repo_source: RepoSourceResource,
) -> dg.MaterializeResult:
    host = context.partition_key
    settings = repo_source.settings
    seconds = None if config.until_stopped else (config.seconds or settings.follow_run_seconds)
    pool = postgres.pool(FOLLOW_CONNECTIONS)
    clients = repo_source.clients(postgres.resolved_url())
    follower = Follower(pool, host, repo_source.syncer(pool, clients), buckets=settings.buckets,
                        batch_size=config.batch_events, on_batch=_observer(context), holder=context.run.run_id)
    context.log.info(f"following {follower.host}" + (f" for {seconds:.0f} s" if seconds else " until stopped"))
    try:
        with stop_on_interrupt() as stop:
            report = follower.run(stop, seconds)
    except Exception as exc:
        raise dg.Failure(
            description=f"following {host} failed: {describe(exc)}. Next step: {next_step(exc)}",
            metadata=report_metadata(follower.report),
        ) from exc
    finally:
        clients.close()
    context.log.info(f"done: {report.summary()}")
    return dg.MaterializeResult(metadata=report_metadata(report))
