"""Gather each pipeline's status: partition progress from the Dagster instance, item-level progress and
failures from the pipelines' own tables in the target database."""

import time

import dagster as dg
import psycopg

from migration_assets.chain.assets import ChainAssetKeys
from migration_assets.chain.partitions import range_partitions
from migration_assets.chain.settings import ChainSettings, NetworkConfig, configured_networks
from migration_assets.status.report import FailureGroup, PipelineStatus

RECENT_MATERIALIZATIONS = 500
STUCK_RUN_SECONDS = 3600
MAX_FAILED_RUNS_READ = 50  # failed partitions whose run logs are read for a reason
UNKNOWN_FAILURE = ("RunFailure", "run failed (see the run's logs)")


def _run_failure(instance: dg.DagsterInstance, run_id: str) -> tuple[str, str]:
    """(error class, first line of its message) of the run's failed step, past Dagster's wrappers."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.step_failure_data.error
        while error is not None and error.cls_name and error.cls_name.startswith("Dagster") and error.cause:
            error = error.cause
        if error is not None:
            return error.cls_name or "error", error.message.strip().splitlines()[0]
    return UNKNOWN_FAILURE


def _latest_run_id(instance: dg.DagsterInstance, asset_key: dg.AssetKey, key: str) -> str | None:
    """The run that last planned to materialize this partition (the failed or in-progress one)."""
    planned = instance.get_latest_planned_materialization_info(asset_key, key)
    return planned.run_id if planned else None


def _partition_failure(instance: dg.DagsterInstance, asset_key: dg.AssetKey, key: str) -> tuple[str, str]:
    run_id = _latest_run_id(instance, asset_key, key)
    return _run_failure(instance, run_id) if run_id else UNKNOWN_FAILURE


def _group_partition_failures(failures: list[tuple[str, str, str]]) -> list[FailureGroup]:
    """(partition, kind, reason) -> one group per kind, most partitions first."""
    groups: dict[str, FailureGroup] = {}
    for key, kind, reason in sorted(failures):
        group = groups.setdefault(kind, FailureGroup(kind, "", 0, key, reason))
        group.count += 1
    return sorted(groups.values(), key=lambda g: -g.count)


def partition_status(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions_def: dg.DynamicPartitionsDefinition,
    pipeline: str, unit: str, rate_field: str, rate_unit: str,
) -> PipelineStatus:
    """Progress of a partitioned asset: materialized partitions, recent rate, failed and stuck partitions
    (from Dagster's per-partition status: a partition's latest run decides)."""
    keys = instance.get_dynamic_partitions(partitions_def.name)
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
    by_partition = instance.get_status_by_partition(asset_key, keys, partitions_def) or {}
    failed = sorted(k for k, s in by_partition.items() if s == dg.AssetPartitionStatus.FAILED and k not in done_keys)
    status.failure_count = len(failed)
    status.failures = _group_partition_failures(
        [(key, *_partition_failure(instance, asset_key, key)) for key in failed[:MAX_FAILED_RUNS_READ]])
    now = time.time()
    for key in sorted(k for k, s in by_partition.items() if s == dg.AssetPartitionStatus.IN_PROGRESS):
        run_id = _latest_run_id(instance, asset_key, key)
        record = instance.get_run_record_by_id(run_id) if run_id else None
        if record and record.start_time and now - record.start_time > STUCK_RUN_SECONDS:
            status.stuck.append(f"{key} (run {run_id[:8]}, {(now - record.start_time) / 3600:.1f} h)")
    return status


def chain_status(instance: dg.DagsterInstance, networks: list[NetworkConfig] | None = None) -> list[PipelineStatus]:
    """Blocks and events of each network of CHAIN_NETWORKS (or of the chain configured the old way)."""
    statuses = []
    for network in networks if networks is not None else configured_networks(ChainSettings.load()):
        keys, (block_ranges, event_ranges) = ChainAssetKeys.of(network), range_partitions(network)
        which = f" ({network.blockchain}-{network.network})" if network.name else ""
        statuses += [
            partition_status(instance, keys.block_metadata, block_ranges, f"chain blocks{which}", "block ranges",
                             "heights_per_second", "heights/s"),
            partition_status(instance, keys.block_events, event_ranges, f"chain events{which}", "event ranges",
                             "events_per_second", "events/s"),
        ]
    return statuses


_GROUP_FAILURES = """
WITH failed (item, message, item_url) AS ({failed}),
classified AS (
    SELECT item, message,
           coalesce(substring(message FROM '^([A-Za-z_][A-Za-z0-9_. ]{{0,60}}?):'), 'error') AS kind,
           coalesce(substring(message FROM 'https?://([A-Za-z0-9.:\\[\\]-]*[A-Za-z0-9\\]])'),
                    substring(item_url FROM '//([^/]+)'), '') AS host
    FROM failed),
groups AS (
    SELECT kind, host, count(*) AS items, min(item) AS example FROM classified
    GROUP BY kind, host ORDER BY items DESC, kind, host LIMIT 10)
SELECT DISTINCT ON (g.items, g.kind, g.host) g.kind, g.host, g.items, g.example, left(c.message, 300)
FROM groups g JOIN classified c ON (c.item, c.kind, c.host) = (g.example, g.kind, g.host)
ORDER BY g.items DESC, g.kind, g.host
"""


def failure_groups(conn: psycopg.Connection, failed: str) -> list[FailureGroup]:
    """Group failing items by error kind (the class the message starts with) and host (the first URL in
    the message, else the item's own URL). `failed` is a query of (item, message, item_url) rows."""
    rows = conn.execute(_GROUP_FAILURES.format(failed=failed)).fetchall()
    return [FailureGroup(kind, host, count, example, reason) for kind, host, count, example, reason in rows]


def repos_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute("SELECT status, count(*) FROM repos GROUP BY status").fetchall())
    finished = sum(counts.get(s, 0) for s in ("synced", "deleted", "deactivated", "takendown", "suspended"))
    per_hour = conn.execute("SELECT count(*) FROM repos WHERE synced_at > now() - interval '1 hour'").fetchone()[0]
    records = conn.execute(
        "SELECT count(*) FROM records WHERE indexed_at > now() - interval '1 hour'"
    ).fetchone()[0]
    stuck = [did for (did,) in conn.execute(
        "SELECT did FROM repos WHERE status = 'in_progress' AND lease_expires_at < now() "
        "ORDER BY lease_expires_at LIMIT 10"
    )]
    return PipelineStatus(
        "atproto repos", "repos", finished, sum(counts.values()), per_hour=float(per_hour),
        throughput=f"{records / 3600:.1f} records/s (last hour)",
        failures=failure_groups(conn, "SELECT did, last_error, pds FROM repos WHERE status = 'error'"),
        failure_count=counts.get("error", 0), stuck=stuck,
    )


def blobs_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute(  # a superseded request lives on in the one that replaced it
        "SELECT status, count(*) FROM blob_migrations WHERE status <> 'superseded' GROUP BY status").fetchall())
    per_hour = conn.execute(
        "SELECT count(*) FROM blob_migrations WHERE status = 'pending_prefs' AND updated_at > now() - interval '1 hour'"
    ).fetchone()[0]
    moved = conn.execute(
        """SELECT coalesce(sum((progress_data->>'bytes_transferred')::bigint), 0)::float8 FROM blob_migrations
           WHERE updated_at > now() - interval '1 hour'"""
    ).fetchone()[0]
    failed = """SELECT did, coalesce(error, 'BlobsFailed: ' || greatest((progress_data->>'failed_blob_count')::bigint,
                                jsonb_array_length(progress_data->'failed_blobs')) || ' blobs failed'), old_pds
                FROM blob_migrations
                WHERE status = 'failed' OR (status <> 'superseded'
                      AND jsonb_array_length(coalesce(progress_data->'failed_blobs', '[]')) > 0)"""
    failure_count = conn.execute(f"SELECT count(*) FROM ({failed}) f").fetchone()[0]
    stuck = [f"{did} (no progress for {minutes:.0f} min)" for did, minutes in conn.execute(
        """SELECT did, (extract(epoch FROM now() - updated_at) / 60)::float8 FROM blob_migrations
           WHERE status = 'pending_blobs' AND progress_data ? 'blobs_started_at'
             AND updated_at < now() - interval '30 minutes' ORDER BY updated_at LIMIT 10"""
    )]
    return PipelineStatus(
        "atproto blobs", "accounts", counts.get("pending_prefs", 0), sum(counts.values()), per_hour=float(per_hour),
        throughput=f"{moved / 3600 / 1e6:.2f} MB/s (last hour)",
        failures=failure_groups(conn, failed), failure_count=failure_count, stuck=stuck,
    )


def files_status(conn: psycopg.Connection) -> PipelineStatus:
    counts = dict(conn.execute("SELECT status, count(*) FROM migration_ranges GROUP BY status").fetchall())
    per_hour, bytes_hour = conn.execute(
        """SELECT count(*), coalesce(sum(size), 0)::float8 FROM migration_files
           WHERE status = 'SUCCESS' AND migration_date > now() - interval '1 hour'"""
    ).fetchone()
    files_total = conn.execute("SELECT count(*) FROM source_files").fetchone()[0]
    files_done = conn.execute("SELECT count(*) FROM migration_files WHERE status = 'SUCCESS'").fetchone()[0]
    failure_count = conn.execute("SELECT count(*) FROM migration_files WHERE status = 'FAIL'").fetchone()[0]
    stuck = [f"range {rid} [{lo}, {hi}] lease expired {age:.0f} min ago" for rid, lo, hi, age in conn.execute(
        """SELECT range_id, min_id, max_id, coalesce(extract(epoch FROM now() - lease_expires_at) / 60, 0)::float8
           FROM migration_ranges WHERE status = 'PROCESSING' AND (lease_expires_at IS NULL OR lease_expires_at < now())
           LIMIT 10"""
    )]
    return PipelineStatus(
        "files", f"files ({counts.get('COMPLETE', 0)}/{sum(counts.values())} ranges complete)", files_done,
        files_total, per_hour=float(per_hour), throughput=f"{bytes_hour / 3600 / 1e6:.2f} MB/s (last hour)",
        failures=failure_groups(conn, "SELECT 'file ' || file_id || ' ' || old_uri, coalesce(error, 'failed'), "
                                      "NULL::text FROM migration_files WHERE status = 'FAIL'"),
        failure_count=failure_count,
        stuck=stuck,
    )


def collect(instance: dg.DagsterInstance, conn: psycopg.Connection) -> list[PipelineStatus]:
    return [
        *chain_status(instance),
        repos_status(conn),
        blobs_status(conn),
        files_status(conn),
    ]
