"""One run per account at a time (two runs of one DID against real PDSes), credentials that are
erased once they can no longer be used, and key rotation with `migration-assets secrets rotate`."""

import threading
import time

import dagster as dg
import pytest
from cryptography.fernet import Fernet

from migration_assets import cli
from migration_assets.blobs import credentials, store
from migration_assets.blobs.assets import SKIPPED
from migration_assets.blobs.credentials import AccountCredentials, CredentialsError
from migration_assets.core.resources import PostgresResource
from tests.blobs.conftest import request_migration, run_partition
from tests.blobs.pds_proxy import PdsProxy


def stored(migration_id: int) -> store.BlobMigration:
    migration = store.get_migration(PostgresResource().pool(), migration_id)
    assert migration is not None
    return migration


def materializations(result: dg.ExecuteInProcessResult) -> list:
    return [e for e in result.all_events if e.is_step_materialization]


def observations(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.asset_observation_data.asset_observation.metadata[SKIPPED].value
            for e in result.all_events if e.is_asset_observation]


def test_a_second_run_of_the_account_leaves_the_first_one_alone(instance, migrated, blob_resources, atproto_network, seeders):
    account = migrated([20_000 + i for i in range(6)])
    old_proxy, new_proxy = PdsProxy(atproto_network.pdses[0].url), PdsProxy(atproto_network.pdses[1].url)
    release = threading.Event()
    old_proxy.hold_first_blob = release  # the first run stalls half way through its first download
    staging = blob_resources["blob_migration"].transfer_settings().work_dir / account.did / "blobs"
    first: dict = {}
    migration = request_migration(account, old_proxy.url, new_proxy.url)
    sensor_run = threading.Thread(
        target=lambda: first.update(result=run_partition(instance, account.did, blob_resources, migration.id)))
    try:
        sensor_run.start()
        assert old_proxy.stalling.wait(120), "the first run did not start downloading"
        deadline = time.monotonic() + 60
        while not (staging.is_dir() and any(staging.iterdir())):  # the download's file is being opened
            assert time.monotonic() < deadline, "the first run staged nothing"
            time.sleep(0.01)
        staged = sorted(staging.iterdir())
        assert len(staged) == 1  # the first run's blob in flight
        holder_run, _ = store.holder(PostgresResource().pool(), migration.id)

        second = run_partition(instance, account.did, blob_resources, None)  # a manual run from the UI

        assert second.success  # a clean exit, not a failure
        assert materializations(second) == [] and second.get_asset_check_evaluations() == []
        [note] = observations(second)
        assert f"{migration.describe()} is being moved by run {holder_run}" in note
        assert sorted(staging.iterdir()) == staged  # the first run's file is untouched
        during = stored(migration.id)
        assert (during.status, during.has_credentials, during.error) == ("pending_blobs", True, None)

    finally:
        release.set()
        sensor_run.join(300)
        old_proxy.stop()
        new_proxy.stop()

    result = first["result"]
    assert result.run_id == holder_run
    assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
    assert len(result.get_asset_check_evaluations()) == 3
    after = stored(migration.id)
    assert after.status == "pending_prefs" and after.progress.failed_blobs == [] and not after.has_credentials
    assert sorted(new_proxy.uploads.values()) == [1] * 6  # every blob once, by the first run alone
    assert seeders[1].list_missing_blobs(seeders[1].login(account.new)) == []
    assert not list(staging.iterdir())


def test_credentials_are_erased_when_retries_are_spent(instance, migrated, blob_resources, atproto_network, target):
    account = migrated([1000])
    proxy = PdsProxy(atproto_network.pdses[0].url)
    proxy.close()  # the old PDS is down for every try
    try:
        migration = request_migration(account, proxy.url, atproto_network.pdses[1].url)
        result = run_partition(instance, account.did, blob_resources, migration.id)
    finally:
        proxy.stop()

    assert not result.success
    logs = [e.event_type_value for e in result.all_events]
    assert logs.count("STEP_UP_FOR_RETRY") == 3
    row = target.execute("SELECT status, credentials, claim_token FROM blob_migrations WHERE id = %s",
                         (migration.id,)).fetchone()
    assert row == ("failed", None, None)  # failed for good: no passwords kept, no lease left


def request(did: str, password: str = "o") -> store.BlobMigration:
    return store.create_request(
        PostgresResource().pool(),
        store.MigrationRequest(did=did, old_pds="https://a.example", new_pds="https://b.example"),
        AccountCredentials(old_password=password, new_password=password + "-new"),
    )


def test_rotate_re_encrypts_every_stored_credential_with_the_newest_key(monkeypatch, target, capsys):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("MIGRATION_SECRET_KEY", old_key)
    kept = request("did:plc:" + "a" * 24, "first-secret")
    done = request("did:plc:" + "b" * 24)
    target.execute("UPDATE blob_migrations SET status = 'pending_prefs', credentials = NULL WHERE id = %s",
                   (done.id,))  # completed: nothing to rotate

    monkeypatch.setenv("MIGRATION_SECRET_KEY", f"{new_key},{old_key}")
    assert credentials.decrypt(stored_token(kept.id), "m").old_password.get_secret_value() == "first-secret"
    assert cli.main(["secrets", "rotate"]) == 0
    out = capsys.readouterr().out
    assert "re-encrypted 1 stored credentials" in out and old_key not in out and new_key not in out

    monkeypatch.setenv("MIGRATION_SECRET_KEY", new_key)  # the old key is gone
    back = credentials.decrypt(stored_token(kept.id), "m")
    assert (back.old_password.get_secret_value(), back.new_password.get_secret_value()) == (
        "first-secret", "first-secret-new")


def test_rotate_names_a_migration_no_key_decrypts_and_rotates_the_others(monkeypatch, target, capsys):
    lost_key, key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("MIGRATION_SECRET_KEY", lost_key)
    orphan = request("did:plc:" + "c" * 24)
    monkeypatch.setenv("MIGRATION_SECRET_KEY", key)
    fine = request("did:plc:" + "d" * 24)
    monkeypatch.setenv("MIGRATION_SECRET_KEY", f"{Fernet.generate_key().decode()},{key}")

    assert cli.main(["secrets", "rotate"]) == 1
    out = capsys.readouterr().out
    assert "re-encrypted 1 stored credentials" in out
    assert f"the credentials of {orphan.describe()} decrypt with none of the keys in MIGRATION_SECRET_KEY" in out
    assert "add the key that stored them" in out and "request the migration again" in out
    with pytest.raises(CredentialsError):
        credentials.decrypt(stored_token(orphan.id), "m")
    assert credentials.decrypt(stored_token(fine.id), "m").old_password.get_secret_value() == "o"


def stored_token(migration_id: int) -> bytes | None:
    return store.credentials_token(PostgresResource().pool(), migration_id)


def test_a_run_without_the_key_that_stored_the_credentials_keeps_the_request(instance, blob_resources, monkeypatch, target):
    migration = request("did:plc:" + "e" * 24, "kept-secret")
    monkeypatch.setenv("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())  # the deployment lost the key

    result = run_partition(instance, migration.did, blob_resources, migration.id)

    assert not result.success
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 0
    after = stored(migration.id)
    assert (after.status, after.has_credentials) == ("pending_blobs", True)  # fix the key and run again
    assert f"the credentials of {migration.describe()} decrypt with none of the keys" in after.error
    assert target.execute("SELECT claim_token FROM blob_migrations WHERE id = %s", (migration.id,)).fetchone() == (None,)
