"""A local AT Protocol network (PLC + two reference PDSes) shared by the blob tests, accounts with
blobs migrated the real way (service auth, createAccount with the DID, importRepo), and helpers."""

import itertools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest
from cryptography.fernet import Fernet

from migration_assets.blobs import store
from migration_assets.blobs.assets import REQUEST_TAG, accounts, build_blobs_asset
from migration_assets.blobs.credentials import AccountCredentials
from migration_assets.blobs.resources import BlobMigrationResource
from migration_assets.core.postgres import shared_pool
from migration_assets.core.resources import PostgresResource
from migration_assets.devstack.atproto import (
    Account, AtprotoNetwork, PdsSeeder, migrate_account, start_atproto_network,
)

_handles = itertools.count()


@pytest.fixture(scope="session")
def atproto_network(tmp_path_factory) -> Iterator[AtprotoNetwork]:
    network = start_atproto_network(2, log_path=tmp_path_factory.mktemp("atproto") / "network.log")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in network.environment().items():
            mp.setenv(name, value)
        yield network
    network.stop()


@pytest.fixture(autouse=True)
def secret_key(monkeypatch) -> str:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("MIGRATION_SECRET_KEY", key)
    return key


# The production asset with waits short enough for tests: Dagster retries a failed account 3 times.
FAST_RETRY_BLOBS = build_blobs_asset(job_retries=3, job_retry_delay_seconds=0.05)


@pytest.fixture(scope="session")
def seeders(atproto_network) -> Iterator[tuple[PdsSeeder, PdsSeeder]]:
    old, new = PdsSeeder(atproto_network.pdses[0]), PdsSeeder(atproto_network.pdses[1])
    yield old, new
    old.close()
    new.close()


@dataclass
class MigratedAccount:
    old: Account  # on the old PDS, still active there
    new: Account  # on the new PDS: repo imported, blobs missing
    blobs: dict[str, bytes]  # cid -> bytes

    @property
    def did(self) -> str:
        return self.old.did

    def credentials(self) -> AccountCredentials:
        return AccountCredentials(old_password=self.old.password, new_password=self.new.password)


def make_migrated_account(seeders, sizes: list[int]) -> MigratedAccount:
    old_seeder, new_seeder = seeders
    tag = f"{next(_handles)}{uuid.uuid4().hex[:6]}"
    account = old_seeder.create_account(f"b{tag}.test", password=f"old-secret-{uuid.uuid4().hex}")
    blobs = {}
    for index, size in enumerate(sizes):
        data = os.urandom(size)
        _, ref = old_seeder.create_record_with_blob(account, data, "image/jpeg" if index % 2 else "application/octet-stream")
        blobs[ref["ref"]["$link"]] = data
    moved = migrate_account(old_seeder, new_seeder, account, f"new-secret-{uuid.uuid4().hex}")
    return MigratedAccount(account, moved, blobs)


@pytest.fixture
def migrated(seeders):
    """Factory: an account with blobs of the given sizes, migrated to the new PDS without them."""
    return lambda sizes: make_migrated_account(seeders, sizes)


@pytest.fixture
def blob_resources(tmp_path, target_url) -> dict:
    """Fast retries so fault tests stay short; the schedule itself is unit-tested."""
    return {
        "postgres": PostgresResource(),
        "blob_migration": BlobMigrationResource(work_dir=str(tmp_path / "staging"), backoff_base_seconds=0.05),
    }


def request_migration(account: MigratedAccount, old_pds: str, new_pds: str, origin: store.Origin = "queue"):
    pool = shared_pool(PostgresResource().resolved_url())
    request = store.MigrationRequest(did=account.did, old_pds=old_pds, new_pds=new_pds)
    return store.create_request(pool, request, account.credentials(), origin=origin)


def run_partition(
    instance: dg.DagsterInstance, did: str, resources: dict, migration_id: int | None
) -> dg.ExecuteInProcessResult:
    """A run of the account's partition; without a migration id it is a run started from the UI."""
    if not instance.has_dynamic_partition(accounts.name, did):
        instance.add_dynamic_partitions(accounts.name, [did])
    return dg.materialize(
        [FAST_RETRY_BLOBS], partition_key=did, instance=instance, resources=resources, raise_on_error=False,
        tags={REQUEST_TAG: str(migration_id)} if migration_id is not None else None,
    )


