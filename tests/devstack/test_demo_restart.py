"""A restarted demo is consistent: its new AT Protocol network (new PLC, new DIDs) replaces the old
one in the target database, and nothing of the old network's accounts is left to fail."""

import httpx

from migration_assets.devstack import demo_atproto
from migration_assets.repos import ledger
from migration_assets.status.collect import blobs_status, repos_status

UNRELATED = "did:plc:unrelatedunrelatedunrela"


def _start_and_seed() -> tuple[object, dict]:
    network = demo_atproto.start_network()
    try:
        return network, demo_atproto.seed(network, repo_accounts=2, blob_accounts=1)
    except BaseException:
        network.stop()
        raise


def _what_the_first_demo_did(target, summary: dict) -> None:
    """What the sensors and runs of a demo leave: ledger rows with records, rate-limit rows."""
    dids = [*summary["repo_dids"], *summary["blob_migration_dids"]]
    ledger.enqueue(target, [*dids, UNRELATED], 256)
    target.execute("UPDATE repos SET status = 'synced', pds = %s WHERE did = ANY(%s)", (summary["pdses"][0], dids))
    for did in [*dids, UNRELATED]:
        target.execute("INSERT INTO records (did, collection, rkey, cid, record) VALUES (%s, 'c.x', 'r', 'b', '{}')",
                       (did,))
        target.execute("INSERT INTO repo_collection_counts (did, collection, records) VALUES (%s, 'c.x', 1)", (did,))
    for url in [summary["plc"], *summary["pdses"], "https://bsky.social"]:
        target.execute("INSERT INTO atproto_rate_limits (host, window_start) VALUES (%s, 0)",
                       (url.split("//")[1],))


def _dids(target, table: str) -> set[str]:
    return {did for (did,) in target.execute(f"SELECT DISTINCT did FROM {table}")}


def test_a_restarted_demo_keeps_nothing_of_the_previous_network(target, tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATION_DATA_DIR", str(tmp_path))
    for name in ("ATPROTO_PLC_URL", "ATPROTO_ALLOW_PRIVATE_HOSTS", "REPO_DISCOVERY_HOSTS", "MIGRATION_SECRET_KEY"):
        monkeypatch.setenv(name, "")  # start_network exports these; restored after the test
    monkeypatch.delenv("MIGRATION_SECRET_KEY")
    first_network, first = _start_and_seed()
    try:
        _what_the_first_demo_did(target, first)
        assert "no previous demo network" in first["forgotten"]
    finally:
        first_network.stop()

    second_network, second = _start_and_seed()
    try:
        old = {*first["repo_dids"], *first["blob_migration_dids"]}
        assert old.isdisjoint({*second["repo_dids"], *second["blob_migration_dids"]})
        for table in ("repos", "records", "repo_collection_counts"):
            assert _dids(target, table) == {UNRELATED}, table
        assert _dids(target, "blob_migrations") == set(second["blob_migration_dids"])
        hosts = {host for (host,) in target.execute("SELECT host FROM atproto_rate_limits")}
        assert hosts == {"bsky.social"}
        assert "3 repos, 1 blob migrations and 3 rate-limit hosts" in second["forgotten"], second["forgotten"]
        # Every account the pipelines will now work on resolves through the running PLC.
        for did in second["blob_migration_dids"]:
            assert httpx.get(f"{second_network.plc_url}/{did}").status_code == 200
        assert repos_status(target).failure_count == 0
        assert blobs_status(target).failure_count == 0
    finally:
        second_network.stop()
