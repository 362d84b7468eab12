"""The repo_sync sensor tick by tick against a real PDS: it pages listRepos across ticks, requests runs
for the buckets with due repos, and asks again only when a repo's head moves."""

import json

import dagster as dg

from migration_assets.core.resources import PostgresResource
from migration_assets.repos import sensors
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.sensors import repo_sync
from tests.repos.conftest import handle
from tests.repos.helpers import ledger_row, run_bucket

POSTS = "app.bsky.feed.post"


def tick(instance, cursor):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"postgres": PostgresResource(), "repo_source": RepoSourceResource()},
    )
    return repo_sync(context)


def test_sensor_discovers_across_ticks_and_resyncs_moved_repos(pds, target, instance, monkeypatch):
    accounts = [pds.create_account(handle()) for _ in range(3)]
    for n, account in enumerate(accounts):
        pds.create_records(account, POSTS, [{"$type": POSTS, "text": f"{n}", "createdAt": "2026-11-23T00:00:00Z"}])
    monkeypatch.setenv("REPO_DISCOVERY_HOSTS", pds.pds.url)
    monkeypatch.setattr(sensors, "PAGES_PER_TICK", 1)
    monkeypatch.setattr("migration_assets.repos.discovery.PAGE_SIZE", 2)  # several pages, one per tick

    cursor, requested = None, {}
    for _ in range(50):  # one page a tick until the pass completes (other tests' accounts are listed too)
        result = tick(instance, cursor)
        cursor = result.cursor
        requested.update({r.partition_key: r for r in result.run_requests})
        if json.loads(cursor)[pds.pds.url] is None:
            break
    else:
        raise AssertionError("the listing never completed")
    ours = {bucket_key(ledger_row(target, a.did)["bucket"]) for a in accounts}
    assert ours <= set(requested), "a bucket with a new repo got no run"
    for key in requested:
        run_bucket(instance, key)
    assert {ledger_row(target, a.did)["status"] for a in accounts} == {"synced"}

    # Nothing moved: a full pass requests nothing.
    result = tick(instance, None)
    while json.loads(result.cursor)[pds.pds.url] is not None:
        assert not result.run_requests
        result = tick(instance, result.cursor)
    assert not result.run_requests

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
