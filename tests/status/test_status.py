"""The operator's view: progress, failures and stuck work of each pipeline, from real runs and tables."""

import threading

import dagster as dg

from migration_assets.chain.partitions import block_ranges, register_ranges
from migration_assets.cli import main
from migration_assets.core.resources import PostgresResource
from migration_assets.repos import ledger
from migration_assets.status import collect as collect_module
from migration_assets.status.collect import blobs_status, collect, files_status, repos_status
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
    assert (blocks.failure_count, [g.example for g in blocks.failures]) == (1, ["000000000010-000000000020"])
    assert "'no_such_table' not found" in blocks.failures[0].reason and "CHAIN_BLOCK_TABLE" in blocks.failures[0].reason
    repos = statuses["atproto repos"]
    assert (repos.done, repos.total, repos.failure_count) == (1, 2, 1)
    assert "host down" in repos.failures[0].reason

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
    assert "e.g. 000000000010-000000000020" in out


def plc_did(n: int) -> str:
    return f"did:plc:{n:024d}".replace("0", "a")


def test_failures_are_grouped_by_kind_and_host_with_counts_and_one_example(target, capsys):
    """Fifteen repos failing alike against a vanished PLC are one line, not fifteen."""
    plc, pds = "http://127.0.0.1:2582", "http://127.0.0.1:2583"
    resolution = [plc_did(n) for n in range(15)]
    transport = [plc_did(n) for n in range(20, 23)]
    with target.transaction():
        ledger.enqueue(target, [*resolution, *transport, plc_did(30)], 256)
        for did in resolution:
            target.execute(
                "UPDATE repos SET status = 'error', last_error = %s WHERE did = %s",
                (f"DidResolutionFailed: {did}: {plc}/{did}: ConnectError: [Errno 111] Connection refused", did))
        target.execute("UPDATE repos SET status = 'error', pds = %s, last_error = 'TransportFailure: reset by peer' "
                       "WHERE did = ANY(%s)", (pds, transport))
        target.execute("UPDATE repos SET status = 'error', last_error = 'unexpected' WHERE did = %s", (plc_did(30),))

    repos = repos_status(target)
    assert repos.failure_count == 19
    assert [(g.count, g.kind, g.host) for g in repos.failures] == [
        (15, "DidResolutionFailed", "127.0.0.1:2582"), (3, "TransportFailure", "127.0.0.1:2583"), (1, "error", ""),
    ]
    first = repos.failures[0]
    assert first.example == min(resolution) and first.example in first.reason and "ConnectError" in first.reason

    print(text([repos]))
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if line.strip().startswith("failed")]
    assert len(failed) == 3, out
    assert failed[0].strip().startswith(f"failed   15 x DidResolutionFailed at 127.0.0.1:2582, e.g. {min(resolution)}: ")


def test_blob_and_file_failures_are_grouped_too(target):
    with target.transaction():
        for n in range(4):
            target.execute(
                "INSERT INTO blob_migrations (did, old_pds, new_pds, status, error) VALUES (%s, %s, %s, 'failed', %s)",
                (plc_did(n), "https://old.example", "https://new.example",
                 "AuthRequired: createSession at https://old.example refused the password"))
        target.execute(
            "INSERT INTO source_files (file_id, file_uri, file_name, create_date) VALUES (1, 'a/1', '1', now()), "
            "(2, 'a/2', '2', now()), (3, 'a/3', '3', now())")
        target.execute(
            "INSERT INTO migration_files (file_id, old_uri, status, error) VALUES "
            "(1, 'a/1', 'FAIL', 'source file missing: /data/a/1'), (2, 'a/2', 'FAIL', 'source file missing: /data/a/2'), "
            "(3, 'a/3', 'FAIL', 'reading a/3 (file_id 3) failed: permission denied')")

    blobs = blobs_status(target)
    assert (blobs.failure_count, [(g.count, g.kind, g.host) for g in blobs.failures]) == (
        4, [(4, "AuthRequired", "old.example")])
    files = files_status(target)
    assert [(g.count, g.kind, g.example) for g in files.failures] == [
        (2, "source file missing", "file 1 a/1"), (1, "error", "file 3 a/3")]


RANGES = dg.DynamicPartitionsDefinition(name="status_test_ranges")
ENTERED, RELEASE = threading.Event(), threading.Event()


@dg.asset(partitions_def=RANGES, key=dg.AssetKey(["status_test", "ranges"]))
def status_test_ranges(context: dg.AssetExecutionContext) -> None:
    if context.partition_key.startswith("value"):
        raise ValueError(f"bad value in {context.partition_key}")
    if context.partition_key.startswith("key"):
        raise KeyError(context.partition_key)
    if context.partition_key == "slow":
        ENTERED.set()
        assert RELEASE.wait(120), "never released"


def test_partition_failures_grouped_by_kind_and_a_running_partition_is_stuck(fresh_instance, monkeypatch):
    """Dagster's per-partition status decides: failed partitions grouped by their error's class, and a
    partition whose run is still going past the limit listed as stuck."""
    instance = fresh_instance
    keys = ["done", "key-1", "slow", "value-1", "value-2"]
    instance.add_dynamic_partitions(RANGES.name, keys)
    for key in keys:
        if key != "slow":
            dg.materialize([status_test_ranges], instance=instance, partition_key=key, raise_on_error=False)
    ENTERED.clear()
    RELEASE.clear()
    slow = threading.Thread(target=dg.materialize, args=([status_test_ranges],),
                            kwargs={"instance": instance, "partition_key": "slow"})
    slow.start()
    try:
        assert ENTERED.wait(60), "the slow partition's run never started"
        monkeypatch.setattr(collect_module, "STUCK_RUN_SECONDS", -1)  # any running partition counts as stuck
        status = collect_module.partition_status(instance, status_test_ranges.key, RANGES, "test", "ranges",
                                                 "rate", "/s")
    finally:
        RELEASE.set()
        slow.join()
    assert (status.done, status.total, status.failure_count) == (1, 5, 3)
    assert [(g.count, g.kind, g.example) for g in status.failures] == [(2, "ValueError", "value-1"),
                                                                      (1, "KeyError", "key-1")]
    assert "bad value in value-1" in status.failures[0].reason
    assert [item.split()[0] for item in status.stuck] == ["slow"]


def test_status_reports_each_network_of_chain_networks(
    fresh_instance, dynamodb, target, dagster_home, monkeypatch, capsys
):
    from migration_assets.chain.definitions import network_assets
    from migration_assets.chain.event_source import EventLayout
    from migration_assets.chain.settings import NetworkConfig
    from tests.chain.test_networks import seed_networks

    monkeypatch.setenv("DAGSTER_POSTGRES_URL", fresh_instance.run_storage.postgres_url)
    seed_networks(dynamodb, monkeypatch, EventLayout(0))  # block ranges of 10 heights
    assert main(["chain", "migrate", "--blockchain", "ethereum", "--network", "mainnet",
                 "--start-height", "0", "--end-height", "30", "--skip-events"]) == 0
    base = network_assets(NetworkConfig(blockchain="base", network="mainnet"))
    register_ranges(fresh_instance, base.block_ranges, 500, 520, 10)

    statuses = by_name(collect(fresh_instance, target))
    ethereum, base_blocks = statuses["chain blocks (ethereum-mainnet)"], statuses["chain blocks (base-mainnet)"]
    assert (ethereum.done, ethereum.total) == (3, 3)
    assert (base_blocks.done, base_blocks.total) == (0, 2)
    assert "chain blocks" not in statuses, "the chain configured the old way is not among CHAIN_NETWORKS"
    assert {"chain events (ethereum-mainnet)", "chain events (base-mainnet)"} <= set(statuses)

    result = dg.materialize([migration_status], instance=fresh_instance, resources={"postgres": PostgresResource()})
    metadata = result.asset_materializations_for_node("status__migration_status")[0].metadata
    assert metadata["chain_blocks_ethereum_mainnet_percent_done"].value == 100.0
    assert metadata["chain_blocks_base_mainnet_percent_done"].value == 0.0
    assert main(["status"]) == 0
    assert "chain blocks (base-mainnet)" in capsys.readouterr().out
