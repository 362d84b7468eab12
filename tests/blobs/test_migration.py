"""The `atproto/blobs` asset against two reference PDSes on loopback: a full migration verified byte for
byte, a tampered blob, a 429 storm, the old PDS going away, and no credentials anywhere in Dagster."""

import httpx
import pytest
from dagster._serdes import serialize_value

from migration_assets.blobs import store
from migration_assets.blobs.transfer import CHECK_NO_FAILED_BLOBS, CHECK_NOTHING_MISSING
from migration_assets.core.resources import PostgresResource
from tests.blobs.conftest import request_migration, run_partition
from tests.blobs.pds_proxy import PdsProxy

SIZES = [3_000, 70_000, 600_000, 12, 1_200_000, 40_000, 5_000, 9_000, 250_000, 33, 80_000, 1_000]


def stored(migration_id: int) -> store.BlobMigration:
    migration = store.get_migration(PostgresResource().pool(), migration_id)
    assert migration is not None
    return migration


def new_pds_blob(pds_url: str, did: str, cid: str, token: str) -> bytes:
    reply = httpx.get(f"{pds_url}/xrpc/com.atproto.sync.getBlob", params={"did": did, "cid": cid},
                      headers={"Authorization": f"Bearer {token}"}, timeout=60)
    reply.raise_for_status()
    return reply.content


def checks_by_name(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture
def pdses(atproto_network):
    return atproto_network.pdses[0].url, atproto_network.pdses[1].url


def test_full_migration_verified_byte_for_byte(instance, migrated, blob_resources, pdses, target, seeders):
    account = migrated(SIZES)
    migration = request_migration(account, *pdses)
    assert migration.status == "pending_blobs" and migration.has_credentials

    result = run_partition(instance, account.did, blob_resources, migration.id)

    assert result.success
    assert all(checks_by_name(result).values()) and len(checks_by_name(result)) == 3
    after = stored(migration.id)
    assert after.status == "pending_prefs" and not after.has_credentials
    progress = after.progress
    assert (progress.blobs_completed, progress.blobs_total, progress.blob_count) == (len(SIZES),) * 3
    assert progress.bytes_transferred == sum(SIZES)
    assert progress.failed_blobs == [] and progress.blobs_completed_at and progress.estimated_memory_mb
    new_seeder = seeders[1]
    new_seeder.login(account.new)
    for cid, data in account.blobs.items():
        assert new_pds_blob(pdses[1], account.did, cid, account.new.access_jwt) == data
    status = new_seeder.check_account_status(account.new)
    assert status["importedBlobs"] == status["expectedBlobs"] == len(SIZES)
    metadata = result.asset_materializations_for_node("atproto__blobs")[0].metadata
    assert metadata["blobs"].value == f"{len(SIZES)}/{len(SIZES)}"
    assert metadata["bytes_this_run"].value == sum(SIZES)
    assert not list((blob_resources["blob_migration"].transfer_settings().work_dir / account.did / "blobs").iterdir())

    # Run again: nothing is missing, nothing is sent.
    again = request_migration(account, *pdses)
    assert again.id != migration.id and again.progress.bytes_transferred == 0
    rerun = run_partition(instance, account.did, blob_resources, again.id)
    assert rerun.success
    assert rerun.asset_materializations_for_node("atproto__blobs")[0].metadata["blobs_sent_this_run"].value == 0


def test_no_credentials_in_run_config_event_log_or_metadata(instance, migrated, blob_resources, pdses, target):
    account = migrated([1000, 2000])
    secrets = [account.old.password, account.new.password]
    migration = request_migration(account, *pdses)
    row = target.execute("SELECT credentials FROM blob_migrations WHERE id = %s", (migration.id,)).fetchone()
    assert row[0] is not None and not any(s.encode() in bytes(row[0]) for s in secrets)

    result = run_partition(instance, account.did, blob_resources, migration.id)

    assert result.success
    run = instance.get_run_by_id(result.run_id)
    haystack = serialize_value(run.run_config) + serialize_value(run.tags)
    haystack += "".join(serialize_value(record) for record in instance.all_logs(result.run_id))
    haystack += serialize_value(target.execute("SELECT progress_data, error FROM blob_migrations").fetchall())
    assert "blobs_completed" in haystack  # the haystack holds the run's events and progress
    for secret in secrets:
        assert secret not in haystack
    assert target.execute("SELECT credentials FROM blob_migrations WHERE id = %s", (migration.id,)).fetchone()[0] is None


def test_wrong_password_fails_at_once_naming_the_pds_without_the_password(instance, migrated, blob_resources, pdses):
    account = migrated([100])
    account.old.password = "wrong-password-xyz"
    migration = request_migration(account, *pdses)

    result = run_partition(instance, account.did, blob_resources, migration.id)

    assert not result.success
    after = stored(migration.id)
    assert after.status == "failed"
    assert f"the old PDS {pdses[0]} refused the login" in after.error
    assert "ATPROTO_OLD_PASSWORD" in after.error
    logs = "".join(serialize_value(record) for record in instance.all_logs(result.run_id))
    assert "wrong-password-xyz" not in logs and "wrong-password-xyz" not in after.error
    assert logs.count('"STEP_UP_FOR_RETRY"') == 0  # retrying cannot fix a password
    assert not after.has_credentials  # failed for good: the passwords are erased


def test_blob_not_matching_its_cid_is_rejected_and_recorded(instance, migrated, blob_resources, pdses):
    account = migrated([5000, 6000, 7000])
    bad = sorted(account.blobs)[1]
    proxy = PdsProxy(pdses[0])
    proxy.tamper_cids.add(bad)
    try:
        migration = request_migration(account, proxy.url, pdses[1])
        result = run_partition(instance, account.did, blob_resources, migration.id)
    finally:
        proxy.stop()

    assert not result.success
    assert checks_by_name(result)[CHECK_NO_FAILED_BLOBS] is False
    assert checks_by_name(result)[CHECK_NOTHING_MISSING] is False
    after = stored(migration.id)
    assert after.status == "failed" and "is incomplete" in after.error
    assert [f.cid for f in after.progress.failed_blobs] == [bad]
    assert "CidMismatch" in after.progress.failed_blobs[0].reason
    assert after.progress.blobs_completed == 2
    assert after.progress.bytes_transferred == sum(len(d) for c, d in account.blobs.items() if c != bad)
    assert proxy.calls["com.atproto.sync.getBlob"] == 2 + 3  # three tries of the bad blob
    assert not after.has_credentials  # failed for good: a new request brings the passwords again


def test_429_storm_still_completes(instance, migrated, blob_resources, pdses):
    account = migrated([1000 * (i + 1) for i in range(6)])
    old_proxy, new_proxy = PdsProxy(pdses[0]), PdsProxy(pdses[1])
    try:
        migration = request_migration(account, old_proxy.url, new_proxy.url)
        for proxy in (old_proxy, new_proxy):
            proxy.rate_limit_burst = 4  # after login: listing, downloads and uploads see 429s
        result = run_partition(instance, account.did, blob_resources, migration.id)
    finally:
        old_proxy.stop()
        new_proxy.stop()

    assert result.success, stored(migration.id).error
    assert old_proxy.rate_limited == new_proxy.rate_limited == 4
    after = stored(migration.id)
    assert after.status == "pending_prefs" and after.progress.failed_blobs == []
    assert sum(new_proxy.uploads.values()) == len(account.blobs)  # a 429 used up no try and sent nothing twice


def test_old_pds_going_away_fails_after_retries_and_resumes_later(instance, migrated, blob_resources, pdses):
    account = migrated([2000 + i for i in range(8)])
    proxy = PdsProxy(pdses[0])
    calls = {"n": 0}
    original = proxy.client.request

    def drop_after_three_blobs(method, path, **kwargs):
        if "getBlob" in path:
            calls["n"] += 1
            if calls["n"] == 4:
                proxy.close()  # the PDS goes away mid-run
                raise httpx.ConnectError("gone")
        return original(method, path, **kwargs)

    proxy.client.request = drop_after_three_blobs
    try:
        migration = request_migration(account, proxy.url, pdses[1])
        result = run_partition(instance, account.did, blob_resources, migration.id)

        assert not result.success
        failed = stored(migration.id)
        assert failed.status == "failed"
        assert "after 3 retries" not in failed.error  # the stored message is the cause, not Dagster's wrapper
        assert proxy.url.removeprefix("http://") in failed.error and "failed" in failed.error
        assert failed.progress.blobs_completed == 3
        assert not failed.has_credentials  # retries spent: failed for good, the passwords erased
        logs = "".join(serialize_value(record) for record in instance.all_logs(result.run_id))
        assert logs.count('"STEP_UP_FOR_RETRY"') == 3

        proxy.client.request = original
        proxy.start()  # back on the same address
        resumed = request_migration(account, proxy.url, pdses[1])
        assert resumed.progress.blobs_completed == 3  # carried over from the failed request
        assert stored(migration.id).status == "superseded"
        result = run_partition(instance, account.did, blob_resources, resumed.id)
    finally:
        proxy.stop()

    assert result.success, stored(resumed.id).error
    after = stored(resumed.id)
    assert after.status == "pending_prefs"
    assert after.progress.bytes_transferred == sum(len(d) for d in account.blobs.values())
    assert result.asset_materializations_for_node("atproto__blobs")[0].metadata["blobs_sent_this_run"].value == 5


def test_an_oversized_download_is_cut_off_and_recorded(migrated, pdses, tmp_path, target):
    from migration_assets.blobs.transfer import TransferSettings, logged_in_clients, migrate_blobs

    account = migrated([5_000, 50_000])
    big = next(cid for cid, data in account.blobs.items() if len(data) == 50_000)
    settings = TransferSettings(work_dir=tmp_path, max_blob_bytes=10_000, backoff_base_seconds=0.01)
    with logged_in_clients(account.did, *pdses, account.credentials(), None) as (old, new):
        result = migrate_blobs(old, new, account.did, settings, store.ProgressData(), lambda p: None)

    assert [f.cid for f in result.progress.failed_blobs] == [big]
    assert "more than 10000 bytes" in result.progress.failed_blobs[0].reason
    assert result.transferred == 1 and not list((tmp_path / account.did / "blobs").iterdir())


def test_a_malformed_cid_from_list_missing_blobs_fails_that_blob_not_the_account(instance, migrated, blob_resources, pdses):
    account = migrated([3000, 4000, 5000])
    proxy = PdsProxy(pdses[1])
    # U+0000 and a lone surrogate too: PostgreSQL's jsonb can't hold them, and a failed blob's CID is written
    # with its progress
    proxy.extra_missing = [{"cid": "bafy-not/../a-cid", "recordUri": "at://x"}, {"cid": 12345}, "bare", {"cid": "bafy\0"},
                           {"cid": "bafy\ud800"}]
    try:
        migration = request_migration(account, pdses[0], proxy.url)
        result = run_partition(instance, account.did, blob_resources, migration.id)
    finally:
        proxy.stop()

    logs = "".join(serialize_value(record) for record in instance.all_logs(result.run_id))
    assert logs.count('"STEP_UP_FOR_RETRY"') == 0  # the account's step did not fail
    after = stored(migration.id)
    assert {f.cid: f.reason.split(":")[0] for f in after.progress.failed_blobs} == {
        "bafy-not/../a-cid": "malformed CID in listMissingBlobs of the new PDS",
        "12345": "malformed CID in listMissingBlobs of the new PDS",
        "bare": "malformed CID in listMissingBlobs of the new PDS",
        "bafy\ufffd": "malformed CID in listMissingBlobs of the new PDS",
    }
    assert sorted(f.cid for f in after.progress.failed_blobs if f.cid.startswith("bafy\ufffd")) == ["bafy\ufffd"] * 2
    assert sorted(proxy.uploads.values()) == [1, 1, 1]  # every real blob moved
    assert after.progress.bytes_transferred == 12_000
    assert checks_by_name(result)[CHECK_NO_FAILED_BLOBS] is False  # and the account says what failed
    assert after.status == "failed" and "5 blobs failed" in after.error
