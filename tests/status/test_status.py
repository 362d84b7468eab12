"""The operator's view: progress, failures and stuck work of each pipeline, from real runs and tables."""

import dagster as dg

from migration_assets.chain.partitions import block_ranges, register_ranges
from migration_assets.cli import main
from migration_assets.core.resources import PostgresResource
from migration_assets.repos import ledger
from migration_assets.status.collect import collect
from migration_assets.status.definitions import migration_status
from migration_assets.status.report import PipelineStatus, eta_text, text
from tests.chain.helpers import linear_chain, materialize_range, seed


def by_name(statuses) -> dict[str, PipelineStatus]:
    return {s.pipeline: s for s in statuses}


def test_eta_from_the_last_hours_rate():
    assert eta_text(PipelineStatus("p", "ranges", 10, 40, per_hour=60)) == "30 min"
    assert eta_text(PipelineStatus("p", "ranges", 10, 40, per_hour=0)).startswith("unknown")
    assert eta_text(PipelineStatus("p", "ranges", 40, 40)) == "done"


def test_status_reports_chain_partitions_failures_and_repo_ledger(
    fresh_instance, dynamodb, block_table, target, dagster_home, monkeypatch, capsys
):
    instance = fresh_instance
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", instance.run_storage.postgres_url)
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    seed(dynamodb, block_table, linear_chain(0, 20))
    register_ranges(instance, block_ranges, 0, 40, 10)
    assert materialize_range(instance, 0, 10).success
    # A range whose run fails: its blocks are there, but the table name is wrong for that run.
    monkeypatch.setenv("CHAIN_BLOCK_TABLE", "no_such_table")
    assert not materialize_range(instance, 10, 20).success
    monkeypatch.setenv("CHAIN_BLOCK_TABLE", block_table)
    with target.transaction():
        ledger.enqueue(target, ["did:plc:aaa", "did:plc:bbb"], 256)
        target.execute("UPDATE repos SET status = 'synced', synced_at = now() WHERE did = 'did:plc:aaa'")
        target.execute("UPDATE repos SET status = 'error', last_error = 'TransportFailure: host down' "
                       "WHERE did = 'did:plc:bbb'")

    statuses = by_name(collect(instance, target))
    blocks = statuses["chain blocks"]
    assert (blocks.done, blocks.per_hour) == (1, 1.0)
    assert blocks.total >= 4
    assert [key for key, _ in blocks.failures][:1] == ["000000000010-000000000020"]
    assert "'no_such_table' not found" in blocks.failures[0][1] and "CHAIN_BLOCK_TABLE" in blocks.failures[0][1]
    repos = statuses["atproto repos"]
    assert (repos.done, repos.total, repos.failure_count) == (1, 2, 1)
    assert "host down" in repos.failures[0][1]

    result = dg.materialize([migration_status], instance=instance, resources={"postgres": PostgresResource()})
    metadata = result.asset_materializations_for_node("status__migration_status")[0].metadata
    assert "| chain blocks | 1 |" in metadata["progress"].value
    assert "no_such_table" in metadata["failures"].value
    assert metadata["chain_blocks_percent_done"].value == 100 * 1 / blocks.total
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"no_stuck_work": True, "no_failing_items": False}

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == text(collect(instance, target)).strip()
    assert "failed   000000000010-000000000020" in out
