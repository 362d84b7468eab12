"""Collection filters (REPO_COLLECTIONS) and a signal collection (REPO_SIGNAL_COLLECTION) against the
dev-env PLC and PDS: only matching records are stored, a widened filter backfills the rest of repos
already synced, a narrowed one deletes what it no longer matches, and a repo without a record in the
signal collection keeps none."""

import dagster as dg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import MstError
from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.core.postgres import shared_pool
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import SettingsError
from migration_assets.repos import ledger
from migration_assets.repos.collections import CollectionFilter, CollectionPatternError, RecordScope
from migration_assets.repos.discovery import BY_COLLECTION, KNOWN_ONLY, discover
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.repos.sensors import repo_sync
from migration_assets.repos.settings import RepoSettings
from migration_assets.repos.snapshot import read_snapshot
from migration_assets.repos.store import store_snapshot
from tests.atproto.builders import build_mst, car_bytes, private_key, put, signed_commit
from tests.atproto.loopback import LoopbackServer, Request, json_reply
from tests.repos.conftest import handle
from tests.repos.helpers import bucket_of_did, check_evaluations, ledger_row, run_bucket, stored_records, sync_dids

POST, LIKE, PROFILE, OTHER = "app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.actor.profile", "com.example.note"
AT = "2026-12-04T10:00:00.000Z"
KEY = private_key(ec.SECP256K1(), 0xF117E5)
SOME_CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


def test_patterns_match_whole_segments_and_key_is_stable():
    feed = CollectionFilter.parse(" app.bsky.feed.*, com.example.note,app.bsky.feed.* ")
    assert feed.key == "app.bsky.feed.*,com.example.note"
    assert CollectionFilter.parse("com.example.note,app.bsky.feed.*").key == feed.key
    assert [feed.matches(n) for n in (POST, LIKE, OTHER, PROFILE, "app.bsky.feedx.post", "com.example.notes")] == [
        True, True, True, False, False, False]
    assert CollectionFilter.parse("").everything and CollectionFilter.parse("*,app.bsky.feed.post").key == "*"


@pytest.mark.parametrize("text", ["app.bsky.*.post", "app..feed", "app.bsky.feed*", "*.post", "app.bsky.feed.post/x"])
def test_an_invalid_pattern_is_refused(text):
    with pytest.raises(CollectionPatternError, match="not an NSID"):
        CollectionFilter.parse(text)


def test_invalid_settings_fail_naming_the_variable(monkeypatch):
    monkeypatch.setenv("REPO_COLLECTIONS", "app.bsky.feed.*,app.bsky.*.like")
    with pytest.raises(SettingsError, match="REPO_COLLECTIONS .*app.bsky.\\*.like"):
        RepoSettings.load()
    monkeypatch.delenv("REPO_COLLECTIONS")
    monkeypatch.setenv("REPO_SIGNAL_COLLECTION", "app.bsky.actor.*")
    with pytest.raises(SettingsError, match="REPO_SIGNAL_COLLECTION"):
        RepoSettings.load()


def tick(instance):
    context = dg.build_sensor_context(
        instance=instance, resources={"postgres": PostgresResource(), "repo_source": RepoSourceResource()})
    return repo_sync(context)


def seed(pds, account, posts=3, likes=2, notes=4) -> None:
    pds.create_records(account, POST, [{"text": f"p{n}", "createdAt": AT} for n in range(posts)])
    subject = {"uri": f"at://{account.did}/{POST}/3jzfcijpj2z2a", "cid": SOME_CID}
    pds.create_records(account, LIKE, [{"subject": subject, "createdAt": AT} for _ in range(likes)])
    pds.create_records(account, OTHER, [{"text": f"n{n}"} for n in range(notes)])


def collections(target, did) -> dict[str, int]:
    counts: dict[str, int] = {}
    for collection, _ in stored_records(target, did):
        counts[collection] = counts.get(collection, 0) + 1
    return counts


def test_filter_stores_only_matching_then_widening_backfills_and_narrowing_deletes(
        pds, target, instance, monkeypatch):
    account = pds.create_account(handle())
    seed(pds, account)
    monkeypatch.setenv("REPO_COLLECTIONS", "app.bsky.feed.*")

    (result,) = sync_dids(instance, target, [account.did]).values()
    assert collections(target, account.did) == {POST: 3, LIKE: 2}
    row = ledger_row(target, account.did)
    assert (row["status"], row["records_count"], row["collections_filter"]) == ("synced", 5, "app.bsky.feed.*")
    assert dict(target.execute("SELECT collection, records FROM repo_collection_counts WHERE did = %s",
                               (account.did,)).fetchall()) == {POST: 3, LIKE: 2}
    assert all(check_evaluations(result).values()), check_evaluations(result)

    # Unchanged filter: the sensor leaves the synced repo alone.
    assert not tick(instance).run_requests
    assert ledger_row(target, account.did)["status"] == "synced"

    # Widened to everything: the repo is due again though its head did not move, and gets the rest.
    monkeypatch.delenv("REPO_COLLECTIONS")
    key = bucket_of_did(target, account.did)
    assert [r.partition_key for r in tick(instance).run_requests] == [key]
    result = run_bucket(instance, key)
    assert collections(target, account.did) == {POST: 3, LIKE: 2, OTHER: 4}
    assert ledger_row(target, account.did)["collections_filter"] == "*"
    assert all(check_evaluations(result).values()), check_evaluations(result)

    # Narrowed: what is no longer matched is deleted at the next store.
    monkeypatch.setenv("REPO_COLLECTIONS", f"{POST},{OTHER}")
    assert [r.partition_key for r in tick(instance).run_requests] == [key]
    run_bucket(instance, key)
    assert collections(target, account.did) == {POST: 3, OTHER: 4}
    row = ledger_row(target, account.did)
    assert (row["records_count"], row["collections_filter"]) == (7, f"{POST},{OTHER}")


def test_signal_collection_keeps_only_repos_with_a_record_in_it(pds, target, instance, monkeypatch):
    with_profile, without = pds.create_account(handle()), pds.create_account(handle())
    for account in (with_profile, without):
        seed(pds, account)
    pds.create_records(with_profile, PROFILE, [{"displayName": "me"}], rkeys=["self"])
    monkeypatch.setenv("REPO_SIGNAL_COLLECTION", PROFILE)

    results = sync_dids(instance, target, [with_profile.did, without.did])
    assert collections(target, with_profile.did) == {POST: 3, LIKE: 2, OTHER: 4, PROFILE: 1}
    assert stored_records(target, without.did) == {}
    kept, dropped = ledger_row(target, with_profile.did), ledger_row(target, without.did)
    assert (kept["status"], kept["signal_missing"], kept["records_count"]) == ("synced", False, 10)
    assert (dropped["status"], dropped["signal_missing"], dropped["records_count"]) == ("synced", True, 0)
    assert dropped["head"] is not None, "the head is kept so a later move (a signal record added) resyncs it"
    assert all(all(check_evaluations(r).values()) for r in results.values())

    # The account gains a signal record: its next sync stores everything.
    pds.create_records(without, PROFILE, [{"displayName": "now"}], rkeys=["self"])
    sync_dids(instance, target, [without.did])
    assert collections(target, without.did) == {POST: 3, LIKE: 2, OTHER: 4, PROFILE: 1}
    assert ledger_row(target, without.did)["signal_missing"] is False


def test_signal_with_a_filter_excluding_it_still_decides_which_repos_are_kept(pds, target, instance, monkeypatch):
    account = pds.create_account(handle())
    seed(pds, account)
    pds.create_records(account, PROFILE, [{"displayName": "me"}], rkeys=["self"])
    monkeypatch.setenv("REPO_COLLECTIONS", "app.bsky.feed.post")
    monkeypatch.setenv("REPO_SIGNAL_COLLECTION", PROFILE)
    sync_dids(instance, target, [account.did])
    assert collections(target, account.did) == {POST: 3}
    assert ledger_row(target, account.did)["collections_filter"] == f"{POST};signal={PROFILE}"


def test_discovery_falls_back_to_list_repos_where_list_repos_by_collection_is_not_served(pds, target):
    account = pds.create_account(handle())
    with XrpcClient(pds.pds.url, allow_private_hosts=True) as client:
        progress = discover(target, client, 16, signal=PROFILE)
    assert progress.finished
    assert ledger_row(target, account.did)["status"] == "pending", "the backfill decides on a host without it"


def test_discovery_adds_only_repos_having_the_signal_where_the_host_serves_it(target):
    having, lacking, known = "did:plc:having", "did:plc:lacking", "did:plc:known"
    target.execute("INSERT INTO repos (did, bucket, status, head, rev) VALUES (%s, 0, 'synced', 'h1', 'r1')", (known,))

    def by_collection(request: Request):
        assert request.query["collection"] == [PROFILE]
        if "cursor" in request.query:
            return json_reply({"repos": []})
        return json_reply({"repos": [{"did": having}], "cursor": "c1"})

    server = LoopbackServer()
    server.route("GET", "/xrpc/com.atproto.sync.listReposByCollection", by_collection)
    server.route("GET", "/xrpc/com.atproto.sync.listRepos", json_reply({"repos": [
        {"did": d, "head": "h2", "rev": "r2", "active": True} for d in (having, lacking, known)]}))
    try:
        with XrpcClient(server.url, allow_private_hosts=True) as client:
            cursors = [discover(target, client, 16, signal=PROFILE, deadline=0).cursor]
            while cursors[-1] is not None:
                cursors.append(discover(target, client, 16, cursors[-1], deadline=0, signal=PROFILE).cursor)
    finally:
        server.stop()
    assert cursors == [BY_COLLECTION + "c1", KNOWN_ONLY, None]
    assert ledger_row(target, having)["status"] == "pending"
    assert ledger_row(target, lacking) == {}, "a repo without the signal collection entered the ledger"
    assert ledger_row(target, known)["status"] == "pending", "a known repo whose head moved is not due"


def test_excluded_records_are_neither_staged_nor_decoded_but_the_whole_mst_is_walked(target_url):
    records = {f"{POST}/3k{i:03d}": {"$type": POST, "text": f"{i}", "createdAt": AT} for i in range(3)}
    records |= {f"{OTHER}/n{i}": {"$type": OTHER, "text": f"{i}"} for i in range(2)}
    blocks: dict[CID, bytes] = {}
    cids = {key: put(blocks, value) for key, value in records.items()}
    broken = b"\xff not DAG-CBOR"  # an excluded record's block that would fail the repo if it were staged
    del blocks[cids[f"{OTHER}/n0"]]
    cids[f"{OTHER}/n0"] = CID.for_block(broken)
    blocks[cids[f"{OTHER}/n0"]] = broken
    commit_block = signed_commit(KEY, build_mst(cids, blocks), did="did:plc:filtered")
    car = car_bytes([CID.for_block(commit_block)], [(CID.for_block(commit_block), commit_block), *blocks.items()])
    scope = RecordScope(CollectionFilter.parse("app.bsky.feed.*"))

    with read_snapshot("did:plc:filtered", [car], len(car), scope) as snapshot:
        kept = {bytes(cids[k]) for k in records if k.startswith(POST)}
        assert {row[0] for row in snapshot.staged_blocks()} == kept
        assert [row[:2] for row in snapshot.record_rows()] == [(POST, f"3k{i:03d}") for i in range(3)]
        assert (snapshot.records, dict(snapshot.collections)) == (3, {POST: 3})
        with shared_pool(target_url).connection() as conn:
            ledger.enqueue(conn, ["did:plc:filtered"], 256)
            with conn.transaction():
                changes = store_snapshot(conn, snapshot, "https://pds.example")
    assert changes.created == 3

    # Filtered or not, the MST is walked: a missing node still fails the repo.
    root = dagcbor.decode(commit_block)["data"]
    del blocks[root]
    car = car_bytes([CID.for_block(commit_block)], [(CID.for_block(commit_block), commit_block), *blocks.items()])
    with pytest.raises(MstError):
        read_snapshot("did:plc:filtered", [car], len(car), scope).close()
