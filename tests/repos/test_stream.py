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
REV, SINCE = "3kbaaaaaaaa22", "3kaaaaaaaaa22"  # TIDs, as revs are


def frame(t: str | None, body: dict, op: int = 1) -> bytes:
    header = {"op": op} | ({"t": t} if t else {})
    return dagcbor.encode(header) + dagcbor.encode(body)


def commit_body(**changes) -> dict:
    return {
        "seq": 7, "rebase": False, "tooBig": False, "repo": "did:plc:abc", "commit": COMMIT, "rev": REV,
        "since": SINCE, "blocks": b"car", "blobs": [], "time": "2026-12-04T10:00:00.000Z",
        "ops": [{"action": "create", "path": "app.bsky.feed.post/3kx", "cid": RECORD, "prev": None}],
        "prevData": RECORD,
    } | changes


def test_commit_frame_decodes_into_a_typed_event():
    event = decode_frame(frame("#commit", commit_body()))
    assert isinstance(event, CommitEvent)
    assert (event.seq, event.repo, event.rev, event.since, event.commit, event.prev_data) == (7, "did:plc:abc", REV, SINCE, COMMIT, RECORD)
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
    pytest.param(frame("#commit", commit_body(time="2026-12-04T10:00:00.000")), id="time without its zone"),
    pytest.param(frame("#identity", {"seq": 1, "did": "did:plc:a", "time": "2026-12-04T10:00:00"}), id="identity time without its zone"),
    # What the follower writes to PostgreSQL, which would refuse it and fail the whole batch, every run:
    pytest.param(frame("#commit", commit_body(seq=1 << 63)), id="seq past bigint"),
    pytest.param(frame("#commit", commit_body(seq=-1)), id="negative seq"),
    pytest.param(frame("#commit", commit_body(repo="did:plc:a\0b")), id="U+0000 in the DID"),
    pytest.param(frame("#commit", commit_body(repo="did:web:" + "a" * 2048)), id="DID over 2 KB"),
    pytest.param(frame("#commit", commit_body(repo="alice")), id="not a DID"),
    pytest.param(frame("#commit", commit_body(rev="3kb\0")), id="U+0000 in the rev"),
    pytest.param(frame("#commit", commit_body(since="yesterday")), id="since not a TID"),
    pytest.param(frame("#sync", {"seq": 1, "did": "did:plc:a", "rev": "x" * 5000, "blocks": b"",
                                 "time": "2026-12-04T10:00:00Z"}), id="sync rev not a TID"),
    pytest.param(frame("#account", {"seq": 2, "did": "did:plc:a\0", "active": False, "time": "2026-12-04T10:00:00Z"}),
                 id="U+0000 in an account's DID"),
    pytest.param(frame("#account", {"seq": 2, "did": "did:plc:a", "active": False, "status": "gone\0",
                                    "time": "2026-12-04T10:00:00Z"}), id="U+0000 in an account status"),
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


def hostile_commit_frames():
    """#commit frames, valid and not, for the libipld fast path against the cbor2 decoding."""
    import random

    import cbor2

    rng = random.Random(3)
    changes = [
        {}, {"prevData": None}, {"since": None}, {"blobs": [RECORD, COMMIT]}, {"blocks": b"\x01q\x12 car"},
        {"blocks": bytes(CID.for_block(b"x"))}, {"blocks": b""}, {"blocks": "text"}, {"commit": b"\x01q"},
        {"commit": bytes(COMMIT)}, {"prevData": bytes(RECORD)}, {"blobs": [b"bytes"]}, {"blobs": None},
        {"ops": [{"action": "delete", "path": "a.b.c/x", "cid": None}]}, {"ops": [{"action": "update", "path": "a.b.c/x",
         "cid": RECORD, "prev": COMMIT}]}, {"ops": [{"action": "create", "path": "a.b.c/x", "cid": bytes(RECORD)}]},
        {"ops": [{"action": "create", "path": "a.b.c/x", "cid": RECORD, "extra": 1}]}, {"ops": [5]}, {"ops": {}},
        {"seq": True}, {"seq": 2**40}, {"seq": -1}, {"tooBig": 1}, {"rebase": None}, {"time": "yesterday"},
        {"repo": b"did"}, {"rev": 5}, {"extra": "field"}, {"since": RECORD},
        {"commit": CID(0x70, b"\x00" * 32)}, {"time": "2026-12-04T10:00:00.000+01:00"}, {"time": "2026-12-04T10:00:00"},
    ]
    for change in changes:
        body = commit_body(**change)
        for drop in (None, "blobs", "prevData", "since", "rebase", "tooBig", "ops"):
            value = {k: v for k, v in body.items() if k != drop}
            yield frame("#commit", value)
            items = list(value.items())
            rng.shuffle(items)  # out of canonical order: the reference decides
            yield dagcbor.encode({"op": 1, "t": "#commit"}) + cbor2.dumps(
                dict(items), default=lambda encoder, v: encoder.encode(cbor2.CBORTag(42, b"\x00" + bytes(v))))
    good = frame("#commit", commit_body())
    yield good + b"\x00"
    yield frame("#commit", commit_body()) + frame("#commit", commit_body())
    yield dagcbor.encode({"op": True, "t": "#commit"}) + dagcbor.encode(commit_body())
    yield dagcbor.encode({"op": 1, "t": "#commit", "x": 1}) + dagcbor.encode(commit_body())
    for _ in range(300):
        spot = rng.randrange(len(good))
        yield good[:spot] + bytes([rng.randrange(256)]) + good[spot + 1:]


def test_commit_frames_decode_through_libipld_exactly_as_through_the_reference(monkeypatch):
    from migration_assets.repos import stream

    def outcome(data):
        try:
            return "ok", decode_frame(data)
        except (StreamFormatError, StreamError) as exc:
            return type(exc).__name__, str(exc)

    frames = list(hostile_commit_frames())
    fast = [outcome(f) for f in frames]
    taken = sum(stream._compiled_commit_frame(f) is not None for f in frames)
    monkeypatch.setattr(stream, "_compiled_commit_frame", lambda data: None)
    assert fast == [outcome(f) for f in frames]
    assert 50 < taken < len(frames) / 2
    assert sum(kind == "ok" for kind, _ in fast) > 100
