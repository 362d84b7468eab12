"""A host whose stream misbehaves, served by a WebSocket server on loopback: a flood of frames that are
skipped must not hold the reader past its timeout, and a seq that goes back must not take the stored
cursor back with it (nor apply an event twice)."""

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from migration_assets.atproto import dagcbor
from migration_assets.repos.follow import FollowReport, load_cursor
from migration_assets.repos.stream import Subscription
from tests.ending import ends_within
from tests.repos.helpers import follower_of


def identity_frame(seq: int) -> bytes:
    return dagcbor.encode({"op": 1, "t": "#identity"}) + dagcbor.encode(
        {"seq": seq, "did": f"did:plc:{'a' * 23}{seq % 10}", "time": "2026-12-05T10:00:00.000Z"})


def follow(target_url: str, host: str, start_cursor: int, seconds: float) -> FollowReport:
    """A follower of `host` (commits checked in this process) for `seconds`; its report."""
    with follower_of(target_url, host, start_cursor=start_cursor, check_processes=0) as follower:
        return follower.run(seconds=seconds)


@pytest.fixture
def stream_host() -> Iterator[Callable[[Callable[[ServerConnection], None]], str]]:
    """Starts a subscribeRepos host on loopback whose every connection runs `handler`; returns its URL."""
    servers = []

    def start(handler: Callable[[ServerConnection], None]) -> str:
        def session(connection: ServerConnection) -> None:
            try:
                handler(connection)
            except ConnectionClosed:
                pass

        server = serve(session, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.socket.getsockname()[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_a_flood_of_skipped_frames_does_not_hold_the_reader_past_its_timeout(stream_host):
    def flood(connection: ServerConnection) -> None:
        until = time.monotonic() + 3  # ten times the reader's timeout, past the wait below
        while time.monotonic() < until:
            connection.send(b"\xff\xff")  # not CBOR: skipped as malformed, one after another
        connection.wait_closed()

    host = stream_host(flood)
    with Subscription(host, cursor=0) as subscription:
        returned = ends_within(2, lambda: subscription.next(timeout=0.3),
                               lambda: f"next() skipping frames past its timeout ({subscription.malformed} so far)")
    assert returned == ("returned", None) and subscription.malformed > 0


def test_a_seq_that_goes_back_neither_takes_the_cursor_back_nor_applies_twice(stream_host, target, target_url):
    def stream(connection: ServerConnection) -> None:
        for seq in (5, 6, 3):  # 3: the host went back (a replay after a restore, a bug)
            connection.send(identity_frame(seq))
        connection.wait_closed()

    host = stream_host(stream)
    report = follow(target_url, host, start_cursor=4, seconds=2.0)
    assert (report.identities, report.skipped, report.cursor) == (2, 1, 6), report
    assert load_cursor(target, host) == 6


def test_a_frame_over_the_size_limit_is_stepped_past_not_met_on_every_reconnect(stream_host, target, target_url):
    """The host sends seq 2 as a 9 MB frame: the client closes the connection (1009), and the host sends
    it again to every reconnect from cursor 1. Before, the follower reconnected there until its run
    ended, and the next run did the same: the stream was stuck for good. Now it asks from one further."""
    frames = {1: identity_frame(1), 2: dagcbor.encode({"op": 1, "t": "#identity"}) + b"\x00" * (9 << 20),
              3: identity_frame(3), 5: identity_frame(5)}  # no 4: a host's seqs may skip
    asked: list[int] = []

    def stream(connection: ServerConnection) -> None:
        cursor = int(connection.request.path.partition("cursor=")[2] or 0)
        asked.append(cursor)
        for seq in sorted(s for s in frames if s > cursor):
            connection.send(frames[seq])
        connection.wait_closed()

    host = stream_host(stream)
    report = follow(target_url, host, start_cursor=0, seconds=6.0)
    assert (report.identities, report.oversize, report.cursor) == (3, 1, 5), report
    assert asked[:2] == [0, 2], asked
    assert load_cursor(target, host) == 5
