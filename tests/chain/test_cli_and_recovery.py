"""`migration-assets chain migrate` end to end, and a run killed with SIGKILL mid-partition."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg

from migration_assets.cli import main
from migration_assets.devstack.sample_chain import sample_chain
from tests.chain.helpers import TAG, seed


def distinct_blocks(items) -> tuple[int, int]:
    """(blocks, canonical heights) the source holds: hash and "null" items, and canonical copies."""
    blocks = sum(1 for i in items if i["block_rid"]["S"] != "canonical")
    canonical = sum(1 for i in items if i["block_rid"]["S"] == "canonical" and "latest" not in i["block_pid"]["S"])
    return blocks, canonical


def target_counts(conn) -> tuple[int, int]:
    return (
        conn.execute("SELECT count(*) FROM block_metadata").fetchone()[0],
        conn.execute("SELECT count(*) FROM canonical_blocks").fetchone()[0],
    )


def test_cli_snaps_to_partitions_and_runs_show_in_the_instance(
    dagster_home, dynamodb, block_table, target, monkeypatch, capsys
):
    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    items = list(sample_chain(TAG, 0, 30, reorg_rate=0.2))
    seed(dynamodb, block_table, items)

    code = main(["chain", "migrate", "--start-height", "5", "--end-height", "25", "--skip-events"])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "snapped to partition boundaries [0, 30)" in out
    assert "3/3 ranges migrated and verified" in out
    assert target_counts(target) == distinct_blocks(items)
    runs = dg.DagsterInstance.get().get_runs(dg.RunsFilter(tags={"migration-assets/cli": "chain migrate"}))
    assert {run.tags["dagster/partition"] for run in runs} == {
        "000000000000-000000000010", "000000000010-000000000020", "000000000020-000000000030"}


def test_cli_exits_non_zero_and_names_the_next_step(dagster_home, dynamodb, block_table, target, capsys):
    items = list(sample_chain(TAG, 0, 10))
    del items[7]["height"]
    seed(dynamodb, block_table, items)

    code = main(["chain", "migrate", "--start-height", "0", "--end-height", "10"])

    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED" in out, out
    assert "malformed block item" in out, out
    assert "next step" in out


def test_run_killed_mid_partition_then_rerun_ends_exact(dagster_home, dynamodb, block_table, target, target_url):
    items = list(sample_chain(TAG, 0, 4000, reorg_rate=0.1, skip_rate=0.02))
    seed(dynamodb, block_table, items)
    env = {**os.environ, "CHAIN_BLOCK_RANGE_SIZE": "4000", "CHAIN_LOAD_CHUNK_HEIGHTS": "40"}
    command = [sys.executable, "-m", "migration_assets.cli", "chain", "migrate", "--start-height", "0", "--end-height", "4000", "--skip-events"]

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while target_counts(target)[0] == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = target_counts(target)
    assert 0 < partial[0] < distinct_blocks(items)[0], "the kill must land mid-partition"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert target_counts(target) == distinct_blocks(items)
    duplicates = target.execute(
        "SELECT count(*) FROM (SELECT tag, height, hash FROM block_metadata GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    ).fetchone()[0]
    assert duplicates == 0


def event_count(conn) -> int:
    return conn.execute("SELECT count(*) FROM block_events").fetchone()[0]


def test_cli_migrates_blocks_then_the_events_of_those_heights(
    dagster_home, dynamodb, block_table, event_table, target, monkeypatch, capsys
):
    from migration_assets.devstack.sample_events import chain_events

    monkeypatch.setenv("CHAIN_BLOCK_RANGE_SIZE", "10")
    monkeypatch.setenv("CHAIN_EVENT_RANGE_SIZE", "25")
    events_table, layout = event_table
    blocks = list(sample_chain(TAG, 0, 40, reorg_rate=0.2))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_table, events)

    code = main(["chain", "migrate", "--start-height", "0", "--end-height", "20", "--event-tag", str(layout.event_tag)])

    out = capsys.readouterr().out
    assert code == 0, out
    source = {int(e["sequence"]["N"]): e for e in events[:-1]}  # the last item is the watermark
    last_id = max(seq for seq, e in source.items() if int(e["height"]["N"]) == 19)
    assert f"events: heights [0, 20) are event ids [1, {last_id + 1})" in out
    end = -(-(last_id + 1) // 25) * 25  # the event partitions snap outwards to multiples of 25
    assert f"note: event ids [1, {last_id + 1}) snapped to partition boundaries [0, {end}) (CHAIN_EVENT_RANGE_SIZE)" in out
    # The last partition reaches events of heights >= 20: the CLI migrates their blocks, then reruns it.
    beyond = sorted(int(e["height"]["N"]) for seq, e in source.items() if last_id < seq < end and int(e["height"]["N"]) >= 20)
    assert beyond, "the sample must put events of heights >= 20 in the last partition"
    last_key = f"{end - 25:012d}-{end:012d}"
    assert f"{last_key}: its events need blocks at heights {beyond[0]}-{beyond[-1]}; migrating those first" in out
    ranges = 2 + end // 25  # block ranges [0, 10) and [10, 20), and the event ranges
    assert f"{ranges}/{ranges} ranges migrated and verified" in out
    stored = target.execute(
        "SELECT e.event_sequence, e.height, e.hash, bm.height, bm.hash, bm.skipped"
        " FROM block_events e JOIN block_metadata bm ON bm.id = e.block_metadata_id ORDER BY 1"
    ).fetchall()
    assert [row[0] for row in stored] == list(range(1, min(end, len(source) + 1)))
    for seq, height, hash_, block_height, block_hash_, skipped in stored:
        expected = source[seq]
        assert height == block_height == int(expected["height"]["N"]), seq
        assert skipped or hash_ == block_hash_ == expected["hash"]["S"], seq


def test_event_run_killed_mid_range_then_rerun_ends_exact(
    dagster_home, instance, dynamodb, block_table, event_table, target
):
    from migration_assets.devstack.sample_events import chain_events
    from tests.chain.helpers import materialize_range

    events_table, layout = event_table
    blocks = list(sample_chain(TAG, 0, 3000, reorg_rate=0.1))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_table, events)
    assert materialize_range(instance, 0, 3000).success
    env = {**os.environ, "CHAIN_EVENT_RANGE_SIZE": "10000", "CHAIN_LOAD_CHUNK_EVENTS": "100"}
    command = [sys.executable, "-m", "migration_assets.cli", "chain", "migrate", "--start-height", "0",
               "--end-height", "3000", "--skip-blocks"]

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while event_count(target) == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < event_count(target) < len(events) - 1, "the kill must land mid-range"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    ids = [row[0] for row in target.execute("SELECT event_sequence FROM block_events ORDER BY 1")]
    assert ids == list(range(1, len(events)))  # every source event once (the last item is the watermark)
