"""The request sensor: new queued rows become account partitions and exactly one run request each."""

import uuid

import dagster as dg
import pytest

from migration_assets.blobs import store
from migration_assets.blobs.assets import BLOB_POOL, BLOBS, REQUEST_TAG, accounts, blobs
from migration_assets.blobs.credentials import AccountCredentials
from migration_assets.blobs.sensors import blob_migration_requests
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
    assert blobs.op.pool == BLOB_POOL == "atproto_blobs"  # the pool (limit 15, run granularity) queues the 16th
    [added] = first.dynamic_partitions_requests
    assert added.partitions_def_name == accounts.name and sorted(added.partition_keys) == sorted(dids)
    assert first.cursor == str(max(m.id for m in made))

    second = evaluate(instance, first.cursor)  # nothing new: nothing requested again
    assert second.run_requests == [] and second.dynamic_partitions_requests == []

    instance.add_dynamic_partitions(accounts.name, dids[:1])
    for did in dids[:1]:  # a failed migration requested again is a new request, hence a new run
        target.execute("UPDATE blob_migrations SET status = 'failed' WHERE did = %s", (did,))
    again = request(dids[0])
    third = evaluate(instance, second.cursor)
    assert [r.tags[REQUEST_TAG] for r in third.run_requests] == [str(again.id)]
    assert third.dynamic_partitions_requests == []  # the account's partition exists already


def test_a_second_pending_request_for_the_account_is_refused(target):
    did = random_did()
    request(did)
    with pytest.raises(store.RequestError, match="already has a pending blob migration .* from https://old.example"):
        store.create_request(
            PostgresResource().pool(),
            store.MigrationRequest(did=did, old_pds="https://other.example", new_pds="https://new.example"),
            AccountCredentials(old_password="o", new_password="n"),
        )
    with pytest.raises(store.RequestError, match="started by the queue"):
        request(did, origin="cli")
