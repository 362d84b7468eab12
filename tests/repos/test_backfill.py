"""Repo backfill against a real reference PDS and PLC directory (from @atproto/dev-env) on loopback."""

import httpx

from migration_assets.core.postgres import shared_pool
from migration_assets.repos import ledger
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos import snapshot as snapshot_module
from migration_assets.repos.resources import RepoSourceResource
from tests.compiled import count_compiled
from tests.repos.conftest import handle
from tests.repos.helpers import (
    bucket_of_did, check_evaluations, discover, ledger_row, listed_records, metadata, run_bucket,
    stored_records, sync_dids,
)

POSTS = "app.bsky.feed.post"
LIKES = "com.example.like"


def post(n: int) -> dict:
    return {"$type": POSTS, "text": f"post {n}", "createdAt": "2026-11-23T10:00:00.000Z"}


def test_backfill_then_resync_applies_creates_updates_and_deletes(pds, target, instance):
    account = pds.create_account(handle())
    post_keys = pds.create_records(account, POSTS, [post(n) for n in range(30)])
    like_keys = pds.create_records(account, LIKES, [{"subject": f"s{n}", "createdAt": "2026-11-23T10:00:00Z"} for n in range(12)])

    results = sync_dids(instance, target, [account.did])
    (result,) = results.values()
    assert metadata(result)["outcomes"] == {"synced": 1}
    assert all(check_evaluations(result).values()), check_evaluations(result)
    stored = stored_records(target, account.did)
    assert stored == listed_records(pds.pds.url, account.did, POSTS) | listed_records(pds.pds.url, account.did, LIKES)
    row = ledger_row(target, account.did)
    latest = httpx.get(f"{pds.pds.url}/xrpc/com.atproto.sync.getLatestCommit", params={"did": account.did}).json()
    assert (row["status"], row["head"], row["rev"], row["records_count"]) == ("synced", latest["cid"], latest["rev"], 42)
    counts = dict(target.execute("SELECT collection, records FROM repo_collection_counts WHERE did = %s", (account.did,)).fetchall())
    assert counts == {POSTS: 30, LIKES: 12}
    untouched_at = target.execute(
        "SELECT indexed_at FROM records WHERE did = %s AND rkey = %s", (account.did, post_keys[20])
    ).fetchone()[0]

    pds.update_records(account, POSTS, {post_keys[0]: post(100), post_keys[1]: post(101), post_keys[2]: post(102)})
    pds.delete_records(account, LIKES, like_keys[:4])
    pds.create_records(account, POSTS, [post(200), post(201)])

    # The listing shows the head moved, so discovery marks the repo due again.
    discover(instance, hosts=[pds.pds.url])
    assert ledger_row(target, account.did)["status"] == "pending"
    result = run_bucket(instance, bucket_of_did(target, account.did))
    meta = metadata(result)
    assert (meta["records_created"], meta["records_updated"], meta["records_deleted"]) == (2, 3, 4)
    stored = stored_records(target, account.did)
    assert stored == listed_records(pds.pds.url, account.did, POSTS) | listed_records(pds.pds.url, account.did, LIKES)
    assert stored[(POSTS, post_keys[0])][1]["text"] == "post 100"
    assert target.execute(
        "SELECT indexed_at FROM records WHERE did = %s AND rkey = %s", (account.did, post_keys[20])
    ).fetchone()[0] == untouched_at, "an unchanged record was rewritten"
    assert ledger_row(target, account.did)["records_count"] == 40
    assert all(check_evaluations(result).values())


def test_deactivated_and_taken_down_accounts_are_marked_and_nothing_stays_pending(pds, target, instance):
    quiet, banned = pds.create_account(handle()), pds.create_account(handle())
    for account in (quiet, banned):
        pds.create_records(account, POSTS, [post(n) for n in range(5)])
    sync_dids(instance, target, [quiet.did, banned.did])
    pds.deactivate(quiet)
    pds.takedown(banned)

    sync_dids(instance, target, [quiet.did, banned.did])
    for account, status in ((quiet, "deactivated"), (banned, "takendown")):
        row = ledger_row(target, account.did)
        assert (row["status"], row["next_retry_at"]) == (status, None)
        assert "Repo" in row["last_error"]
        assert len(stored_records(target, account.did)) == 5, "an inactive account keeps its records"


def test_unknown_did_and_deleted_repo_are_marked_deleted_without_records(pds, target, instance, atproto_env):
    gone = pds.create_account(handle())
    pds.create_records(gone, POSTS, [post(n) for n in range(3)])
    sync_dids(instance, target, [gone.did])
    assert len(stored_records(target, gone.did)) == 3
    # The admin deletes the account: its PDS now answers RepoNotFound.
    reply = httpx.post(f"{pds.pds.url}/xrpc/com.atproto.admin.deleteAccount", json={"did": gone.did},
                       auth=("admin", pds.pds.admin_password))
    assert reply.status_code == 200, reply.text
    never = "did:plc:" + "z" * 24

    results = sync_dids(instance, target, [gone.did, never])
    assert stored_records(target, gone.did) == {}
    for did in (gone.did, never):
        row = ledger_row(target, did)
        assert (row["status"], row["records_count"], row["next_retry_at"]) == ("deleted", 0, None), row
    assert "NotFound" in ledger_row(target, never)["last_error"]
    assert all(all(check_evaluations(r).values()) for r in results.values())


def test_one_repos_failure_schedules_a_retry_and_spares_the_others(pds, target, instance, monkeypatch):
    good = pds.create_account(handle())
    pds.create_records(good, POSTS, [post(1)])
    # The private-address guard refuses the loopback PDS: that repo fails, with a retry scheduled.
    monkeypatch.setenv("ATPROTO_ALLOW_PRIVATE_HOSTS", "false")
    results = sync_dids(instance, target, [good.did])
    row = ledger_row(target, good.did)
    assert (row["status"], row["attempts"]) == ("error", 1)
    assert row["next_retry_at"] is not None and "http://localhost" in row["last_error"], row
    assert all(r.success for r in results.values()), "a repo's failure must not fail its bucket's run"
    assert metadata(next(iter(results.values())))["outcomes"].get("retry") == 1


def test_a_data_error_about_one_repo_fails_that_repo_and_the_run_goes_on(pds, target, target_url, atproto_env):
    """PostgreSQL refusing one repo's records (here a trigger raising 22P05, the error U+0000 in jsonb
    gives) fails that repo with an error naming it and the next step; the other repo of the run syncs."""
    victim, bystander = pds.create_account(handle()), pds.create_account(handle())
    for account in (victim, bystander):
        pds.create_records(account, POSTS, [post(n) for n in range(4)])
    target.execute(
        """CREATE FUNCTION refuse_one_repo() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.did = '%s' THEN
               RAISE EXCEPTION 'unsupported Unicode escape sequence' USING ERRCODE = 'untranslatable_character';
             END IF;
             RETURN NEW;
           END $$""" % victim.did)
    target.execute("CREATE TRIGGER refuse BEFORE INSERT ON records FOR EACH ROW EXECUTE FUNCTION refuse_one_repo()")
    ledger.request_sync(target, [victim.did, bystander.did], 256)
    buckets = sorted({ledger_row(target, d)["bucket"] for d in (victim.did, bystander.did)})
    pool = shared_pool(target_url)
    clients = RepoSourceResource().clients(target_url)
    try:
        report = backfill_buckets(pool, RepoSourceResource().syncer(pool, clients), buckets)
    finally:
        clients.close()

    assert {o.did: o.status for o in report.outcomes} == {victim.did: "retry", bystander.did: "synced"}
    row = ledger_row(target, victim.did)
    assert (row["status"], row["attempts"], row["claim_token"]) == ("error", 1, None), row
    assert victim.did in row["last_error"] and "UntranslatableCharacter" in row["last_error"]
    assert f"--did {victim.did}" in row["last_error"], "the error says what to do next"
    assert stored_records(target, victim.did) == {}
    assert len(stored_records(target, bystander.did)) == 4


def test_an_export_past_the_runs_whole_car_memory_streams_and_syncs_alike(pds, target, target_url, monkeypatch):
    """REPO_WHOLE_CAR_MEMORY_BYTES is what a run's downloads may hold whole at once for the compiled parse:
    an export bigger than that streams through the Python parse and is stored the same; every share taken
    is given back when the run ends."""
    small, big = pds.create_account(handle()), pds.create_account(handle())
    pds.create_records(small, POSTS, [post(0)])
    pds.create_records(big, POSTS, [post(n) for n in range(300)])
    compiled = count_compiled(monkeypatch, snapshot_module, "parse")
    ledger.request_sync(target, [small.did, big.did], 256)
    buckets = sorted({ledger_row(target, d)["bucket"] for d in (small.did, big.did)})
    pool = shared_pool(target_url)
    # One download at a time, so the big export's bytes never leave the small one no room. At most
    # half the share, 10,000 bytes, is read whole: the small export is ~1 KB, the big one ~50 KB.
    source = RepoSourceResource(whole_car_memory_bytes=20_000, concurrency=1)
    clients = source.clients(target_url)
    try:
        syncer = source.syncer(pool, clients)
        report = backfill_buckets(pool, syncer, buckets)
    finally:
        clients.close()

    assert {o.did: o.status for o in report.outcomes} == {small.did: "synced", big.did: "synced"}
    assert (compiled.calls, compiled.answered) == (1, 1), "only the small export was read whole"
    assert syncer.whole_cars.taken == 0
    assert len(stored_records(target, small.did)) == 1
    assert stored_records(target, big.did) == listed_records(pds.pds.url, big.did, POSTS)
