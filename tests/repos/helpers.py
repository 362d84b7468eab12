"""Running the repo assets in-process against the test instance, and reading what they stored."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import httpx
import psycopg

from migration_assets.core.postgres import shared_pool
from migration_assets.core.resources import PostgresResource
from migration_assets.repos.assets import REPOS, repo_ledger, repos
from migration_assets.repos.buckets import bucket_key
from migration_assets.repos.follow import Follower
from migration_assets.repos.resources import RepoSourceResource


def resources(**source) -> dict:
    return {"postgres": PostgresResource(), "repo_source": RepoSourceResource(**source)}


@contextmanager
def follower_of(target_url: str, host: str, verify_signatures: bool = True, **options) -> Iterator[Follower]:
    """A follower of `host` storing into the target, as the follow run builds it (`verify_signatures`
    False: as `repos follow --no-verify`); its clients are closed when the block ends."""
    source = RepoSourceResource(verify_signatures=verify_signatures)
    pool = shared_pool(target_url)
    clients = source.clients(target_url)
    try:
        yield Follower(pool, host, source.syncer(pool, clients), buckets=source.settings.buckets, **options)
    finally:
        clients.close()


def discover(instance, hosts=(), dids=(), **source) -> dg.ExecuteInProcessResult:
    config = {"ops": {"atproto__repo_ledger": {"config": {"hosts": list(hosts), "dids": list(dids)}}}}
    return dg.materialize([repo_ledger], instance=instance, resources=resources(**source), run_config=config)


def bucket_of_did(conn: psycopg.Connection, did: str) -> str:
    return bucket_key(conn.execute("SELECT bucket FROM repos WHERE did = %s", (did,)).fetchone()[0])


def run_bucket(instance, key: str, raise_on_error: bool = True, **source) -> dg.ExecuteInProcessResult:
    return dg.materialize([repos], partition_key=key, instance=instance, resources=resources(**source),
                          raise_on_error=raise_on_error)


def sync_dids(instance, conn, dids: list[str], **source) -> dict[str, dg.ExecuteInProcessResult]:
    """Make the DIDs due and run each of their buckets once."""
    discover(instance, dids=dids, **source)
    keys = sorted({bucket_of_did(conn, did) for did in dids})
    return {key: run_bucket(instance, key, **source) for key in keys}


def ledger_row(conn: psycopg.Connection, did: str) -> dict:
    cur = conn.execute("SELECT * FROM repos WHERE did = %s", (did,))
    names = [c.name for c in cur.description]
    row = cur.fetchone()
    return dict(zip(names, row)) if row else {}


def stored_records(conn: psycopg.Connection, did: str) -> dict[tuple[str, str], tuple[str, dict]]:
    rows = conn.execute("SELECT collection, rkey, cid, record FROM records WHERE did = %s", (did,)).fetchall()
    return {(c, r): (cid, record) for c, r, cid, record in rows}


def listed_records(pds_url: str, did: str, collection: str) -> dict[tuple[str, str], tuple[str, dict]]:
    """What the PDS itself says (com.atproto.repo.listRecords), to compare against what was stored."""
    out, cursor = {}, None
    while True:
        params = {"repo": did, "collection": collection, "limit": 100} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(f"{pds_url}/xrpc/com.atproto.repo.listRecords", params=params, timeout=30).json()
        for item in page["records"]:
            out[(collection, item["uri"].rsplit("/", 1)[1])] = (item["cid"], item["value"])
        cursor = page.get("cursor")
        if not cursor or not page["records"]:
            return out


def check_evaluations(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    for event in result.all_events:
        if event.is_step_materialization and event.asset_key == REPOS:
            return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    raise AssertionError("no materialization of atproto/repos")
