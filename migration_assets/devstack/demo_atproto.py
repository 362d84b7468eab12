"""The demo's AT Protocol side: a PLC directory and two reference PDSes on loopback, accounts with
records on the first (repo backfill) and accounts moved to the second with their blobs left behind,
each with a queued blob-migration request (blob migration)."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

from cryptography.fernet import Fernet
from pydantic import SecretStr

from migration_assets.blobs import store as blob_store
from migration_assets.blobs.credentials import AccountCredentials
from migration_assets.core.resources import PostgresResource
from migration_assets.core.settings import data_dir
from migration_assets.devstack.atproto import AtprotoNetwork, PdsSeeder, migrate_account, start_atproto_network

DEMO_FILE = "atproto-demo.json"  # what the demo seeded (DIDs and URLs, no passwords), for tests
POSTS = "app.bsky.feed.post"


def start_network() -> AtprotoNetwork:
    network = start_atproto_network(2, blob_upload_limit=50_000_000, log_path=data_dir() / "atproto.log")
    os.environ.update(network.environment())
    os.environ["REPO_DISCOVERY_HOSTS"] = network.pdses[0].url
    # The demo's own key for stored PDS passwords; a deployment sets MIGRATION_SECRET_KEY itself.
    os.environ.setdefault("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())
    return network


def forget_previous_demo(postgres: PostgresResource) -> None:
    """The PLC directory lives in memory: accounts of an earlier demo no longer resolve, so their
    ledger rows and requests would only fail. Only the embedded demo database is cleared."""
    if os.environ.get("MIGRATION_DATABASE_URL"):
        return
    with postgres.connection() as conn:
        conn.execute("TRUNCATE repos, records, repo_collection_counts, blob_migrations")


def seed_repos(seeder: PdsSeeder, accounts: int, records: int) -> list[str]:
    def one(n: int) -> str:
        account = seeder.create_account(f"demo{n}.test")
        seeder.create_records(account, POSTS, [
            {"$type": POSTS, "text": f"post {i} of demo{n}", "createdAt": "2026-11-23T12:00:00.000Z"}
            for i in range(records)
        ])
        return account.did

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(accounts)))


def seed_blob_migrations(old: PdsSeeder, new: PdsSeeder, accounts: int, postgres: PostgresResource) -> list[str]:
    """Accounts moved to the new PDS (repo imported, blobs not), each with a queued request."""
    def one(n: int) -> str:
        account = old.create_account(f"mover{n}.test")
        for size in (200_000, 1_500_000, 3_000_000):
            old.create_record_with_blob(account, os.urandom(size))
        moved = migrate_account(old, new, account, account.password)
        request = blob_store.MigrationRequest(did=moved.did, old_pds=old.pds.url, new_pds=new.pds.url)
        password = SecretStr(account.password)
        blob_store.create_request(postgres.pool(), request, AccountCredentials(old_password=password, new_password=password))
        return moved.did

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(accounts)))


def seed(network: AtprotoNetwork, repo_accounts: int, blob_accounts: int) -> dict:
    postgres = PostgresResource()
    forget_previous_demo(postgres)
    with PdsSeeder(network.pdses[0]) as old, PdsSeeder(network.pdses[1]) as new:
        repos = seed_repos(old, repo_accounts, 50)
        movers = seed_blob_migrations(old, new, blob_accounts, postgres)
    summary = {"plc": network.plc_url, "pdses": [p.url for p in network.pdses], "repo_dids": repos,
               "blob_migration_dids": movers}
    (data_dir() / DEMO_FILE).write_text(json.dumps(summary, indent=2))
    return summary
