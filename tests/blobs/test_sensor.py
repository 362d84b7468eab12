"""The request sensor: new queued rows become account partitions and exactly one run request each."""

import uuid

import dagster as dg
import pytest

from migration_assets.blobs import store
from migration_assets.blobs.assets import BLOBS, REQUEST_TAG, accounts, blobs
from migration_assets.blobs.credentials import AccountCredentials
from migration_assets.blobs.sensors import blob_migration_requests
from migration_assets.core.pools import project_pool_limits
from migration_assets.core.resources import PostgresResource


def random_did() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    raw = uuid.uuid4().int
    return "did:plc:" + "".join(alphabet[(raw >> (5 * i)) & 31] for i in range(24))


def request(did: str, origin: store.Origin = "queue") -> store.BlobMigration:
    return store.create_request(
        PostgresResource().pool(),
        store.MigrationRequest(did=did, old_pds="https://old.example", new_pds="https://new.example"),
        AccountCredentials(old_password="o", new_password="n"), origin=origin,
    )


def evaluate(instance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"postgres": PostgresResource()})
    return blob_migration_requests(context)


def test_sixteen_requests_make_sixteen_runs_in_the_blob_pool_once(instance, monkeypatch, target):
    dids = [random_did() for _ in range(16)]
    made = [request(did) for did in dids]
    request(random_did(), origin="cli")  # the CLI runs its own request: no run from the sensor

    first = evaluate(instance, None)

    assert len(first.run_requests) == 16
    assert {r.partition_key for r in first.run_requests} == set(dids)
    assert len({r.run_key for r in first.run_requests}) == 16
    assert {r.tags[REQUEST_TAG] for r in first.run_requests} == {str(m.id) for m in made}
    assert all(r.asset_selection == [BLOBS] for r in first.run_requests)
    assert project_pool_limits()[blobs.op.pool] == 15  # the pool's limit queues the 16th run
    [added] = first.dynamic_partitions_requests
    assert added.partitions_def_name == accounts.name and sorted(added.partition_keys) == sorted(dids)
    assert first.cursor == str(max(m.id for m in made))

    second = evaluate(instance, first.cursor)  # nothing new: nothing requested again
    assert second.run_requests == [] and second.dynamic_partitions_requests == []

    instance.add_dynamic_partitions(accounts.name, dids[:1])
    # A failed migration requested again is a new request, hence a new run.
    target.execute("UPDATE blob_migrations SET status = 'failed' WHERE id = %s", (made[0].id,))
    again = request(dids[0])
    third = evaluate(instance, second.cursor)
    assert [r.tags[REQUEST_TAG] for r in third.run_requests] == [str(again.id)]
    assert third.dynamic_partitions_requests == []  # the account's partition exists already


def rows_of(target, did: str) -> list[tuple]:
    return target.execute(
        "SELECT id, status, credentials IS NOT NULL, error FROM blob_migrations WHERE did = %s ORDER BY id", (did,)
    ).fetchall()


def test_a_request_asked_again_supersedes_the_open_or_failed_one_and_erases_its_credentials(target):
    did = random_did()
    first = request(did)
    assert request(did).id == first.id  # the same request again (a killed run's): resumed in place

    elsewhere = store.create_request(
        PostgresResource().pool(),
        store.MigrationRequest(did=did, old_pds="https://other.example", new_pds="https://new.example"),
        AccountCredentials(old_password="o", new_password="n"),
    )
    target.execute("UPDATE blob_migrations SET status = 'failed' WHERE id = %s", (elsewhere.id,))
    from_cli = request(did, origin="cli")

    assert rows_of(target, did) == [
        (first.id, "superseded", False, f"superseded by blob migration {elsewhere.id}"),
        (elsewhere.id, "superseded", False, f"superseded by blob migration {from_cli.id}"),
        (from_cli.id, "pending_blobs", True, None),
    ]


def test_an_open_request_a_live_run_holds_is_not_superseded(target):
    did = random_did()
    held = request(did)
    lease = store.account_lease(60)
    assert store.claim(PostgresResource().pool(), lease, held.id, "run-abc")

    with pytest.raises(store.RequestError, match="a run is moving its blobs now: follow that run"):
        request(did, origin="cli")
    assert rows_of(target, did) == [(held.id, "pending_blobs", True, None)]
    assert store.holder(PostgresResource().pool(), held.id)[0] == "run-abc"


def test_a_run_whose_lease_was_taken_over_writes_nothing(target):
    pool = PostgresResource().pool()
    migration = request(random_did())
    stalled, taker = store.account_lease(60), store.account_lease(60)
    assert store.claim(pool, stalled, migration.id, "run-stalled")
    assert not store.claim(pool, taker, migration.id, "run-taker")  # held: a second run backs off
    target.execute("UPDATE blob_migrations SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                   (migration.id,))  # the stalled run missed its heartbeats
    assert store.claim(pool, taker, migration.id, "run-taker")

    assert not store.write_progress(pool, stalled, migration.id, store.ProgressData(blobs_completed=99))
    assert not store.mark_failed(pool, stalled, migration.id, "late")
    after = store.get_migration(pool, migration.id)
    assert (after.status, after.has_credentials, after.progress.blobs_completed) == ("pending_blobs", True, 0)
    assert store.mark_completed(pool, taker, migration.id, store.ProgressData(blobs_completed=3))
