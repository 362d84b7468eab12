"""Identities are cached for their TTL, shared by every process through the target database, and
re-resolved only when what was done with them failed: a repo the cached PDS no longer has, or a
signature the cached key does not verify."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from migration_assets.atproto.identity import DidResolutionFailed, IdentityResolver, StoredDocuments
from migration_assets.core.postgres import shared_pool
from migration_assets.repos import ledger
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos.resources import RepoSourceResource
from tests.repos.conftest import handle
from tests.repos.helpers import ledger_row, stored_records

POSTS = "app.bsky.feed.post"


class _NoSuchRepo(BaseHTTPRequestHandler):
    """A PDS the account has left: every getRepo answers RepoNotFound."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"error": "RepoNotFound", "message": "Could not find repo"}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def old_pds():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def stored_document(target, did) -> dict | None:
    row = target.execute("SELECT document FROM did_documents WHERE did = %s", (did,)).fetchone()
    return row[0] if row else None


def run_once(target, target_url, syncer, did) -> dict:
    ledger.request_sync(target, [did], 256)
    report = backfill_buckets(shared_pool(target_url), syncer, [ledger_row(target, did)["bucket"]])
    return {o.did: o.status for o in report.outcomes}


def test_identity_is_cached_across_syncs_and_refreshed_when_the_cached_pds_lost_the_repo(
        pds, target, target_url, atproto_env, old_pds, monkeypatch):
    account = pds.create_account(handle())
    pds.create_records(account, POSTS, [{"$type": POSTS, "text": f"p{n}", "createdAt": "2026-12-01T00:00:00Z"}
                                        for n in range(3)])
    source = RepoSourceResource()
    clients = source.clients(target_url)
    syncer = source.syncer(shared_pool(target_url), clients)
    fetched, fetch = [], syncer.resolver._resolve_uncached  # the real resolution, counted
    monkeypatch.setattr(syncer.resolver, "_resolve_uncached", lambda did: fetched.append(did) or fetch(did))
    try:
        assert run_once(target, target_url, syncer, account.did) == {account.did: "synced"}
        assert run_once(target, target_url, syncer, account.did) == {account.did: "synced"}
        assert fetched == [account.did], "the second sync resolved the DID again instead of using the cache"

        # The cached document, here and as stored for every process, now names a PDS the account has
        # left: the repo is not found there, the identity is resolved afresh (and stored so), and the
        # repo syncs from where it lives, not marked deleted.
        live = syncer.resolver.resolve(account.did)
        stale = live.model_copy(update={"pds_endpoint": old_pds})
        syncer.resolver._cache[account.did] = (float("inf"), stale)
        StoredDocuments(shared_pool(target_url)).save(account.did, stale)
        assert run_once(target, target_url, syncer, account.did) == {account.did: "synced"}
        assert fetched == [account.did, account.did]
        assert ledger_row(target, account.did)["pds"] == pds.pds.url
        assert len(stored_records(target, account.did)) == 3
        assert stored_document(target, account.did)["pds_endpoint"] == pds.pds.url
    finally:
        clients.close()


DEAD_PLC = "http://127.0.0.1:9"  # nothing listens: a resolver that asks it fails


def test_documents_are_shared_by_every_process_while_their_ttl_lasts(pds, target, target_url, atproto_env):
    account = pds.create_account(handle())
    store = StoredDocuments(shared_pool(target_url))
    first = RepoSourceResource().resolver(pool=shared_pool(target_url))
    document = first.resolve(account.did)
    assert stored_document(target, account.did)["signing_key"] == document.signing_key

    # Another process (a follower after the backfill, the next follower run) does not ask the PLC.
    assert IdentityResolver(DEAD_PLC, store=store, retries=0).resolve(account.did) == document

    # Past the TTL, a document is resolved again.
    target.execute("UPDATE did_documents SET resolved_at = now() - interval '2 hours'")
    with pytest.raises(DidResolutionFailed):
        IdentityResolver(DEAD_PLC, store=store, retries=0, ttl_seconds=3600).resolve(account.did)

    # An invalidation (an #identity event, a signature that failed) reaches every process.
    first.resolve(account.did, fresh=True)
    assert IdentityResolver(DEAD_PLC, store=store, retries=0).load([account.did]) == {account.did: document}
    first.invalidate(account.did)
    assert stored_document(target, account.did) is None
    with pytest.raises(DidResolutionFailed):
        IdentityResolver(DEAD_PLC, store=store, retries=0).resolve(account.did)


def test_a_did_the_store_just_lacked_is_fetched_without_asking_the_store_again(pds, target, target_url, atproto_env):
    # A backfill loads a claimed batch's documents in one query, a follower a stream batch's: the DIDs
    # missing there are resolved at the PLC next, without one more query each.
    account = pds.create_account(handle())
    resolver = RepoSourceResource().resolver(pool=shared_pool(target_url))
    asked, load = [], resolver.store.load
    resolver.store.load = lambda dids, max_age: asked.append(list(dids)) or load(dids, max_age)
    assert resolver.load([account.did]) == {}
    document = resolver.resolve(account.did)
    assert asked == [[account.did]]
    assert stored_document(target, account.did)["signing_key"] == document.signing_key


def test_a_backfill_stores_a_fetched_document_with_the_repo_it_synced_and_not_for_a_repo_that_failed(
        pds, target, target_url, atproto_env):
    # The document is written in the repo's own transaction (no transaction of its own per repo). A repo
    # that failed stores none; its retry in the same process, served from the process's cache, does.
    account = pds.create_account(handle())
    pds.create_records(account, POSTS, [{"$type": POSTS, "text": "p", "createdAt": "2026-12-01T00:00:00Z"}])
    source = RepoSourceResource(max_car_bytes=64)  # the export is bigger: it fails the repo
    clients = source.clients(target_url)
    syncer = source.syncer(shared_pool(target_url), clients)
    fetched, fetch = [], syncer.resolver._resolve_uncached
    syncer.resolver._resolve_uncached = lambda did: fetched.append(did) or fetch(did)
    try:
        assert run_once(target, target_url, syncer, account.did) == {account.did: "retry"}
        assert fetched == [account.did]
        assert stored_document(target, account.did) is None, "a repo that failed stored its document"

        syncer.settings = syncer.settings.model_copy(update={"max_car_bytes": 512 * 1024 * 1024})
        assert run_once(target, target_url, syncer, account.did) == {account.did: "synced"}
        assert fetched == [account.did], "the retry fetched the document again instead of using the cache"
        assert stored_document(target, account.did)["signing_key"] == syncer.resolver.cached(account.did).signing_key
        resolved, synced = target.execute("SELECT d.resolved_at, r.synced_at FROM did_documents d JOIN repos r"
                                          " USING (did) WHERE did = %s", (account.did,)).fetchone()
        assert resolved < synced, "stored as resolved when the repo was stored, not when it was fetched (its age)"
        assert syncer.resolver._unsaved == {}
    finally:
        clients.close()
