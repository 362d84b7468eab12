"""The claim loop (`backfill.sync_leased`, real PostgreSQL, lease and heartbeat) when most repos'
host is slow: the repos put aside for it are bounded, and every repo is synced once. The per-repo
step is a trivial one holding a real `HostSlots` slot (the PDS-backed test is in test_faults.py)."""

import threading
import time
from collections import Counter

from psycopg_pool import ConnectionPool

from migration_assets.core.concurrency import HostSlots
from migration_assets.repos import ledger
from migration_assets.repos.assets import outcome_metadata
from migration_assets.repos.backfill import RepoOutcome, _PutAside, sync_leased
from migration_assets.repos.cli import bucket_summary
from migration_assets.repos.collections import RecordScope
from migration_assets.repos.ledger import ClaimedRepo

REPOS = 200
BATCH = 10
WAIT = 60  # seconds: a guard against a hang, never a measurement


def host_of(did: str) -> str:
    return "quick:443" if int(did[-5:]) % 10 == 0 else "slow:443"  # nine in ten on the slow host


class Stopped(Exception):
    pass


def test_a_run_stopped_with_repos_aside_gives_them_back(target, target_url):
    """The run stops (its progress callback raises, as an interrupt does) while the slow host's repos
    wait aside and one is downloading: every repo not synced is given back, due again at once."""
    dids = [f"did:plc:aside{n:05d}" for n in range(REPOS)]
    ledger.enqueue(target, dids, 1)
    slots = HostSlots(total=2, per_host=1)
    slow_gate = threading.Event()
    pool = ConnectionPool(target_url, min_size=1, max_size=8, open=True)

    def sync_one(repo: ClaimedRepo, lease) -> RepoOutcome:
        with slots.hold(host_of(repo.did), wait_for_host=False):
            if host_of(repo.did) == "slow:443":
                slow_gate.wait(WAIT)
        with pool.connection() as conn, lease.holding(conn, repo.did), conn.cursor() as cur:
            ledger.finish_synced(cur, repo.did, "pds", head="head", rev=None, records=0, data_root="data",
                                 collections_filter=RecordScope().key, signal_missing=False)
        return RepoOutcome(repo.did, "synced")

    def stop_at_the_second_quick_one(outcome, done: int, total: int) -> None:
        if done == 2:
            slow_gate.set()  # the slow download in flight ends too (a real one is cut: test_faults.py)
            raise Stopped()

    try:
        sync_leased(pool, sync_one, [0], ledger.repo_lease(60), batch=BATCH, threads=4,
                    on_outcome=stop_at_the_second_quick_one, slots=slots)
        raise AssertionError("the run did not stop")
    except Stopped:
        pass
    finally:
        pool.close()
    rows = dict(target.execute("SELECT status, count(*) FROM repos WHERE claim_token IS NULL GROUP BY status").fetchall())
    assert target.execute("SELECT count(*) FROM repos WHERE claim_token IS NOT NULL").fetchone()[0] == 0, \
        "a repo put aside was left leased"
    assert rows.get("synced", 0) >= 2 and rows.get("synced", 0) + rows.get("pending", 0) == REPOS, rows


def test_a_slow_host_leaves_the_rest_of_the_bucket_unclaimed_and_every_repo_is_synced_once(target, target_url):
    dids = [f"did:plc:aside{n:05d}" for n in range(REPOS)]
    ledger.enqueue(target, dids, 1)
    slots = HostSlots(total=2, per_host=1)
    slow_gate = threading.Event()
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def sync_one(repo: ClaimedRepo, lease) -> RepoOutcome:
        with lock:
            attempts[repo.did] = attempts.get(repo.did, 0) + 1
        with slots.hold(host_of(repo.did), wait_for_host=False):
            if host_of(repo.did) == "slow:443":
                assert slow_gate.wait(WAIT), "the test never let the slow host go on"
                time.sleep(0.005)  # a download: the slot is held a while
        with pool.connection() as conn, lease.holding(conn, repo.did), conn.cursor() as cur:
            ledger.finish_synced(cur, repo.did, "pds", head="head", rev=None, records=0, data_root="data",
                                 collections_filter=RecordScope().key, signal_missing=False)
        return RepoOutcome(repo.did, "synced")

    pool = ConnectionPool(target_url, min_size=1, max_size=8, open=True)
    reports: list = []
    run = threading.Thread(target=lambda: reports.append(
        sync_leased(pool, sync_one, [0], ledger.repo_lease(60), batch=BATCH, threads=4, slots=slots)))
    run.start()
    # While the slow host holds its slot, the run puts its repos aside. Unbounded, it claimed the whole
    # bucket within milliseconds; bounded, it stops claiming once BATCH are aside (plus the batch in hand).
    time.sleep(1.0)
    claimed_while_slow = target.execute("SELECT count(*) FROM repos WHERE status = 'in_progress'").fetchone()[0]
    slow_gate.set()
    run.join(WAIT)
    pool.close()
    assert not run.is_alive(), "the run did not end"
    assert claimed_while_slow <= 3 * BATCH, f"{claimed_while_slow} of {REPOS} repos claimed while one host was slow"
    (report,) = reports
    assert sorted(o.did for o in report.outcomes) == dids, "a repo was lost or synced twice"
    assert target.execute("SELECT status, count(*), count(claim_token) FROM repos GROUP BY status").fetchall() == [
        ("synced", REPOS, 0)]
    # Handed out again only when the host has room, one at a time: about two attempts per slow repo
    # (put aside once, then synced): 380 here, against 1,600 when each slot freed drew every repo aside.
    assert sum(attempts.values()) < 3 * REPOS, f"{sum(attempts.values())} attempts for {REPOS} repos"
    # Each repo tried more than once was put aside: the run counts it once for its host, however often.
    waited = Counter(host_of(did) for did, n in attempts.items() if n > 1)
    assert report.waited_for_host == waited and waited["slow:443"] > REPOS / 2, (report.waited_for_host, waited)
    # What the run's materialization shows in the UI, and the CLI prints, of it.
    shown = {name: value.value for name, value in outcome_metadata(report).items()}
    assert shown["repos_waited_for_busy_host"] == waited.total()
    assert f"| slow:443 | {waited['slow:443']} |" in shown["busy_hosts"].splitlines()
    assert bucket_summary(shown).endswith(f"; {waited.total()} waited for a busy host's download slot")


def test_a_repo_put_aside_again_is_counted_once_for_its_host():
    """A repo handed out again can find its host busy again (another of its repos took the freed slot
    first): it waits aside once more, and still counts once in the run's `waited_for_host`."""
    slots = HostSlots(total=2, per_host=1)
    aside = _PutAside(slots)
    repo = ClaimedRepo(did="did:plc:again", bucket=0, attempts=0, head=None)
    aside.finished(aside.handed_out(repo), busy_host="slow:443")  # first turn: the host was busy
    ready, host = aside.ready()
    assert (ready, host) == (repo, "slow:443")
    aside.finished(aside.handed_out(ready, again_to=host), busy_host="slow:443")  # busy again
    assert aside.waited == {"slow:443": 1} and aside.waiting() == 1
    ready, host = aside.ready()
    aside.finished(aside.handed_out(ready, again_to=host), busy_host=None)  # synced
    assert aside.waited == {"slow:443": 1} and aside.done()
