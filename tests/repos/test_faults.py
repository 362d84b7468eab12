"""Repo backfill when hosts misbehave: rate limits, corrupt CARs, a signing key that doesn't match.

The PDS is reached through a loopback proxy: a proxy in front of the PLC directory rewrites each DID
document so its PDS endpoint is the PDS proxy (and, for one test, its signing key is another key)."""

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.atproto.xrpc import host_key
from migration_assets.atproto.signature import PublicKey
from migration_assets.core.postgres import shared_pool
from migration_assets.repos import ledger
from migration_assets.repos.backfill import backfill_buckets
from migration_assets.repos.resources import HostClients, RepoSourceResource
from migration_assets.repos.settings import RepoSettings
from tests.repos.conftest import handle
from tests.repos.helpers import ledger_row, metadata, stored_records, sync_dids
from tests.ending import ends_within
from tests.repos.pds_proxy import Reply, http_proxy

POSTS = "app.bsky.feed.post"


def post(n: int) -> dict:
    return {"$type": POSTS, "text": f"post {n}", "createdAt": "2026-11-23T10:00:00.000Z"}


@contextmanager
def routed(network, pds_intercept=None, pds_rewrite=None, signing_key: str | None = None,
           only: set[str] | None = None) -> Iterator[tuple]:
    """(PLC proxy, PDS proxy): DID documents from the PLC proxy point at the PDS proxy (`only` these
    DIDs' documents, if given). The documents stored by earlier syncs are forgotten, as if their TTL
    had run out, so the proxy's are used."""
    with psycopg.connect(os.environ["MIGRATION_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("DELETE FROM did_documents")
    real_pds = network.pdses[0].url
    with http_proxy(real_pds, pds_intercept, pds_rewrite) as pds_proxy:
        def rewrite_document(method: str, path: str, reply: Reply) -> Reply:
            if reply.status != 200 or (only is not None and unquote(path).strip("/") not in only):
                return reply
            text = reply.body.decode().replace(real_pds, pds_proxy.url)
            if signing_key:
                document = json.loads(text)
                for vm in document["verificationMethod"]:
                    vm.update(type="Multikey", publicKeyMultibase=signing_key)
                text = json.dumps(document)
            return Reply(reply.status, reply.headers, text.encode())

        with http_proxy(network.plc_url, rewrite=rewrite_document) as plc_proxy:
            yield plc_proxy, pds_proxy


def test_429_with_ratelimit_reset_is_waited_out(pds, target, instance, atproto_env):
    account = pds.create_account(handle())
    pds.create_records(account, POSTS, [post(n) for n in range(4)])
    resets: list[int] = []

    def limited_until_reset(method: str, path: str) -> Reply | None:
        """429 for every getRepo before the reset announced by the first one: an early retry is counted."""
        if "sync.getRepo" not in path:
            return None
        if not resets:
            resets.append(int(time.time()) + 2)  # a unix time, not a delay
        if time.time() < resets[0] - 0.05:  # a little slack for the clocks' granularity
            headers = {"content-type": "application/json", "RateLimit-Limit": "3000",
                       "RateLimit-Remaining": "0", "RateLimit-Reset": str(resets[0])}
            return Reply(429, headers, b'{"error":"RateLimitExceeded","message":"slow down"}')
        return None

    with routed(atproto_env, pds_intercept=limited_until_reset) as (plc, pds_proxy):
        (result,) = sync_dids(instance, target, [account.did], plc_url=plc.url).values()
    assert metadata(result)["outcomes"] == {"synced": 1}
    assert pds_proxy.count("sync.getRepo") == 2, "the retry came before the reset (or the 429 was terminal)"
    assert len(stored_records(target, account.did)) == 4


def test_429_until_far_ahead_schedules_the_repo_without_using_an_attempt(pds, target, instance, atproto_env):
    account = pds.create_account(handle())
    reset = int(time.time()) + 1800  # far ahead, within ATPROTO_MAX_PAUSE_SECONDS (a longer pause is cut to it)

    def always_limited(method: str, path: str) -> Reply | None:
        if "sync.getRepo" in path:
            return Reply(429, {"content-type": "application/json", "RateLimit-Reset": str(reset)},
                         b'{"error":"RateLimitExceeded","message":"daily limit"}')
        return None

    with routed(atproto_env, pds_intercept=always_limited) as (plc, _):
        (result,) = sync_dids(instance, target, [account.did], plc_url=plc.url).values()
    assert result.success
    row = ledger_row(target, account.did)
    assert (row["status"], row["attempts"]) == ("error", 0), "a 429 must not count as a failed attempt"
    assert abs(row["next_retry_at"].timestamp() - reset) < 5, row["next_retry_at"]
    assert metadata(result)["outcomes"] == {"rate_limited": 1}


def test_a_pds_that_never_ends_its_headers_fails_that_repo_at_the_fetch_deadline(pds, target, instance_in_threads,
                                                                                 atproto_env):
    """getRepo answered with `103 Early Hints`, one every 0.3 s for a minute: before, the download's
    deadline began with the body, so the run waited on the hints for as long as they came. Now the
    whole request keeps to REPO_FETCH_TIMEOUT_SECONDS, and the other repos are synced."""
    victim, bystander = pds.create_account(handle()), pds.create_account(handle())
    for account in (victim, bystander):
        pds.create_records(account, POSTS, [post(n) for n in range(3)])
    hints = [b"HTTP/1.1 103 Early Hints\r\nLink: </car>; rel=preload\r\n\r\n"] * 200

    def hints_for_the_victim(method: str, path: str) -> Reply | None:
        return Reply(200, {}, b"", raw=hints, drip_seconds=0.3) if f"getRepo?did={victim.did.replace(':', '%3A')}" in path else None

    with routed(atproto_env, pds_intercept=hints_for_the_victim) as (plc, pds_proxy):
        kind, results = ends_within(40, lambda: sync_dids(instance_in_threads, target, [victim.did, bystander.did],
                                                          plc_url=plc.url, fetch_timeout_seconds=1),
                                    lambda: f"{pds_proxy.count('sync.getRepo')} getRepo requests")
    assert kind == "returned", results
    victim_row = ledger_row(target, victim.did)
    assert victim_row["status"] == "error" and victim_row["attempts"] == 1, victim_row
    assert f"getRepo of {victim.did} (for a slow host, raise REPO_FETCH_TIMEOUT_SECONDS" in victim_row["last_error"]
    assert "took longer than its deadline of 1 s (and 1 s per 65,536 bytes moved, up to" in victim_row["last_error"]
    assert ledger_row(target, bystander.did)["status"] == "synced" and len(stored_records(target, bystander.did)) == 3


def dripped_export(pds, did: str, pieces: int) -> tuple[int, Reply]:
    """(its size, the repo's export as a reply sent in `pieces` pieces 0.1 s apart from its first byte)."""
    car = httpx.get(f"{pds.pds.url}/xrpc/com.atproto.sync.getRepo", params={"did": did}).content
    head = (f"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.ipld.car\r\ncontent-length: {len(car)}\r\n"
            "connection: close\r\n\r\n").encode()
    body = [car[i * len(car) // pieces:(i + 1) * len(car) // pieces] for i in range(pieces)]
    return len(car), Reply(200, {}, b"", raw=[head, *body], drip_seconds=0.1)


@pytest.mark.parametrize("rate_over_minimum, syncs", [(4, True), (1 / 3, False)])
def test_a_repo_download_gets_the_time_its_size_needs_at_a_fair_rate(pds, target, instance, atproto_env,
                                                                     rate_over_minimum, syncs):
    """The export is sent in 30 pieces 0.1 s apart (3 s) against a 1 s deadline. Before, the deadline was
    fixed, so the download was cut at 1 s however fast the bytes came: the heaviest accounts' exports
    (hundreds of MB) could never sync. Now it grows by 1 s per REPO_FETCH_MIN_BYTES_PER_SECOND bytes
    moved: faster than that the repo syncs, slower (a drip) it is still cut."""
    account = pds.create_account(handle())
    pds.create_records(account, POSTS, [post(n) for n in range(40)])
    size, export = dripped_export(pds, account.did, 30)
    rate = size / 3  # bytes per second as dripped

    def dripped(method: str, path: str) -> Reply | None:
        return export if "sync.getRepo" in path else None

    with routed(atproto_env, pds_intercept=dripped) as (plc, _):
        sync_dids(instance, target, [account.did], plc_url=plc.url, fetch_timeout_seconds=1,
                  fetch_min_bytes_per_second=rate / rate_over_minimum)
    row = ledger_row(target, account.did)
    if syncs:
        assert row["status"] == "synced", row["last_error"]
        assert len(stored_records(target, account.did)) == 40
    else:
        assert row["status"] == "error" and "took longer than its deadline of 1 s" in row["last_error"], row
        assert stored_records(target, account.did) == {}


def test_a_run_that_stops_cuts_its_downloads_and_gives_their_repos_back(pds, target_url, target, atproto_env):
    """One export comes at a fair rate over 30 s; the run stops (its main thread raises, as an interrupt
    does) once the other repo is synced. Before, the run waited for that download to end before it gave
    anything back: with a deadline that grows with the bytes, a heavy account's could take an hour."""
    slow, quick = pds.create_account(handle()), pds.create_account(handle())
    for account in (slow, quick):
        pds.create_records(account, POSTS, [post(n) for n in range(5)])
    _, export = dripped_export(pds, slow.did, 300)

    def dripped(method: str, path: str) -> Reply | None:
        return export if f"getRepo?did={slow.did.replace(':', '%3A')}" in path else None

    class Interrupted(Exception):
        pass

    def stop_after_the_quick_one(outcome, done: int, total: int) -> None:
        if outcome.did == quick.did:
            raise Interrupted("stop")

    settings = RepoSettings()
    with target.transaction():
        ledger.enqueue(target, [slow.did, quick.did], settings.buckets)
    pool = shared_pool(target_url)
    with routed(atproto_env, pds_intercept=dripped) as (plc, _):
        source = RepoSourceResource(plc_url=plc.url, fetch_min_bytes_per_second=1)
        clients = source.clients(target_url)
        try:
            kind, error = ends_within(20, lambda: backfill_buckets(pool, source.syncer(pool, clients),
                                                                   list(range(settings.buckets)),
                                                                   stop_after_the_quick_one),
                                      lambda: "still waiting for the dripped download")
        finally:
            clients.close()
    assert kind == "raised" and isinstance(error, Interrupted), error
    assert ledger_row(target, quick.did)["status"] == "synced"
    given_back = ledger_row(target, slow.did)
    assert (given_back["status"], given_back["attempts"], given_back["claim_token"]) == ("pending", 0, None), given_back
    assert stored_records(target, slow.did) == {}


def flip_last_block_byte(method: str, path: str, reply: Reply) -> Reply:
    if "sync.getRepo" not in path or reply.status != 200:
        return reply
    body = bytearray(reply.body)
    body[-1] ^= 0xFF
    return Reply(reply.status, reply.headers, bytes(body))


def test_corrupt_car_fails_only_its_repo_and_keeps_what_was_stored(pds, target_url, target, instance, atproto_env):
    victim, bystander = pds.create_account(handle()), pds.create_account(handle())
    for account in (victim, bystander):
        pds.create_records(account, POSTS, [post(n) for n in range(6)])
    sync_dids(instance, target, [victim.did])
    before = stored_records(target, victim.did)
    pds.create_records(victim, POSTS, [post(99)])
    with target.transaction():
        ledger.request_sync(target, [victim.did, bystander.did], 256)
    victim_bucket, bystander_bucket = (ledger_row(target, d)["bucket"] for d in (victim.did, bystander.did))
    pool = shared_pool(target_url)
    with routed(atproto_env, pds_rewrite=flip_last_block_byte) as (plc, _):
        clients = RepoSourceResource().clients(target_url)
        # Only the victim's bucket goes through the corrupting proxy; the bystander's is read as is.
        corrupted = RepoSourceResource(plc_url=plc.url).syncer(pool, clients)
        victim_report = backfill_buckets(pool, corrupted, [victim_bucket])
        bystander_report = backfill_buckets(pool, RepoSourceResource().syncer(pool, clients), [bystander_bucket])
        clients.close()
    (victim_outcome,) = [o for o in victim_report.outcomes if o.did == victim.did]
    assert victim_outcome.status == "retry" and "CarError" in victim_outcome.error, victim_outcome
    assert "does not match" in victim_outcome.error or "mismatch" in victim_outcome.error.lower(), victim_outcome.error
    assert stored_records(target, victim.did) == before, "a corrupt export must not change stored records"
    assert ledger_row(target, bystander.did)["status"] == "synced"
    assert [o.status for o in bystander_report.outcomes if o.did == bystander.did] == ["synced"]


def test_a_slow_repo_holds_up_only_its_own_thread(pds, target_url, target, atproto_env):
    """The first repo downloaded is held by its PDS until every other repo of the run is synced. Before,
    outcomes were taken in claim order with twice the threads in flight, so the run stopped handing
    out repos behind the slow one and it was held until the proxy gave up (a heavy account on the real
    network stalls a run the same way)."""
    accounts = [pds.create_account(handle()) for _ in range(13)]
    for account in accounts:
        pds.create_records(account, POSTS, [post(0)])
    dids = [account.did for account in accounts]
    held: list[str] = []
    first = threading.Lock()  # two downloads may ask at once: only one is held

    def others_synced(did: str) -> bool:
        rows = target.execute("SELECT count(*) FROM repos WHERE did = ANY(%s) AND did <> %s AND status = 'synced'",
                              (dids, did)).fetchone()
        return rows[0] == len(dids) - 1

    def hold_the_first(method: str, path: str) -> Reply | None:
        with first:
            if "sync.getRepo" not in path or held:
                return None
            held.append(next(did for did in dids if did.replace(":", "%3A") in path))
        deadline = time.monotonic() + 60
        while not others_synced(held[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        held.append("released" if others_synced(held[0]) else "gave up")
        return None  # then answered by the PDS

    settings = RepoSettings()
    with target.transaction():
        ledger.enqueue(target, dids, settings.buckets)
    pool = shared_pool(target_url)
    with routed(atproto_env, pds_intercept=hold_the_first) as (plc, pds_proxy):
        source = RepoSourceResource(plc_url=plc.url, concurrency=2)  # 4 threads, 8 repos in flight
        # A read timeout past the proxy's hold: the held download is not given up on by the client.
        clients = HostClients(HostRateLimiter(target_url), timeout=120, allow_private_hosts=True)
        try:
            report = backfill_buckets(pool, source.syncer(pool, clients), list(range(settings.buckets)))
        finally:
            clients.close()
    assert held[1:] == ["released"], "the run stopped handing out repos while the first one was held"
    # Once: not given up on by the client (its read timeout) and asked again after the others.
    assert pds_proxy.count(f"getRepo?did={held[0].replace(':', '%3A')}") == 1
    assert report.by_status() == {"synced": len(dids)}
    assert report.outcomes[-1].did == held[0], "the held repo's outcome came before the others'"


def test_a_slow_host_keeps_its_share_of_the_downloads_and_the_other_hosts_go_on(pds, target_url, target, atproto_env):
    """Half the repos are served by a host (the PDS proxy) that holds every download until each repo of
    the other host (the PDS itself) is synced. With two download slots, one per host: before, the slow
    host's repos took both slots, then every thread, waiting for one, so the quick host's repos waited
    for the slow host's until the proxy gave up on them."""
    accounts = [pds.create_account(handle()) for _ in range(12)]
    for account in accounts:
        pds.create_records(account, POSTS, [post(0)])
    dids = sorted(account.did for account in accounts)  # claimed in DID order: the hosts alternate
    slow, quick = set(dids[::2]), dids[1::2]
    holding, held = [0], []  # downloads held right now; each hold's end
    lock = threading.Lock()

    def quick_ones_synced() -> bool:
        rows = target.execute("SELECT count(*) FROM repos WHERE did = ANY(%s) AND status = 'synced'",
                              (quick,)).fetchone()
        return rows[0] == len(quick)

    def hold_until_the_quick_ones_are_synced(method: str, path: str) -> Reply | None:
        if "sync.getRepo" not in path:
            return None
        with lock:
            holding[0] += 1
            held.append(holding[0])
        deadline = time.monotonic() + 60
        while not quick_ones_synced() and time.monotonic() < deadline:
            time.sleep(0.1)
        with lock:
            holding[0] -= 1
            held.append("released" if quick_ones_synced() else "gave up")
        return None  # then answered by the PDS

    settings = RepoSettings()
    with target.transaction():
        ledger.enqueue(target, dids, settings.buckets)
    pool = shared_pool(target_url)
    with routed(atproto_env, pds_intercept=hold_until_the_quick_ones_are_synced, only=slow) as (plc, pds_proxy):
        source = RepoSourceResource(plc_url=plc.url, concurrency=2, host_concurrency=1)  # 4 threads
        clients = HostClients(HostRateLimiter(target_url), timeout=120, allow_private_hosts=True)
        try:
            report = backfill_buckets(pool, source.syncer(pool, clients), list(range(settings.buckets)))
        finally:
            clients.close()
    assert "gave up" not in held, "the quick host's repos waited for the slow host's downloads"
    assert max(n for n in held if isinstance(n, int)) == 1, "the slow host held more than its share"
    assert pds_proxy.count("sync.getRepo") == len(slow)  # each slow repo downloaded once, none refused
    assert report.by_status() == {"synced": len(dids)}
    assert {o.did for o in report.outcomes[:len(quick)]} == set(quick), "a slow repo came before a quick one"
    # The run counts, by host, the repos that waited for a slot (the asset's `busy_hosts`), each once: all
    # the slow host's but the one that took its slot at once (the quick host's too wait their turn, briefly).
    assert 0 < report.waited_for_host[host_key(pds_proxy.url)] < len(slow), report.waited_for_host
    assert set(report.waited_for_host) <= {host_key(pds_proxy.url), host_key(pds.pds.url)}, report.waited_for_host


def other_signing_key() -> str:
    key = ec.generate_private_key(ec.SECP256K1()).public_key()
    return PublicKey(key).did_key().removeprefix("did:key:")


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "verification-off"])
def test_commit_signed_by_another_key_is_refused_unless_verification_is_off(pds, target, instance, atproto_env, verify):
    account = pds.create_account(handle())
    pds.create_records(account, POSTS, [post(1), post(2)])
    with routed(atproto_env, signing_key=other_signing_key()) as (plc, _):
        (result,) = sync_dids(instance, target, [account.did], plc_url=plc.url, verify_signatures=verify).values()
    row = ledger_row(target, account.did)
    if verify:
        assert row["status"] == "error" and "SignatureError" in row["last_error"], row
        assert stored_records(target, account.did) == {}
    else:
        assert row["status"] == "synced" and len(stored_records(target, account.did)) == 2
