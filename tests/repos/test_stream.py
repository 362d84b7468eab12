"""subscribeRepos frames: decoding into typed events, error frames, hostile input; and a real PDS's stream."""

import pytest

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.repos.stream import (
    AccountEvent, CommitEvent, IdentityEvent, InfoEvent, StreamError, StreamFormatError, Subscription, decode_frame,
    websocket_url,
)
from tests.repos.conftest import handle

RECORD = CID.for_block(dagcbor.encode({"text": "hi"}))
COMMIT = CID.for_block(b"commit")


def frame(t: str | None, body: dict, op: int = 1) -> bytes:
    header = {"op": op} | ({"t": t} if t else {})
    return dagcbor.encode(header) + dagcbor.encode(body)


def commit_body(**changes) -> dict:
    return {
        "seq": 7, "rebase": False, "tooBig": False, "repo": "did:plc:abc", "commit": COMMIT, "rev": "3kb",
        "since": "3ka", "blocks": b"car", "blobs": [], "time": "2026-12-04T10:00:00.000Z",
        "ops": [{"action": "create", "path": "app.bsky.feed.post/3kx", "cid": RECORD, "prev": None}],
        "prevData": RECORD,
    } | changes


def test_commit_frame_decodes_into_a_typed_event():
    event = decode_frame(frame("#commit", commit_body()))
    assert isinstance(event, CommitEvent)
    assert (event.seq, event.repo, event.rev, event.since, event.commit, event.prev_data) == (7, "did:plc:abc", "3kb", "3ka", COMMIT, RECORD)
    assert event.ops[0].collection_rkey == ("app.bsky.feed.post", "3kx") and event.ops[0].cid == RECORD
    assert event.time.tzinfo is not None


def test_other_message_types_and_unknown_ones():
    assert isinstance(decode_frame(frame("#identity", {"seq": 1, "did": "did:plc:a", "time": "2026-12-04T10:00:00Z"})), IdentityEvent)
    account = decode_frame(frame("#account", {"seq": 2, "did": "did:plc:a", "active": False, "status": "takendown",
                                              "time": "2026-12-04T10:00:00Z"}))
    assert isinstance(account, AccountEvent) and (account.active, account.status) == (False, "takendown")
    assert decode_frame(frame("#info", {"name": "OutdatedCursor"})) == InfoEvent(name="OutdatedCursor")
    assert decode_frame(frame("#somethingNew", {"seq": 3})) is None


def test_error_frame_raises_naming_the_error():
    with pytest.raises(StreamError, match="FutureCursor: cursor in the future") as caught:
        decode_frame(frame(None, {"error": "FutureCursor", "message": "cursor in the future"}, op=-1), "http://pds")
    assert caught.value.error == "FutureCursor"


@pytest.mark.parametrize("bad", [
    pytest.param(b"\xa1\x62op\x01", id="header only"),
    pytest.param(frame("#commit", commit_body()) + b"\x00", id="trailing bytes"),
    pytest.param(frame("#commit", commit_body(seq="7")), id="seq not an integer"),
    pytest.param(frame("#commit", commit_body(ops=[{"action": "move", "path": "a/b"}])), id="unknown op action"),
    pytest.param(frame("#commit", {k: v for k, v in commit_body().items() if k != "commit"}), id="no commit CID"),
    pytest.param(dagcbor.encode({"op": 1, "t": "#commit"}) + b"\xd8\x2a\x41\x00", id="body not a map"),
    pytest.param(b"\xff\xff", id="not CBOR"),
])
def test_hostile_frames_are_refused(bad):
    with pytest.raises(StreamFormatError):
        decode_frame(bad)


def test_websocket_url():
    assert websocket_url("https://pds.example/", 5) == "wss://pds.example/xrpc/com.atproto.sync.subscribeRepos?cursor=5"
    assert websocket_url("http://localhost:2583", None) == "ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos"


def test_a_real_pds_stream_yields_the_commits_of_new_records(pds):
    account = pds.create_account(handle())
    rkeys = pds.create_records(account, "app.bsky.feed.post",
                               [{"text": f"p{n}", "createdAt": "2026-12-04T10:00:00Z"} for n in range(3)])
    wanted, seen = {("app.bsky.feed.post", rkey) for rkey in rkeys}, set()
    with Subscription(pds.pds.url, cursor=0) as subscription:
        while not wanted <= seen and (event := subscription.next(timeout=10)) is not None:
            if isinstance(event, CommitEvent) and event.repo == account.did:
                seen |= {op.collection_rkey for op in event.ops if op.action == "create"}
    assert wanted <= seen
    assert subscription.malformed == 0
