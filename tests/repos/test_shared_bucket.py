"""Runs that share one bucket.

Two runs share a bucket of 2,000 due repos through the real claim loop, lease, heartbeat and fence
(`backfill.sync_leased`); only the per-repo sync step is a trivial one (a record and the ledger's
finish_synced, written inside the run's fenced transaction), so no PDS accounts are needed. Run A
stalls mid-way (its store step and its heartbeat blocked, as a paused process would be) until run B
has taken over A's expired leases and synced the repo A was storing. Then A's late write must change
nothing: no repo synced twice, none lost.

Then two whole `atproto/repos` runs of one bucket against the dev-env PLC and PDS."""

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

from psycopg_pool import ConnectionPool

from migration_assets.repos import ledger
from migration_assets.repos.backfill import RepoOutcome, sync_leased
from migration_assets.repos.collections import RecordScope
from migration_assets.core.settings import PROJECT_ROOT
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.ledger import ClaimedRepo
from tests.repos.conftest import handle
from tests.repos.helpers import discover, listed_records, stored_records
from tests.repos.pds_proxy import Reply
from tests.repos.test_faults import POSTS, post, routed

REPOS = 2000
LEASE_SECONDS = 5
PAUSE_AT = 100  # A stalls while storing its 100th repo
WAIT = 120  # seconds: a guard against a hang, never a measurement
HOLD = 20  # seconds a download is held at most while the other run starts (the runs' read timeout is 30 s)


class GatedPool:
    """Run A's pool for its claims and heartbeat: while the test holds `gate`, nothing of A's gets a
    connection, and no renewal is under way (one is finished before the gate closes)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool, self.gate = pool, threading.Lock()

    @contextmanager
    def connection(self):
        with self.gate, self.pool.connection() as conn:
            yield conn


def test_two_runs_share_a_bucket_and_a_paused_runs_late_write_changes_nothing(target, target_url):
    dids = [f"did:plc:shared{n:05d}" for n in range(REPOS)]
    ledger.enqueue(target, dids, 1)  # one bucket: every repo in bucket 0
    writes = ConnectionPool(target_url, min_size=2, max_size=10, open=True)
    a_pool = GatedPool(ConnectionPool(target_url, min_size=1, max_size=3, open=True))
    b_pool = ConnectionPool(target_url, min_size=1, max_size=3, open=True)
    a_lease, b_lease = ledger.repo_lease(LEASE_SECONDS), ledger.repo_lease(LEASE_SECONDS)
    a_paused, b_took_over = threading.Event(), threading.Event()
    paused_on: list[str] = []
    started = Counter()
    counter_lock = threading.Lock()

    def store(run: str, repo: ClaimedRepo, lease) -> RepoOutcome:
        with writes.connection() as conn, lease.holding(conn, repo.did), conn.cursor() as cur:
            cur.execute("INSERT INTO records (did, collection, rkey, cid, record) VALUES (%s, 'test.sync', %s, 'c', '{}')",
                        (repo.did, run))
            ledger.finish_synced(cur, repo.did, run, head=f"head-{run}", rev=None, records=1, data_root=f"data-{run}",
                                 collections_filter=RecordScope().key, signal_missing=False)
        return RepoOutcome(repo.did, "synced", records=1)

    def sync_a(repo: ClaimedRepo, lease) -> RepoOutcome:
        with counter_lock:
            started["a"] += 1
            pause = started["a"] == PAUSE_AT
        if pause:  # A stalls here: store step and heartbeat blocked until B took this repo over
            a_pool.gate.acquire()
            paused_on.append(repo.did)
            a_paused.set()
            assert b_took_over.wait(WAIT), "run B never took over the paused run's repo"
            a_pool.gate.release()
        return store("A", repo, lease)

    def sync_b(repo: ClaimedRepo, lease) -> RepoOutcome:
        with counter_lock:
            started["b"] += 1
            first = started["b"] == 1
        if first:  # A stopped renewing; its leases run out (aged in SQL rather than waited for)
            assert a_paused.wait(WAIT), "run A never reached its pause"
            target.execute("UPDATE repos SET lease_expires_at = now() - interval '1 second' WHERE claim_token = %s",
                           (a_lease.token,))
        outcome = store("B", repo, lease)
        if paused_on and repo.did == paused_on[0]:
            b_took_over.set()
        return outcome

    reports, errors = {}, []

    def run(name, pool, sync_one, lease) -> None:
        try:
            reports[name] = sync_leased(pool, sync_one, [0], lease, batch=200, threads=4)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            a_paused.set(), b_took_over.set()  # let the other run finish

    threads = [threading.Thread(target=run, args=("A", a_pool, sync_a, a_lease)),
               threading.Thread(target=run, args=("B", b_pool, sync_b, b_lease))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for pool in (writes, a_pool.pool, b_pool):
        pool.close()
    assert not errors, errors

    (victim,) = paused_on
    a, b = (Counter(o.status for o in reports[run].outcomes) for run in "AB")
    assert a["synced"] > 0 and b["synced"] > 0, "both runs worked the bucket"
    assert a["synced"] + b["synced"] == REPOS, (a, b)
    assert [o.status for o in reports["A"].outcomes if o.did == victim] == ["lost"]
    assert a["lost"] >= 1 and a_lease.lost >= {victim}

    per_repo = dict(target.execute("SELECT did, count(*) FROM records GROUP BY did").fetchall())
    assert set(per_repo) == set(dids), "a repo was never synced"
    assert [did for did, n in per_repo.items() if n != 1] == [], "a repo was synced twice"
    assert target.execute("SELECT rkey FROM records WHERE did = %s", (victim,)).fetchone() == ("B",)
    ledger_state = target.execute(
        "SELECT status, count(*), count(claim_token) FROM repos GROUP BY status").fetchall()
    assert ledger_state == [("synced", REPOS, 0)]
    assert target.execute("SELECT pds, head FROM repos WHERE did = %s", (victim,)).fetchone() == ("B", "head-B")


# One `atproto/repos` run of a bucket in a process of its own, as the daemon launches each run; prints
# its outcomes. (Two in-process runs in threads deadlock in Dagster's logging setup.)
BUCKET_RUN = """
import json, sys
from migration_assets.core.instance import project_instance
from tests.repos.helpers import metadata, run_bucket
result = run_bucket(project_instance(), sys.argv[1], plc_url=sys.argv[2], concurrency=2)
print(json.dumps(metadata(result)["outcomes"]))
"""


def test_two_bucket_runs_against_the_pds_share_its_repos_and_sync_each_once(pds, target, instance, dagster_home,
                                                                            atproto_env, monkeypatch):
    """Two `atproto/repos` runs of one bucket at once, as the repo_sync sensor starts them on a busy bucket,
    each in its own process, against the dev-env PLC and PDS. Every download is held until both runs hold
    claims, so both work the bucket; each repo is then downloaded once and synced once, by one of them."""
    monkeypatch.setenv("REPO_BUCKETS", "1")
    monkeypatch.setenv("REPO_CLAIM_BATCH", "2")  # a run holds a few repos at a time: the rest wait for either
    accounts = [pds.create_account(handle()) for _ in range(12)]  # a run held 8 while its downloads waited: 4 are left
    for n, account in enumerate(accounts):
        pds.create_records(account, POSTS, [post(n), post(n + 100)])
    dids = [account.did for account in accounts]
    both_claimed, gave_up = threading.Event(), []

    def runs_holding_claims() -> int:
        return target.execute("SELECT count(DISTINCT claim_token) FROM repos WHERE did = ANY(%s)", (dids,)).fetchone()[0]

    def hold_until_both_runs_hold_claims(method: str, path: str) -> Reply | None:
        # Each download is held HOLD seconds at most, under the runs' 30 s read timeout: one held longer
        # was tried again by its run, and counted as a second download (a slow start of the other run).
        if "sync.getRepo" in path and not both_claimed.is_set():
            held_until = min(time.monotonic() + HOLD, give_up_at)
            while runs_holding_claims() < 2 and time.monotonic() < held_until:
                time.sleep(0.05)
            if runs_holding_claims() >= 2:
                both_claimed.set()
            elif time.monotonic() >= give_up_at:
                gave_up.append(path)
                both_claimed.set()
        return None  # then answered by the PDS

    discover(instance, dids=dids)
    give_up_at = time.monotonic() + WAIT
    with routed(atproto_env, pds_intercept=hold_until_both_runs_hold_claims) as (plc, pds_proxy):
        command = [sys.executable, "-c", BUCKET_RUN, bucket_key(0), plc.url]
        env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT)}
        runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in "AB"]
        try:
            outputs = [run.communicate(timeout=2 * WAIT) for run in runs]
        finally:
            for run in runs:
                run.kill()  # after a timeout: no run left behind
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert not gave_up, "the two runs never held claims at once"
    synced = [json.loads(out.strip().splitlines()[-1]).get("synced", 0) for out, _ in outputs]
    assert all(synced) and sum(synced) == len(dids), synced
    for did in dids:
        assert pds_proxy.count(f"getRepo?did={did.replace(':', '%3A')}") == 1, f"{did} was not downloaded once"
        assert stored_records(target, did) == listed_records(pds.pds.url, did, POSTS)
    assert target.execute("SELECT status, count(*), count(claim_token) FROM repos WHERE did = ANY(%s) GROUP BY status",
                          (dids,)).fetchall() == [("synced", len(dids), 0)]
