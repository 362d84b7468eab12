"""Gather each pipeline's status: partition progress from the Dagster instance, item-level progress and
failures from the pipelines' own tables in the target database."""

import time

import dagster as dg
import psycopg

from migration_assets.chain.assets import BLOCK_EVENTS, BLOCK_METADATA
from migration_assets.chain.partitions import block_ranges, event_ranges
from migration_assets.status.report import PipelineStatus

RECENT_MATERIALIZATIONS = 500
STUCK_RUN_SECONDS = 3600


def _failure_reason(instance: dg.DagsterInstance, run_id: str) -> str:
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.step_failure_data.error
        while error is not None and error.cls_name and error.cls_name.startswith("Dagster") and error.cause:
            error = error.cause
        if error is not None:
            return error.message.strip().splitlines()[0]
    return "run failed (see the run's logs)"


def partition_status(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, keys: list[str], pipeline: str, unit: str,
    rate_field: str, rate_unit: str,
) -> PipelineStatus:
    """Progress of a partitioned asset: materialized partitions, recent rate, failed and stuck runs."""
    done_keys = instance.get_materialized_partitions(asset_key) & set(keys)
    records = instance.fetch_materializations(asset_key, limit=RECENT_MATERIALIZATIONS).records
    hour_ago = time.time() - 3600
    recent = {r.partition_key for r in records if r.timestamp >= hour_ago}
    metadata = [(r.partition_key, r.asset_materialization.metadata) for r in records if r.asset_materialization]
    rates = [m[rate_field].value for _, m in metadata[:20] if rate_field in m]
    slowest = sorted(((k, m["seconds"].value) for k, m in metadata if "seconds" in m), key=lambda x: -x[1])[:3]
    status = PipelineStatus(
        pipeline, unit, len(done_keys), len(keys), per_hour=float(len(recent)),
        throughput=f"{sum(rates) / len(rates):.0f} {rate_unit}" if rates else "", slowest=slowest,
    )
    runs = _partition_runs(instance, asset_key)
    failed_keys: set[str] = set()
    for key, run in runs:  # newest first: a partition's latest run decides
        if key in failed_keys or key in done_keys or run.status != dg.DagsterRunStatus.FAILURE:
            continue
        failed_keys.add(key)
        if len(status.failures) < 10:
            status.failures.append((key, _failure_reason(instance, run.run_id)))
    status.failure_count = len(failed_keys)
    now = time.time()
    for key, run in runs:
        if run.status == dg.DagsterRunStatus.STARTED:
            record = instance.get_run_record_by_id(run.run_id)
            if record and record.start_time and now - record.start_time > STUCK_RUN_SECONDS:
                status.stuck.append(f"{key} (run {run.run_id[:8]}, {(now - record.start_time) / 3600:.1f} h)")
    return status


def _partition_runs(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> list[tuple[str, dg.DagsterRun]]:
    """(partition, run) of the asset's recent runs, newest first, from their planned materializations
    (runs launched by `materialize()` carry no asset selection, so the event log is what says)."""
    planned = instance.fetch_planned_materializations(asset_key, limit=RECENT_MATERIALIZATIONS).records
    pairs = [(r.event_log_entry.dagster_event.event_specific_data.partition, r.run_id) for r in planned]
    if not pairs:
        return []
    runs = {run.run_id: run for run in instance.get_runs(dg.RunsFilter(run_ids=list({rid for _, rid in pairs})))}
    return [(key, runs[rid]) for key, rid in pairs if key and rid in runs]


def chain_status(instance: dg.DagsterInstance) -> list[PipelineStatus]:
    return [
        partition_status(instance, BLOCK_METADATA, instance.get_dynamic_partitions(block_ranges.name),
                         "chain blocks", "block ranges", "heights_per_second", "heights/s"),
        partition_status(instance, BLOCK_EVENTS, instance.get_dynamic_partitions(event_ranges.name),
                         "chain events", "event ranges", "events_per_second", "events/s"),
    ]


def repos_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute("SELECT status, count(*) FROM repos GROUP BY status").fetchall())
    finished = sum(counts.get(s, 0) for s in ("synced", "deleted", "deactivated", "takendown", "suspended"))
    per_hour = conn.execute("SELECT count(*) FROM repos WHERE synced_at > now() - interval '1 hour'").fetchone()[0]
    records = conn.execute(
        "SELECT count(*) FROM records WHERE indexed_at > now() - interval '1 hour'"
    ).fetchone()[0]
    reasons = conn.execute(
        """SELECT left(last_error, 200), count(*), min(did) FROM repos WHERE status = 'error'
           GROUP BY 1 ORDER BY 2 DESC LIMIT 10"""
    ).fetchall()
    stuck = [did for (did,) in conn.execute(
        "SELECT did FROM repos WHERE status = 'in_progress' AND lease_expires_at < now() "
        "ORDER BY lease_expires_at LIMIT 10"
    )]
    return PipelineStatus(
        "atproto repos", "repos", finished, sum(counts.values()), per_hour=float(per_hour),
        throughput=f"{records / 3600:.1f} records/s (last hour)",
        failures=[(f"{n} repos, e.g. {did}", reason) for reason, n, did in reasons],
        failure_count=counts.get("error", 0), stuck=stuck,
    )


def blobs_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute("SELECT status, count(*) FROM blob_migrations GROUP BY status").fetchall())
    per_hour = conn.execute(
        "SELECT count(*) FROM blob_migrations WHERE status = 'pending_prefs' AND updated_at > now() - interval '1 hour'"
    ).fetchone()[0]
    moved = conn.execute(
        """SELECT coalesce(sum((progress_data->>'bytes_transferred')::bigint), 0)::float8 FROM blob_migrations
           WHERE updated_at > now() - interval '1 hour'"""
    ).fetchone()[0]
    failed = conn.execute(
        """SELECT did, coalesce(error, jsonb_array_length(progress_data->'failed_blobs') || ' blobs failed')
           FROM blob_migrations
           WHERE status = 'failed' OR jsonb_array_length(coalesce(progress_data->'failed_blobs', '[]')) > 0
           ORDER BY updated_at DESC LIMIT 10"""
    ).fetchall()
    stuck = [f"{did} (no progress for {minutes:.0f} min)" for did, minutes in conn.execute(
        """SELECT did, (extract(epoch FROM now() - updated_at) / 60)::float8 FROM blob_migrations
           WHERE status = 'pending_blobs' AND progress_data ? 'blobs_started_at'
             AND updated_at < now() - interval '30 minutes' ORDER BY updated_at LIMIT 10"""
    )]
    return PipelineStatus(
        "atproto blobs", "accounts", counts.get("pending_prefs", 0), sum(counts.values()), per_hour=float(per_hour),
        throughput=f"{moved / 3600 / 1e6:.2f} MB/s (last hour)", failures=[(d, r) for d, r in failed],
        failure_count=len(failed), stuck=stuck,
    )


def files_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute("SELECT status, count(*) FROM migration_ranges GROUP BY status").fetchall())
    per_hour, bytes_hour = conn.execute(
        """SELECT count(*), coalesce(sum(size), 0)::float8 FROM migration_files
           WHERE status = 'SUCCESS' AND migration_date > now() - interval '1 hour'"""
    ).fetchone()
    files_total = conn.execute("SELECT count(*) FROM source_files").fetchone()[0]
    files_done = conn.execute("SELECT count(*) FROM migration_files WHERE status = 'SUCCESS'").fetchone()[0]
    failed = conn.execute(
        "SELECT file_id, old_uri, coalesce(error, 'failed') FROM migration_files WHERE status = 'FAIL' "
        "ORDER BY retry_count DESC, file_id LIMIT 10"
    ).fetchall()
    failure_count = conn.execute("SELECT count(*) FROM migration_files WHERE status = 'FAIL'").fetchone()[0]
    stuck = [f"range {rid} [{lo}, {hi}] lease expired {age:.0f} min ago" for rid, lo, hi, age in conn.execute(
        """SELECT range_id, min_id, max_id, coalesce(extract(epoch FROM now() - lease_expires_at) / 60, 0)::float8
           FROM migration_ranges WHERE status = 'PROCESSING' AND (lease_expires_at IS NULL OR lease_expires_at < now())
           LIMIT 10"""
    )]
    return PipelineStatus(
        "files", f"files ({counts.get('COMPLETE', 0)}/{sum(counts.values())} ranges complete)", files_done,
        files_total, per_hour=float(per_hour), throughput=f"{bytes_hour / 3600 / 1e6:.2f} MB/s (last hour)",
        failures=[(f"file {fid} {uri}", reason) for fid, uri, reason in failed], failure_count=failure_count,
        stuck=stuck,
    )


def collect(instance: dg.DagsterInstance, conn: psycopg.Connection) -> list[PipelineStatus]:
    return [
        *chain_status(instance),
        repos_status(conn),
        blobs_status(conn),
        files_status(conn),
    ]
