"""Blob migrations the way they run in production: 16 requests queued in blob_migrations, the request
sensor (on in the demo) turns them into partitions and runs, and the daemon's run queue keeps at most 15
of them running at once (pool `atproto_blobs`, run granularity), the 16th waiting queued.

The requests name a gate in front of the old PDS (tests/e2e/gate.py) that holds every blob download
mid-transfer until released, so the 15 running runs stay in flight as long as the test looks: whether
the 16th waits does not depend on how fast the machine is."""

import re

import httpx
import pytest

from migration_assets.core.postgres import close_pools
from migration_assets.core.resources import PostgresResource
from migration_assets.devstack.atproto import PdsInfo, PdsSeeder
from migration_assets.devstack.demo_atproto import seed_blob_migrations
from tests.e2e.conftest import SECRET_KEY
from tests.e2e.gate import blob_gate
from tests.e2e.stack import wait_until

ACCOUNTS = 16  # one more than the atproto_blobs pool allows at once
POOL_LIMIT = 15
BLOB_RUNS = """
query {
  runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "atproto_blob_requests"}]}) {
    ... on Runs { results { runId status startTime endTime tags { key value } } }
  }
}"""
CHECK_EXECUTIONS = """
query($check: String!, $partition: String) {
  assetCheckExecutions(assetKey: {path: ["atproto", "blobs"]}, checkName: $check, partition: $partition, limit: 1) {
    evaluation { success description }
  }
}"""
BLOCKED = re.compile(r'Run (\S+) is blocked by global concurrency limits: \{"atproto_blobs": \{[^}]*"slot_count": (\d+)')


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:  # an end at the same instant as a start is counted first (-1 < 1)
        running += step
        peak = max(peak, running)
    return peak


def partition(run: dict) -> str:
    return next(t["value"] for t in run["tags"] if t["key"] == "dagster/partition")


def pds(url: str) -> PdsInfo:
    did = httpx.get(f"{url}/xrpc/com.atproto.server.describeServer", timeout=30).json()["did"]
    return PdsInfo(url, did, admin_password="")


def queue_migrations(stack, old_url: str, new_url: str, old_pds_url: str, monkeypatch) -> set[str]:
    """Accounts moved from the demo's first PDS to its second, blobs left behind, each with a request
    in the demo's database that names `old_pds_url` as the old PDS."""
    monkeypatch.setenv("MIGRATION_DATA_DIR", str(stack.data_dir))
    monkeypatch.delenv("MIGRATION_DATABASE_URL", raising=False)
    monkeypatch.setenv("MIGRATION_SECRET_KEY", SECRET_KEY)
    try:
        with PdsSeeder(pds(old_url)) as old, PdsSeeder(pds(new_url)) as new:
            return set(seed_blob_migrations(old, new, ACCOUNTS, PostgresResource(), blob_sizes=(100_000, 300_000),
                                            old_pds_url=old_pds_url))
    finally:
        close_pools()


@pytest.mark.timeout(1500)
def test_sixteen_blob_migrations_run_at_most_fifteen_at_once(stack, monkeypatch):
    old_url, new_url = stack.atproto()["pdses"]
    with blob_gate(old_url) as gate:
        dids = queue_migrations(stack, old_url, new_url, gate.url, monkeypatch)

        def blocked_runs() -> dict[str, str]:
            return dict(BLOCKED.findall(stack.log_path.read_text(errors="replace")))

        def each_run_held_or_blocked():  # held at the gate (running) or blocked by a pool (queued)
            runs = stack.graphql(BLOB_RUNS)["runsOrError"]["results"]
            settled = len(runs) == ACCOUNTS and len(gate.held_dids()) + len(blocked_runs()) == ACCOUNTS
            return runs if settled else None

        runs = wait_until(each_run_held_or_blocked, 900, "every blob run held at the gate or blocked", stack)
        # With every running migration held mid-download, the pool is full: exactly 15 run, the 16th waits
        # in the run queue, and the daemon says the atproto_blobs pool of 15 is what blocks it.
        statuses = sorted(r["status"] for r in runs)
        assert statuses == ["QUEUED"] + ["STARTED"] * POOL_LIMIT, statuses
        [queued] = [r for r in runs if r["status"] == "QUEUED"]
        assert {partition(r) for r in runs if r["status"] == "STARTED"} == gate.held_dids()
        assert blocked_runs() == {queued["runId"]: str(POOL_LIMIT)}, blocked_runs()

        gate.released.set()

        def all_finished():
            runs = stack.graphql(BLOB_RUNS)["runsOrError"]["results"]
            done = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            return runs if len(done) == ACCOUNTS else None

        runs = wait_until(all_finished, 600, f"{ACCOUNTS} blob migration runs to finish", stack)
    assert [r["status"] for r in runs] == ["SUCCESS"] * ACCOUNTS, runs
    assert {partition(r) for r in runs} == dids
    assert max_overlap([(r["startTime"], r["endTime"]) for r in runs]) == POOL_LIMIT

    for did in dids:
        for check in ("nothing_missing_on_new_pds", "no_failed_blobs", "bytes_verified"):
            [execution] = stack.graphql(CHECK_EXECUTIONS, check=check, partition=did)["assetCheckExecutions"]
            assert execution["evaluation"]["success"], (did, check, execution)
