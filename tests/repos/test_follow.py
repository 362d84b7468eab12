"""Following a real reference PDS's event stream (dev-env PLC + PDS on loopback) into PostgreSQL."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import dagster as dg
import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto.identity import IdentityResolver, StoredDocuments
from migration_assets.atproto.signature import PublicKey
from migration_assets.core.postgres import shared_pool
from migration_assets.core.settings import PROJECT_ROOT
from migration_assets.core.lease import LeaseLost
from migration_assets.repos import ledger
from migration_assets.repos.backfill import RepoSyncer
from migration_assets.repos.follow import Follower, is_relay, load_cursor, save_cursor
from migration_assets.repos.follow_assets import FOLLOW_HOST_TAG
from migration_assets.repos.follow_lease import HostBusy
from migration_assets.repos.stream import Subscription
from migration_assets.atproto.car import CarReader
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import parse_commit
from migration_assets.repos.stream import AccountEvent, CommitEvent, InfoEvent, SyncEvent
from tests.atproto.builders import car_bytes, private_key, signed_commit
from tests.repos.conftest import handle
from tests.repos.helpers import follower_of, ledger_row, listed_records, stored_records, sync_dids

POSTS = "app.bsky.feed.post"
LIKES = "com.example.like"


def post(n: int) -> dict:
    return {"$type": POSTS, "text": f"post {n}", "createdAt": "2026-12-04T10:00:00.000Z"}


def current_seq(host: str) -> int:
    """The host's latest sequence number (read its stream from the start until it goes quiet)."""
    last = 0
    with Subscription(host, cursor=0) as subscription:
        while (event := subscription.next(timeout=1.0)) is not None:
            last = getattr(event, "seq", last)
    return last


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 120.0, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@contextmanager
def following(target_url: str, host: str, **options) -> Iterator[Follower]:
    """A follower of `host` in a thread, stopped (after its batch commits) when the block ends."""
    failures: list[BaseException] = []
    with follower_of(target_url, host, **options) as follower, running(follower, failures):
        yield follower
    assert not failures, failures


@contextmanager
def running(follower: Follower, failures: list[BaseException]) -> Iterator[threading.Thread]:
    """`follower.run` in a thread until the block ends (then stopped after its batch commits); what it
    raised is added to `failures`."""
    stop = threading.Event()

    def run() -> None:
        try:
            follower.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            failures.append(exc)

    thread = threading.Thread(target=run, name="follower")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the follower did not stop"


def exact(pds, target, account, collections=(POSTS, LIKES)) -> bool:
    listed = {}
    for collection in collections:
        listed |= listed_records(pds.pds.url, account.did, collection)
    latest = httpx.get(f"{pds.pds.url}/xrpc/com.atproto.sync.getLatestCommit", params={"did": account.did}).json()
    row = ledger_row(target, account.did)
    return (stored_records(target, account.did) == listed and row.get("rev") == latest["rev"]
            and row["records_count"] == len(listed) and row["status"] == "synced")


def applied(target_url: str, host: str, events: list, **options) -> Follower:
    """A follower of `host` (a fresh one, as after a restart) that has applied `events` as one batch."""
    with follower_of(target_url, host, **options) as follower:
        follower.apply(events)
    return follower


def test_follow_applies_commits_new_accounts_account_status_and_identity(pds, target, target_url, instance):
    host = pds.pds.url
    start = current_seq(host)
    alice, quiet, banned = (pds.create_account(handle()) for _ in range(3))
    keys = pds.create_records(alice, POSTS, [post(n) for n in range(5)])
    pds.create_records(quiet, POSTS, [post(1), post(2)])
    pds.create_records(banned, POSTS, [post(3)])
    sync_dids(instance, target, [alice.did, quiet.did, banned.did])
    save_cursor(target, host, start)  # follow from before the backfill: its events are replays

    with following(target_url, host) as follower:
        pds.update_records(alice, POSTS, {keys[0]: post(100)})
        pds.delete_records(alice, POSTS, keys[1:3])
        pds.create_records(alice, LIKES, [{"subject": "s", "createdAt": "2026-12-04T10:00:00Z"}])
        newcomer = pds.create_account(handle())
        pds.create_records(newcomer, POSTS, [post(7), post(8)])
        pds.deactivate(quiet)
        pds.takedown(banned)
        new_handle = handle()
        pds._call("com.atproto.identity.updateHandle", {"handle": new_handle}, token=alice.access_jwt)

        wait_until("alice, the newcomer and both account changes", lambda: (
            exact(pds, target, alice) and exact(pds, target, newcomer)
            and ledger_row(target, quiet.did)["status"] == "deactivated"
            and ledger_row(target, banned.did)["status"] == "takendown"
            and follower.report.identities >= 1))
        assert follower.syncer.resolver.resolve(alice.did).handle == new_handle, "#identity left a stale DID document"

    report = follower.report
    assert report.applied >= 3, report  # alice's three commits came from the stream, not a resync
    assert report.last_desync is None, report  # creates, updates and deletes all checked against the tree
    assert stored_records(target, alice.did)[(POSTS, keys[0])][1]["text"] == "post 100"
    assert len(stored_records(target, quiet.did)) == 2, "a deactivated account keeps its records"
    counts = dict(target.execute("SELECT collection, records FROM repo_collection_counts WHERE did = %s",
                                 (alice.did,)).fetchall())
    assert counts == {POSTS: 3, LIKES: 1}
    assert load_cursor(target, host) == report.cursor > start


def test_an_account_reactivated_or_whose_takedown_is_lifted_is_resynced_and_followed_again(
        pds, target, target_url, instance):
    """`#account` active again: the repo, kept while inactive, is fetched again (it may have changed
    meanwhile) and its commits apply from then on."""
    host = pds.pds.url
    quiet, banned = pds.create_account(handle()), pds.create_account(handle())
    pds.create_records(quiet, POSTS, [post(1), post(2)])
    pds.create_records(banned, POSTS, [post(3)])
    sync_dids(instance, target, [quiet.did, banned.did])
    save_cursor(target, host, current_seq(host))

    with following(target_url, host) as follower:
        pds.deactivate(quiet)
        pds.takedown(banned)
        wait_until("both accounts inactive", lambda: (ledger_row(target, quiet.did)["status"],
                                                      ledger_row(target, banned.did)["status"]) == ("deactivated", "takendown"))
        resyncs = follower.report.resyncs
        pds.activate(quiet)
        pds.takedown(banned, applied=False)
        wait_until("both accounts synced again", lambda: exact(pds, target, quiet, (POSTS,))
                   and exact(pds, target, banned, (POSTS,)))
        assert follower.report.resyncs == resyncs + 2, follower.report
        pds.create_records(quiet, POSTS, [post(4)])
        wait_until("its next commit applied", lambda: exact(pds, target, quiet, (POSTS,)))
    assert len(stored_records(target, quiet.did)) == 3 and follower.report.last_error is None, follower.report


def test_an_event_that_does_not_follow_the_stored_rev_resyncs_the_repo(pds, target, target_url, instance):
    host = pds.pds.url
    alice = pds.create_account(handle())
    keys = pds.create_records(alice, POSTS, [post(n) for n in range(4)])
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    # The stored state misses a commit: an older rev, a record gone. Only a resync can repair it.
    target.execute("UPDATE repos SET rev = '2222222222222' WHERE did = %s", (alice.did,))
    target.execute("DELETE FROM records WHERE did = %s AND rkey = %s", (alice.did, keys[0]))

    with following(target_url, host) as follower:
        pds.create_records(alice, POSTS, [post(9)])
        wait_until("the resync", lambda: exact(pds, target, alice, (POSTS,)))

    assert (follower.report.desyncs, follower.report.resyncs, follower.report.applied) == (1, 1, 0), follower.report


@dataclass
class Streaming:
    """An account synced, then `commits` commits of one post each made after the host's cursor, and the
    command that follows the host two events a batch."""
    host: str
    account: object
    rkeys: list[str]
    command: list[str]
    env: dict[str, str]


def streaming(pds, target, instance, commits: int = 120) -> Streaming:
    host = pds.pds.url
    account = pds.create_account(handle())
    sync_dids(instance, target, [account.did])
    save_cursor(target, host, current_seq(host))
    rkeys = [pds.create_records(account, POSTS, [post(n)])[0] for n in range(commits)]  # one commit each
    command = [sys.executable, "-m", "migration_assets.cli", "repos", "follow", "--host", host, "--batch-events", "2"]
    # A follower after a killed one waits for its lease on the host to lapse: 5 s, not the default 300.
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT), "REPO_LEASE_SECONDS": "5"}
    return Streaming(host, account, rkeys, command, env)


def stopped_after_first_batch(stream: Streaming, target, sig: int) -> str:
    """Start the command, send `sig` as soon as its first batch is committed; its output."""
    start = load_cursor(target, stream.host)
    follower = subprocess.Popen(stream.command, env=stream.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until("the first batch", lambda: load_cursor(target, stream.host) != start or follower.poll() is not None,
                   every=0.005)
    finally:
        follower.send_signal(sig)
        output = follower.communicate(timeout=60)[0].decode()
    return f"exit code {follower.returncode}\n{output}"


def assert_a_prefix_committed(stream: Streaming, target, output: str) -> None:
    """What was committed is a prefix of the stream, with the ledger in step: nothing half-applied; and
    the follower was stopped before the end."""
    stored = stored_records(target, stream.account.did)
    assert set(stored) == {(POSTS, rkey) for rkey in stream.rkeys[:len(stored)]}, output
    assert ledger_row(target, stream.account.did)["records_count"] == len(stored)
    assert len(stored) < len(stream.rkeys), f"the follower finished before it was stopped; stop it sooner\n{output}"


def resume_until_exact(stream: Streaming, pds, target) -> None:
    """A follower started anew catches up exact, without a desync, and Ctrl-C ends it with exit code 0."""
    stopped_at = load_cursor(target, stream.host)
    resumed = subprocess.Popen(stream.command, env=stream.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        wait_until("the resumed follower to catch up", lambda: exact(pds, target, stream.account, (POSTS,)))
    finally:
        resumed.send_signal(signal.SIGINT)  # Ctrl-C: stops after committing, exits 0
        output = resumed.communicate(timeout=60)[0]
    assert resumed.returncode == 0, output
    assert "done:" in output and "0 desyncs" in output and "0 resyncs" in output, output
    assert load_cursor(target, stream.host) > stopped_at


def test_a_follower_killed_mid_stream_resumes_exact(pds, target, target_url, instance):
    stream = streaming(pds, target, instance)
    output = stopped_after_first_batch(stream, target, signal.SIGKILL)
    assert_a_prefix_committed(stream, target, output)
    resume_until_exact(stream, pds, target)
    # The killed command's run stays STARTED in the instance until the repo_follow sensor finds it gone
    # (test_follow_sensor shows that): end it here, so later tests' ticks see no live run of this host.
    for run in instance.get_runs(filters=dg.RunsFilter(tags={FOLLOW_HOST_TAG: stream.host},
                                                       statuses=[dg.DagsterRunStatus.STARTED])):
        instance.report_run_failed(run, "SIGKILLed by test_a_follower_killed_mid_stream_resumes_exact")


def test_ctrl_c_mid_stream_commits_the_batch_in_hand_exits_0_and_a_new_follower_resumes_exact(
        pds, target, target_url, instance):
    """Ctrl-C while commits stream in: the batch in hand commits with its cursor, the command exits 0
    reporting that cursor, and its run ends (not left STARTED for the sensor to find gone)."""
    stream = streaming(pds, target, instance)
    output = stopped_after_first_batch(stream, target, signal.SIGINT)
    assert output.startswith("exit code 0\n") and "done:" in output, output
    assert f"cursor {load_cursor(target, stream.host)};" in output, output
    assert_a_prefix_committed(stream, target, output)
    (last_run,) = instance.get_runs(filters=dg.RunsFilter(tags={FOLLOW_HOST_TAG: stream.host}), limit=1)
    assert last_run.status == dg.DagsterRunStatus.SUCCESS, output
    resume_until_exact(stream, pds, target)


def lease_holder(conn: psycopg.Connection, host: str) -> str | None:
    row = conn.execute("SELECT holder FROM repo_stream_leases WHERE host = %s AND claim_token IS NOT NULL",
                       (host,)).fetchone()
    return row[0] if row else None


def test_one_follower_per_host_a_second_waits_out_a_lease_then_fails_naming_the_first(
        pds, target, target_url, instance, monkeypatch):
    monkeypatch.setenv("REPO_LEASE_SECONDS", "5")  # renewed every 1.7 s; a second follower waits 5 s for it
    host = pds.pds.url
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    with following(target_url, host, holder="the first follower"):
        wait_until("the first follower to hold the host", lambda: lease_holder(target, host) == "the first follower")
        with follower_of(target_url, host, holder="the second follower") as second:
            with pytest.raises(HostBusy, match="another follower of .* [(]the first follower[)] holds it"):
                second.run(seconds=60)
        assert lease_holder(target, host) == "the first follower", "the first kept its lease through the wait"
        pds.create_records(alice, POSTS, [post(1)])
        wait_until("the first follower to apply the commit", lambda: exact(pds, target, alice, (POSTS,)))
    assert lease_holder(target, host) is None, "a follower that stops gives the host back"


def test_a_follower_whose_lease_was_taken_over_writes_nothing_more_and_stops(pds, target, target_url, instance,
                                                                             monkeypatch):
    monkeypatch.setenv("REPO_LEASE_SECONDS", "5")
    host = pds.pds.url
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    failures: list[BaseException] = []
    with follower_of(target_url, host, holder="the stalled follower") as follower, running(follower, failures) as thread:
        wait_until("the follower to hold the host", lambda: lease_holder(target, host) == "the stalled follower")
        # What another follower does once this one's lease lapsed (it stalled past the ttl): take it over.
        target.execute("UPDATE repo_stream_leases SET claim_token = gen_random_uuid(), holder = 'the next follower', "
                       "lease_expires_at = now() + interval '1 hour' WHERE host = %s", (host,))
        cursor = load_cursor(target, host)
        pds.create_records(alice, POSTS, [post(1)])
        thread.join(30)
    assert [type(exc) for exc in failures] == [LeaseLost], failures
    assert "another" in str(failures[0]) and "took it over" in str(failures[0])
    assert load_cursor(target, host) == cursor and stored_records(target, alice.did) == {}, \
        "a follower that lost the host wrote after it"
    assert lease_holder(target, host) == "the next follower", "the lost follower gave back a lease it no longer held"


def next_commit(host: str, did: str, after: int) -> CommitEvent:
    with Subscription(host, cursor=after) as subscription:
        while (event := subscription.next(timeout=10)) is not None:
            if isinstance(event, CommitEvent) and event.repo == did and event.ops:
                return event
    raise AssertionError(f"no commit of {did} after seq {after}")


def synced_then_one_commit_each(pds, target, instance, count: int) -> tuple[list, list[CommitEvent]]:
    """`count` new accounts, synced, then a post each: the accounts and their commit events."""
    accounts = [pds.create_account(handle()) for _ in range(count)]
    sync_dids(instance, target, [a.did for a in accounts])
    start = current_seq(pds.pds.url)
    for account in accounts:
        pds.create_records(account, POSTS, [post(1)])
    return accounts, [next_commit(pds.pds.url, account.did, start) for account in accounts]


def forged(event: CommitEvent, **changes) -> CommitEvent:
    """The event with its commit re-signed by a stranger's key (same did, data and rev)."""
    blocks = dict(CarReader(iter([event.blocks]), max_size=1 << 24))
    commit = parse_commit(blocks[event.commit])
    block = signed_commit(private_key(ec.SECP256K1(), 0xBAD), commit.data, did=commit.did, rev=commit.rev)
    cid = CID.for_block(block)
    blocks = {k: v for k, v in blocks.items() if k != event.commit} | {cid: block}
    return event.model_copy(update={"commit": cid, "blocks": car_bytes([cid], blocks.items()), **changes})


def test_events_that_cannot_be_applied_desync_only_their_repo(pds, target, target_url, instance):
    """A forged signature, a missing record block, a commit for another rev, an op the signed tree
    doesn't hold: each desyncs its repo, which
    the resync repairs; the events of other repos in the same batch still apply. OutdatedCursor makes the
    host's synced repos due."""
    host = pds.pds.url
    accounts, events = synced_then_one_commit_each(pds, target, instance, 5)
    first, second, third, fourth, fine = events
    injected = fourth.ops[0].model_copy(update={"path": "app.bsky.feed.post/3zzzzzzzzzzzz"})
    commit_only = dict(CarReader(iter([second.blocks]), max_size=1 << 24))
    hostile = [
        forged(first),
        second.model_copy(update={"blocks": car_bytes([second.commit], [(second.commit, commit_only[second.commit])])}),
        third.model_copy(update={"rev": third.rev + "2"}),  # the commit inside says another rev
        fourth.model_copy(update={"ops": fourth.ops + [injected]}),  # a record the signed tree doesn't hold
        fine,
    ]
    follower = applied(target_url, host, hostile)

    assert (follower.report.applied, follower.report.desyncs, follower.report.resyncs) == (1, 4, 4), follower.report
    for account in accounts:
        assert exact(pds, target, account, (POSTS,)), account.did
    assert load_cursor(target, host) == max(e.seq for e in events)

    follower.apply([InfoEvent(name="OutdatedCursor"), fine])  # the oldest event the host keeps: just made
    assert {ledger_row(target, a.did)["status"] for a in accounts} == {"pending"}


def test_a_batchs_resyncs_download_at_once_not_one_after_another(pds, target, target_url, instance, monkeypatch):
    """Before, a batch's resyncs ran one after another while the stream waited: a burst of desyncs (or of
    a relay's new accounts) held it up for all their downloads in turn. The first two resyncs here wait
    for each other: one after another, the first would wait in vain (BrokenBarrierError)."""
    host = pds.pds.url
    accounts, events = synced_then_one_commit_each(pds, target, instance, 4)
    forged_commits = [forged(event) for event in events]  # each desyncs its repo
    together, arrived = threading.Barrier(2, timeout=60), []
    sync = RepoSyncer.sync

    def meeting_sync(syncer, repo, lease, wait_for_host=True):
        arrived.append(repo.did)
        if len(arrived) <= 2:
            together.wait()
        return sync(syncer, repo, lease, wait_for_host)

    monkeypatch.setattr(RepoSyncer, "sync", meeting_sync)
    follower = applied(target_url, host, forged_commits)
    assert (follower.report.desyncs, follower.report.resyncs, follower.report.resync_failures) == (4, 4, 0), follower.report
    for account in accounts:
        assert exact(pds, target, account, (POSTS,)), account.did


def test_a_commit_checked_against_a_stale_key_is_checked_again_with_the_key_resolved_anew(pds, target, target_url, instance):
    """The stored DID document's key is stale (the account rotated it since): the commit's signature
    fails against it, the DID is resolved once more, and the commit checks against the new key: it is
    applied, no desync, and the new document replaces the stale one."""
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    start = current_seq(pds.pds.url)
    pds.create_records(alice, POSTS, [post(1)])
    event = next_commit(pds.pds.url, alice.did, start)
    documents = StoredDocuments(shared_pool(target_url))
    (current, _), = documents.load([alice.did], 3600).values()
    stale_key = PublicKey(private_key(ec.SECP256K1(), 0x57A1E).public_key()).did_key().removeprefix("did:key:")
    documents.save(alice.did, current.model_copy(update={"signing_key": stale_key}))
    follower = applied(target_url, pds.pds.url, [event])
    assert (follower.report.applied, follower.report.desyncs) == (1, 0), follower.report
    assert exact(pds, target, alice, (POSTS,))
    (stored, _), = documents.load([alice.did], 3600).values()
    assert stored.signing_key == current.signing_key


def test_forged_commits_of_one_did_have_it_resolved_anew_once_not_once_each(pds, target, target_url, instance,
                                                                              monkeypatch):
    """Before, every commit whose signature failed fetched the DID's document again: a host sending forged
    commits had the PLC asked once per commit. Now once per DID a minute; each forged commit still desyncs."""
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    start = current_seq(pds.pds.url)
    for n in range(2):
        pds.create_records(alice, POSTS, [post(n)])
    fetched: list[str] = []
    resolve_uncached = IdentityResolver._resolve_uncached
    monkeypatch.setattr(IdentityResolver, "_resolve_uncached",
                        lambda resolver, did: fetched.append(did) or resolve_uncached(resolver, did))
    with follower_of(target_url, pds.pds.url) as follower:
        follower.apply([forged(event) for event in commits_of(pds.pds.url, alice.did, start, 2)])
        assert (follower.report.desyncs, follower.report.resyncs, fetched) == (1, 1, [alice.did]), follower.report
        start = current_seq(pds.pds.url)
        pds.create_records(alice, POSTS, [post(2)])
        follower.apply([forged(next_commit(pds.pds.url, alice.did, start))])  # the next batch, a moment later
    assert (follower.report.desyncs, fetched) == (2, [alice.did]), follower.report


def test_the_lag_reported_is_how_long_ago_the_last_applied_event_was_made(pds, target, target_url, instance):
    """The run's `lag_seconds`: an event the host made an hour ago, applied now, is an hour behind."""
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    start = current_seq(pds.pds.url)
    pds.create_records(alice, POSTS, [post(1)])
    event = next_commit(pds.pds.url, alice.did, start)
    an_hour_ago = event.model_copy(update={"time": datetime.now(timezone.utc) - timedelta(hours=1)})
    follower = applied(target_url, pds.pds.url, [an_hour_ago])
    assert follower.report.applied == 1 and 3600 <= follower.report.lag_seconds < 7200, follower.report


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_a_gap_in_a_relays_stream_makes_every_synced_repo_due_and_the_resync_ends_exact(
        pds, target, target_url, instance, verify):
    """A relay's stream carries every host's repos, so a gap in it (OutdatedCursor) may hide any repo's
    changes. Before, only the repos whose PDS was the relay's own URL were made due: none of them. With
    --no-verify no document is resolved for a commit: the host its repo was fetched from tells (before,
    the relay went unrecognised and its gap made nothing due)."""
    alice, bob = pds.create_account(handle()), pds.create_account(handle())
    for account in (alice, bob):
        pds.create_records(account, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did, bob.did])
    start = current_seq(pds.pds.url)
    pds.create_records(alice, POSTS, [post(1)])
    passed_on = next_commit(pds.pds.url, alice.did, start)  # as a relay passes on the PDS's event
    relay = "http://127.0.0.1:9"  # the relay's URL: no repo's PDS
    follower = applied(target_url, relay, [passed_on], verify_signatures=verify)
    assert follower.report.applied == 1 and is_relay(target, relay) and not is_relay(target, pds.pds.url)
    # Away longer than the relay keeps its events, while both accounts wrote.
    pds.create_records(alice, POSTS, [post(2)])
    pds.create_records(bob, POSTS, [post(3)])
    target.execute("UPDATE repo_stream_cursors SET relay = false WHERE host = %s", (relay,))  # seen at the gap too
    restarted = applied(target_url, relay, [InfoEvent(name="OutdatedCursor"), passed_on], verify_signatures=verify)
    assert restarted.report.desyncs == 2, restarted.report
    assert {ledger_row(target, a.did)["status"] for a in (alice, bob)} == {"pending"}
    sync_dids(instance, target, [alice.did, bob.did])
    for account in (alice, bob):
        assert exact(pds, target, account, (POSTS,)), account.did


def test_with_no_verify_an_account_that_moved_here_does_not_make_its_pds_a_relay(pds, target, target_url, instance):
    """With --no-verify, a repo last fetched from another host hints at a relay; an account that moved
    to this PDS since looks the same. Its DID document, resolved to confirm, names this PDS: before, the
    PDS was marked a relay for good, and its next gap made every synced repo of every host due."""
    host = pds.pds.url
    alice = pds.create_account(handle())
    sync_dids(instance, target, [alice.did])
    start = current_seq(host)
    pds.create_records(alice, POSTS, [post(1)])
    commit = next_commit(host, alice.did, start)
    target.execute("UPDATE repos SET pds = 'http://127.0.0.1:9' WHERE did = %s", (alice.did,))  # its old PDS
    follower = applied(target_url, host, [commit], verify_signatures=False)
    assert follower.report.applied == 1 and not is_relay(target, host), follower.report


def test_a_gap_makes_due_only_the_repos_not_fetched_since_the_oldest_event_the_host_keeps(
        pds, target, target_url, instance):
    """A reference PDS answers a cursor older than it keeps (a first follow from 0, say) with
    OutdatedCursor, then its events of the last day. Before, every repo synced from it was made due: a
    whole host downloaded again right after its backfill. Now only those fetched before that oldest event
    (alice, fetched two days ago); bob, fetched since, is kept. The gap is seen to at the event after it,
    in that event's transaction: an OutdatedCursor ending a batch makes nothing due yet."""
    host = pds.pds.url
    alice, bob = pds.create_account(handle()), pds.create_account(handle())
    sync_dids(instance, target, [alice.did, bob.did])
    target.execute("UPDATE repos SET fetched_at = now() - interval '2 days' WHERE did = %s", (alice.did,))
    start = current_seq(host)
    pds.create_records(bob, POSTS, [post(0)])
    oldest_kept = next_commit(host, bob.did, start).model_copy(
        update={"time": datetime.now(timezone.utc) - timedelta(days=1)})
    with follower_of(target_url, host) as follower:
        follower.apply([InfoEvent(name="OutdatedCursor")])
        assert (follower.report.outdated_cursor, follower.report.desyncs) == (1, 0), follower.report
        assert ledger_row(target, alice.did)["status"] == "synced" and load_cursor(target, host) is None
        follower.apply([oldest_kept])
    assert follower.report.desyncs == 1, follower.report
    assert (ledger_row(target, alice.did)["status"], ledger_row(target, bob.did)["status"]) == ("pending", "synced")
    assert exact(pds, target, bob, (POSTS,)) and load_cursor(target, host) == oldest_kept.seq


def test_a_sync_event_for_a_repo_being_fetched_is_checked_once_the_fetch_is_stored(pds, target, target_url, instance):
    """A #sync for a repo a bucket run is fetching: that fetch may predate it. Before, it was
    made due, which does nothing to a claimed repo, and the fetch stored the older state for good. Now it
    is noted like a commit that goes by, and a repo stored behind it is resynced."""
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    target.execute("UPDATE repos SET status = 'in_progress', claimed_at = now() WHERE did = %s", (alice.did,))
    later = "j" + "2" * 12  # a TID after any stored rev
    with follower_of(target_url, pds.pds.url) as follower:
        follower.apply([SyncEvent(seq=1, did=alice.did, rev=later, blocks=b"", time=datetime.now(timezone.utc))])
        assert (follower.report.skipped, follower.report.desyncs) == (1, 0), follower.report
        pds.create_records(alice, POSTS, [post(1)])  # the change the #sync announced; the fetch missed it
        target.execute("UPDATE repos SET status = 'synced', claimed_at = NULL WHERE did = %s", (alice.did,))
        follower.apply([])
    assert (follower.report.desyncs, follower.report.resyncs) == (1, 1), follower.report
    assert exact(pds, target, alice, (POSTS,))


def test_commits_passed_while_a_bucket_run_holds_the_repo_are_not_lost(pds, target, target_url, instance):
    host = pds.pds.url
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(1)])
    sync_dids(instance, target, [alice.did])
    save_cursor(target, host, current_seq(host))
    target.execute("UPDATE repos SET status = 'in_progress', claimed_at = now() WHERE did = %s", (alice.did,))

    with following(target_url, host) as follower:
        pds.create_records(alice, POSTS, [post(2)])
        wait_until("the commit to go by", lambda: follower.report.skipped >= 1)
        # The bucket run ends, having stored the repo as it was before that commit.
        target.execute("UPDATE repos SET status = 'synced', claimed_at = NULL WHERE did = %s", (alice.did,))
        wait_until("the resync", lambda: exact(pds, target, alice, (POSTS,)))
    assert follower.report.resyncs == 1, follower.report


def commits_of(host: str, did: str, after: int, count: int) -> list[CommitEvent]:
    found = []
    with Subscription(host, cursor=after) as subscription:
        while len(found) < count and (event := subscription.next(timeout=10)) is not None:
            if isinstance(event, CommitEvent) and event.repo == did:
                found.append(event)
    assert len(found) == count, f"{len(found)} commits of {did} after seq {after}, not {count}"
    return found


def data_root(event: CommitEvent) -> str:
    return str(parse_commit(dict(CarReader(iter([event.blocks]), max_size=1 << 24))[event.commit]).data)


def test_a_commit_missing_from_the_stream_is_caught_by_prev_data_and_the_resync_ends_exact(
        pds, target, target_url, instance):
    """`since` is not signed: a host that lost a commit may still name the stored rev. The commit after
    the gap then says by its prevData that it follows another tree than the stored one."""
    host = pds.pds.url
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    start = current_seq(host)
    for n in (1, 2, 3):
        pds.create_records(alice, POSTS, [post(n)])
    applied, lost, after_gap = commits_of(host, alice.did, start, 3)
    with follower_of(target_url, host) as follower:
        follower.apply([applied])
        assert ledger_row(target, alice.did)["data_cid"] == data_root(applied), "an applied commit moves the root"
        assert after_gap.prev_data is not None and str(after_gap.prev_data) == data_root(lost)
        follower.apply([after_gap.model_copy(update={"since": lost.since})])  # `since` says nothing was missed

    report = follower.report
    assert (report.applied, report.desyncs, report.resyncs) == (1, 1, 1), report
    assert "prevData" in report.last_desync, report.last_desync
    assert exact(pds, target, alice, (POSTS,))
    assert ledger_row(target, alice.did)["data_cid"] == data_root(after_gap), "the resync sets the root"


PROFILE = "app.bsky.actor.profile"
FOLLOWS = "app.bsky.graph.follow"


def test_with_a_signal_collection_a_repo_is_tracked_once_it_writes_a_record_in_it(
        pds, target, target_url, instance, monkeypatch):
    monkeypatch.setenv("REPO_SIGNAL_COLLECTION", PROFILE)
    host = pds.pds.url
    lacking = pds.create_account(handle())
    pds.create_records(lacking, POSTS, [post(0)])
    sync_dids(instance, target, [lacking.did])
    assert (ledger_row(target, lacking.did)["signal_missing"], stored_records(target, lacking.did)) == (True, {})
    save_cursor(target, host, current_seq(host))

    with following(target_url, host) as follower:
        stranger = pds.create_account(handle())
        pds.create_records(stranger, POSTS, [post(1)])
        pds.create_records(lacking, POSTS, [post(2)])
        last = current_seq(host)
        wait_until("the stream to go by", lambda: (load_cursor(target, host) or 0) >= last)
        assert ledger_row(target, stranger.did) == {}, "a repo without a signal record was tracked"
        latest = httpx.get(f"{host}/xrpc/com.atproto.sync.getLatestCommit", params={"did": lacking.did}).json()
        row = ledger_row(target, lacking.did)
        assert (row["rev"], row["records_count"], stored_records(target, lacking.did)) == (latest["rev"], 0, {}), \
            "a repo without a signal record follows the stream but keeps no records"

        for account in (stranger, lacking):
            pds.create_records(account, PROFILE, [{"displayName": "here"}], rkeys=["self"])
        wait_until("both repos tracked and synced whole", lambda: (
            exact(pds, target, stranger, (POSTS, PROFILE)) and exact(pds, target, lacking, (POSTS, PROFILE))))
    assert ledger_row(target, lacking.did)["signal_missing"] is False
    assert follower.report.resyncs == 2, follower.report


@pytest.mark.parametrize("collections, resyncs_while_one_is_left", [(None, 0), ("app.bsky.feed.*", 1)],
                         ids=["signal-stored", "signal-filtered-out"])
def test_with_a_signal_collection_a_repo_whose_last_signal_record_is_deleted_keeps_no_records(
        pds, target, target_url, instance, monkeypatch, collections, resyncs_while_one_is_left):
    """Before, the stream went on storing such a repo's records while a backfill of it stored none. With
    the signal collection filtered out, its records are not counted: a delete of one resyncs the repo."""
    monkeypatch.setenv("REPO_SIGNAL_COLLECTION", FOLLOWS)
    if collections:
        monkeypatch.setenv("REPO_COLLECTIONS", collections)
    kept = (POSTS, FOLLOWS) if collections is None else (POSTS,)
    host = pds.pds.url
    alice = pds.create_account(handle())
    follows = [{"$type": FOLLOWS, "subject": pds.create_account(handle()).did, "createdAt": "2026-12-06T10:00:00.000Z"}
               for _ in range(2)]
    first, second = pds.create_records(alice, FOLLOWS, follows)
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    assert exact(pds, target, alice, kept) and ledger_row(target, alice.did)["signal_missing"] is False
    save_cursor(target, host, current_seq(host))

    with following(target_url, host) as follower:
        pds.delete_records(alice, FOLLOWS, [second])  # one is left: still tracked
        pds.create_records(alice, POSTS, [post(1)])
        wait_until("both commits applied", lambda: exact(pds, target, alice, kept))
        assert follower.report.resyncs == resyncs_while_one_is_left, follower.report

        pds.delete_records(alice, FOLLOWS, [first])
        wait_until("the repo resynced without its signal record", lambda: ledger_row(target, alice.did)["signal_missing"])
        pds.create_records(alice, POSTS, [post(2)])
        latest = httpx.get(f"{host}/xrpc/com.atproto.sync.getLatestCommit", params={"did": alice.did}).json()
        wait_until("the last commit applied", lambda: ledger_row(target, alice.did)["rev"] == latest["rev"])
    row = ledger_row(target, alice.did)
    assert (row["status"], row["records_count"], stored_records(target, alice.did)) == ("synced", 0, {}), \
        "a repo without a signal record keeps no records, as the backfill stores it"
    assert target.execute("SELECT count(*) FROM repo_collection_counts WHERE did = %s", (alice.did,)).fetchone()[0] == 0
    assert "signal collection" in follower.report.last_desync


def test_a_batch_keeps_the_order_of_a_commit_and_the_account_deletion_after_it(pds, target, target_url, instance):
    """A batch's record writes are gathered into one statement: an account deleted after a commit in the
    same batch must still end with no records."""
    host = pds.pds.url
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    start = current_seq(host)
    pds.create_records(alice, POSTS, [post(1)])
    (commit,) = commits_of(host, alice.did, start, 1)
    deleted = AccountEvent(seq=commit.seq + 1, did=alice.did, active=False, status="deleted", time=commit.time)
    follower = applied(target_url, host, [commit, deleted])
    assert follower.report.applied == 1, follower.report
    row = ledger_row(target, alice.did)
    assert (row["status"], row["records_count"], stored_records(target, alice.did)) == ("deleted", 0, {})
    assert target.execute("SELECT count(*) FROM repo_collection_counts WHERE did = %s", (alice.did,)).fetchone()[0] == 0


def test_an_account_event_from_a_host_that_does_not_host_the_did_is_asked_of_its_pds(pds, target, target_url, instance):
    """An #account event is not signed: only the DID's own PDS is believed about the account. The same
    `deleted` from another host (a relay, or a PDS claiming someone else's account) makes the repo due,
    and the resync asks the DID's PDS, which still hosts it: nothing is deleted."""
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0), post(1)])
    sync_dids(instance, target, [alice.did])
    deleted = AccountEvent(seq=1, did=alice.did, active=False, status="deleted", time=datetime.now(timezone.utc))
    elsewhere = applied(target_url, "http://127.0.0.1:9", [deleted])
    assert (elsewhere.report.desyncs, elsewhere.report.resyncs) == (1, 1), elsewhere.report
    assert exact(pds, target, alice, (POSTS,)) and len(stored_records(target, alice.did)) == 2
    applied(target_url, pds.pds.url, [deleted])  # from its own PDS it is applied as sent
    row = ledger_row(target, alice.did)
    assert (row["status"], stored_records(target, alice.did)) == ("deleted", {})


def test_a_sync_event_for_a_repo_waiting_out_its_retry_backoff_waits_too(pds, target, target_url, instance):
    """Before, every #sync made the repo due at once: a host that keeps sending #sync for a repo it fails
    to serve got a getRepo per event, past the ledger's backoff. Once the retry is due, #sync resyncs."""
    alice = pds.create_account(handle())
    pds.create_records(alice, POSTS, [post(0)])
    sync_dids(instance, target, [alice.did])
    with target.cursor() as cur:  # its last fetch failed: the next try in an hour
        ledger.finish_failed(cur, alice.did, "the host answered 502", datetime.now(timezone.utc) + timedelta(hours=1), True)
    later, now = "j" + "2" * 12, datetime.now(timezone.utc)  # a TID after any stored rev
    waiting = applied(target_url, pds.pds.url, [SyncEvent(seq=1, did=alice.did, rev=later, blocks=b"", time=now)])
    row = ledger_row(target, alice.did)
    assert (waiting.report.resyncs, waiting.report.skipped, row["status"]) == (0, 1, "error"), waiting.report
    assert row["next_retry_at"] > datetime.now(timezone.utc) + timedelta(minutes=55)

    target.execute("UPDATE repos SET next_retry_at = now() - interval '1 second' WHERE did = %s", (alice.did,))
    due = applied(target_url, pds.pds.url, [SyncEvent(seq=2, did=alice.did, rev=later, blocks=b"", time=now)])
    assert due.report.resyncs == 1 and exact(pds, target, alice, (POSTS,)), due.report


def test_a_batch_that_is_a_deadlocks_victim_is_written_again(pds, target, target_url, instance):
    """Another transaction (a follower of an overlapping host, a bucket run) holds bob's row and then asks
    for alice's, which this batch holds while it waits for bob's: PostgreSQL aborts the batch's
    transaction as the deadlock's victim. Before, the follower's run failed on it; now the batch is
    written again, its counts as if once."""
    alice, bob = pds.create_account(handle()), pds.create_account(handle())
    sync_dids(instance, target, [alice.did, bob.did])
    now = datetime.now(timezone.utc)
    later = "j" + "2" * 12  # a TID after any stored rev
    batch = [SyncEvent(seq=n + 1, did=did, rev=later, blocks=b"", time=now) for n, did in enumerate((alice.did, bob.did))]
    failures: list[BaseException] = []

    def apply() -> None:
        try:
            follower.apply(batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    with follower_of(target_url, pds.pds.url) as follower, psycopg.connect(target_url) as other:
        other.execute("SELECT 1 FROM repos WHERE did = %s FOR UPDATE", (bob.did,))
        thread = threading.Thread(target=apply)
        thread.start()
        wait_until("the batch waits for bob's row", lambda: target.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE repos%%'"
        ).fetchone()[0] == 1, timeout=30)
        other.execute("SELECT 1 FROM repos WHERE did = %s FOR UPDATE", (alice.did,))  # the batch is the victim
        other.commit()
        thread.join(60)
    assert not failures, failures
    assert (follower.report.events, follower.report.desyncs, follower.report.resyncs) == (2, 2, 2), follower.report
    assert "deadlock" in (follower.report.last_error or ""), follower.report
    assert all(ledger_row(target, did)["status"] == "synced" for did in (alice.did, bob.did))
    assert load_cursor(target, pds.pds.url) == 2
