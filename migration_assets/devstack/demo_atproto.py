"""The demo's AT Protocol side: a PLC directory and two reference PDSes on loopback, accounts with
records on the first (repo backfill) and accounts moved to the second with their blobs left behind,
each with a queued blob-migration request (blob migration)."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

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
    os.environ["REPO_DISCOVERY_HOSTS"] = network.pdses[0].url  # and followed (REPO_FOLLOW_HOSTS unset)
    # Follow runs of 10 minutes, so the demo shows one end and the repo_follow sensor start the next.
    os.environ.setdefault("REPO_FOLLOW_RUN_SECONDS", "600")
    # The demo's own key for stored PDS passwords; a deployment sets MIGRATION_SECRET_KEY itself.
    os.environ.setdefault("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())
    return network


def forget_previous_network(postgres: PostgresResource) -> str:
    """Delete what the previous demo start's AT Protocol network left in the target database.

    Its PLC directory lived in memory and its PDSes held throwaway accounts: none of its DIDs resolve
    again, so their ledger rows, records and blob migrations would only fail, and its hosts' rate-limit
    rows are of hosts that are gone. Only rows of that network's DIDs and hosts (from DEMO_FILE) are
    deleted, so a database shared with other work keeps the rest. Dagster's run history stays."""
    path = data_dir() / DEMO_FILE
    if not path.exists():
        return "no previous demo network to forget"
    previous = json.loads(path.read_text())
    dids = [*previous.get("repo_dids", []), *previous.get("blob_migration_dids", [])]
    urls = [previous["plc"], *previous["pdses"]]
    with postgres.connection() as conn, conn.transaction():
        repos = conn.execute(
            """WITH gone AS (DELETE FROM repos WHERE did = ANY(%(dids)s) OR pds = ANY(%(urls)s) RETURNING did),
                    records AS (DELETE FROM records WHERE did IN (SELECT did FROM gone) OR did = ANY(%(dids)s)),
                    counts AS (DELETE FROM repo_collection_counts
                               WHERE did IN (SELECT did FROM gone) OR did = ANY(%(dids)s))
               SELECT count(*) FROM gone""", {"dids": dids, "urls": urls}).fetchone()[0]
        blobs = conn.execute(
            "DELETE FROM blob_migrations WHERE did = ANY(%s) OR old_pds = ANY(%s) OR new_pds = ANY(%s)",
            (dids, urls, urls)).rowcount
        hosts = conn.execute("DELETE FROM atproto_rate_limits WHERE host = ANY(%s)",
                             ([urlsplit(url).netloc for url in urls],)).rowcount
    return (f"previous demo network forgotten (its PLC directory lived in memory): {repos} repos, "
            f"{blobs} blob migrations and {hosts} rate-limit hosts of its accounts deleted")


def _write_summary(summary: dict) -> None:
    (data_dir() / DEMO_FILE).write_text(json.dumps(summary, indent=2))


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


def seed_blob_migrations(
    old: PdsSeeder, new: PdsSeeder, accounts: int, postgres: PostgresResource, *,
    blob_sizes: tuple[int, ...] = (200_000, 1_500_000, 3_000_000), old_pds_url: str | None = None,
) -> list[str]:
    """Accounts moved to the new PDS (repo imported, blobs not), each with a queued request. The
    requests name `old_pds_url` as the old PDS when given (a test's proxy in front of it)."""
    def one(n: int) -> str:
        account = old.create_account(f"mover{n}.test")
        for size in blob_sizes:
            old.create_record_with_blob(account, os.urandom(size))
        moved = migrate_account(old, new, account, account.password)
        request = blob_store.MigrationRequest(did=moved.did, old_pds=old_pds_url or old.pds.url, new_pds=new.pds.url)
        password = SecretStr(account.password)
        blob_store.create_request(postgres.pool(), request, AccountCredentials(old_password=password, new_password=password))
        return moved.did

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(accounts)))


def seed(network: AtprotoNetwork, repo_accounts: int, blob_accounts: int) -> dict:
    """Forget the previous start's network, then seed this one; the summary names what was forgotten."""
    postgres = PostgresResource()
    forgotten = forget_previous_network(postgres)
    summary = {"plc": network.plc_url, "pdses": [p.url for p in network.pdses], "repo_dids": [],
               "blob_migration_dids": []}
    _write_summary(summary)  # first: if seeding dies half-way, the next start still finds these hosts
    with PdsSeeder(network.pdses[0]) as old, PdsSeeder(network.pdses[1]) as new:
        summary["repo_dids"] = seed_repos(old, repo_accounts, 50)
        summary["blob_migration_dids"] = seed_blob_migrations(old, new, blob_accounts, postgres)
    _write_summary(summary)
    return {**summary, "forgotten": forgotten}
