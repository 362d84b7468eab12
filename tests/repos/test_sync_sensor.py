"""The repo_sync sensor tick by tick against a real PDS: it pages listRepos across ticks, requests runs
for the buckets with due repos, and asks again only when a repo's head moves; against a slow host, a
tick stops paging at its time budget and the next goes on from there."""

import json
from dataclasses import replace

import dagster as dg

from migration_assets.core.resources import PostgresResource
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.sensors import repo_sync
from migration_assets.repos.settings import RepoSettings
from tests.atproto.loopback import LoopbackServer, Reply, Request, json_reply
from tests.repos.conftest import handle
from tests.repos.helpers import ledger_row, run_bucket

POSTS = "app.bsky.feed.post"


def tick(instance, cursor, **source):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"postgres": PostgresResource(), "repo_source": RepoSourceResource(**source)},
    )
    return repo_sync(context)


def not_synced(target) -> list[tuple]:
    """The ledger rows a tick may find due, to name them when one is requested."""
    return target.execute("SELECT did, bucket, status, last_error, next_retry_at FROM repos"
                          " WHERE status NOT IN ('synced', 'deactivated', 'takendown', 'suspended', 'deleted')").fetchall()


def test_sensor_discovers_across_ticks_and_resyncs_moved_repos(pds, target, instance, monkeypatch):
    accounts = [pds.create_account(handle()) for _ in range(3)]
    for n, account in enumerate(accounts):
        pds.create_records(account, POSTS, [{"$type": POSTS, "text": f"{n}", "createdAt": "2026-11-23T00:00:00Z"}])
    monkeypatch.setenv("REPO_DISCOVERY_HOSTS", pds.pds.url)
    monkeypatch.setenv("REPO_SENSOR_TICK_SECONDS", "0.000001")  # a tick ends after its first page
    monkeypatch.setattr("migration_assets.repos.discovery.PAGE_SIZE", 2)  # several pages, one per tick
    monkeypatch.setattr("migration_assets.repos.sensors.MAX_RUNS_PER_TICK", 1)  # more due buckets than a tick asks for

    cursor, requested = None, {}
    for _ in range(50):  # one page a tick until the pass completes (other tests' accounts are listed too)
        result = tick(instance, cursor)
        cursor = result.cursor
        requested.update({r.partition_key: r for r in result.run_requests})
        if json.loads(cursor)[pds.pds.url] is None:
            break
    else:
        raise AssertionError("the listing never completed")
    due = set(requested)
    # A tick asks for at most MAX_RUNS_PER_TICK buckets; the next ticks ask for the rest. The PDS holds every
    # earlier test's accounts too: more than 100 due buckets once, which a bound of 100 ticks left due.
    for _ in range(2 * RepoSettings.load().buckets):
        for key in due:
            run_bucket(instance, key)
        requested.update(dict.fromkeys(due))
        due = {r.partition_key for r in tick(instance, None).run_requests}
        if not due:
            break
    else:
        raise AssertionError(f"buckets still due after every tick: {sorted(due)}")
    ours = {bucket_key(ledger_row(target, a.did)["bucket"]) for a in accounts}
    assert ours <= set(requested), "a bucket with a new repo got no run"
    assert {ledger_row(target, a.did)["status"] for a in accounts} == {"synced"}

    # Nothing moved: a full pass requests nothing.
    result = tick(instance, None)
    while json.loads(result.cursor)[pds.pds.url] is not None:
        assert not result.run_requests, not_synced(target)
        result = tick(instance, result.cursor)
    assert not result.run_requests, not_synced(target)

    # One repo moves: its bucket, and only that, is requested, once.
    pds.create_records(accounts[0], POSTS, [{"$type": POSTS, "text": "new", "createdAt": "2026-11-23T00:00:00Z"}])
    keys, cursor = [], None
    while True:
        result = tick(instance, cursor)
        keys += [r.partition_key for r in result.run_requests]
        cursor = result.cursor
        if json.loads(cursor)[pds.pds.url] is None:
            break
    moved = bucket_key(ledger_row(target, accounts[0].did)["bucket"])
    assert set(keys) == {moved}
    run_key = next(r.run_key for r in tick(instance, None).run_requests)
    assert run_key == next(r.run_key for r in tick(instance, None).run_requests), "an unchanged due set must keep its run key"
    run_bucket(instance, moved)
    assert ledger_row(target, accounts[0].did)["records_count"] == 2


def test_sensor_keeps_going_when_a_host_is_down(pds, target, instance, monkeypatch):
    monkeypatch.setenv("REPO_DISCOVERY_HOSTS", f"http://127.0.0.1:9,{pds.pds.url}")
    account = pds.create_account(handle())
    cursor = None
    for _ in range(50):
        result = tick(instance, cursor)
        cursor = result.cursor
        if json.loads(cursor).get(pds.pds.url, "x") is None:
            break
    assert ledger_row(target, account.did)["status"] == "pending"


def test_a_slow_host_is_listed_across_ticks_within_the_budget(target, instance, monkeypatch):
    pages = [[f"did:plc:slowhost{page}{n}aaaaaaaaaaaaaa" for n in range(3)] for page in range(4)]
    host = LoopbackServer()

    def list_repos(request: Request) -> Reply:
        at = int(request.query.get("cursor", ["0"])[0])
        reply = {"repos": [{"did": did, "head": f"head-{did}", "rev": "3l5aaaaaaaa22"} for did in pages[at]]}
        if at + 1 < len(pages):
            reply["cursor"] = str(at + 1)
        return replace(json_reply(reply), delay=0.05)  # a slow host: every page outlasts the budget

    host.route("GET", "/xrpc/com.atproto.sync.listRepos", list_repos)
    monkeypatch.setenv("REPO_DISCOVERY_HOSTS", host.url + "/")  # the trailing slash is dropped
    monkeypatch.setenv("REPO_SENSOR_TICK_SECONDS", "0.01")
    try:
        first = tick(instance, None, allow_private_hosts=True)
        assert json.loads(first.cursor) == {host.url: "1"}, "the first tick stopped at its budget, cursor kept"
        known = {row[0] for row in target.execute("SELECT did FROM repos")}
        assert known == set(pages[0])

        cursor = first.cursor
        for _ in range(len(pages) - 1):
            cursor = tick(instance, cursor, allow_private_hosts=True).cursor
        assert json.loads(cursor) == {host.url: None}, "the pass is complete"
    finally:
        host.stop()
    asked = [r.query.get("cursor", [None])[0] for r in host.calls("/xrpc/com.atproto.sync.listRepos")]
    assert asked == [None, "1", "2", "3"], "each tick went on from the saved cursor"
    known = {row[0] for row in target.execute("SELECT did FROM repos")}
    assert known == {did for page in pages for did in page}
