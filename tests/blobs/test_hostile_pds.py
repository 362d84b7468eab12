"""A blob's transfer against a PDS on loopback that answers what no real one should: each case must end,
failing the blob or the account with a clear reason, not hold the run."""

import json

import pytest

from migration_assets.atproto.cid import CID, RAW
from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.blobs.transfer import (
    BlobFailed, JobFailure, TransferSettings, list_missing_blobs, list_old_blobs, transfer_with_retries,
)
from tests.atproto.loopback import Reply, json_reply, serve, xrpc_error
from tests.ending import ends_within

DID = "did:plc:" + "a" * 24


@pytest.fixture
def servers():
    yield from serve()


def test_a_rate_limit_answered_without_a_429_is_waited_out_within_the_limit_then_fails_the_job(servers, tmp_path):
    """`RateLimitExceeded` with status 400 and no reset: each answer is a short pause that uses no try.
    Without a limit on those waits in all, the blob (and its account's slot) was held for as long as
    the host kept answering so."""
    old, new = servers(), servers()
    for pds in (old, new):
        pds.route("POST", "/xrpc/com.atproto.server.createSession", json_reply(
            {"did": DID, "handle": "alice.test", "accessJwt": "access", "refreshJwt": "refresh"}))
    old.route("GET", "/xrpc/com.atproto.sync.getBlob", xrpc_error(400, "RateLimitExceeded", "slow down"))
    settings = TransferSettings(work_dir=tmp_path, max_rate_limit_sleep=35)
    slept: list[float] = []
    with XrpcClient(old.url, allow_private_hosts=True) as source, XrpcClient(new.url, allow_private_hosts=True) as target:
        source.login(DID, "password")
        target.login(DID, "password")
        kind, error = ends_within(30, lambda: transfer_with_retries(
            source, target, DID, str(CID.for_block(b"blob", RAW)), settings, sleep=slept.append),
            lambda: f"{len(slept)} rate-limit waits")
    assert kind == "raised" and isinstance(error, JobFailure), error
    assert "rate-limits us" in str(error) and "run again later" in str(error)
    assert 1 <= len(slept) <= 4 and sum(slept) <= 35


@pytest.mark.parametrize("listing", ["cursors going round", "pages repeating under new cursors"])
def test_a_listing_that_never_ends_is_listed_once(servers, listing):
    """listBlobs and listMissingBlobs end at a cursor seen before or a page with nothing new: before,
    only a cursor repeated by the very next page ended them, and these two listed without end."""
    pds = servers()
    cids = [str(CID.for_block(bytes([n]), RAW)) for n in range(4)]
    pages = {None: (cids[:2], "A"), "A": (cids[2:], "B"), "B": (cids[:2], "A")}  # A, B, A, B, ...
    asked: list = []

    def list_blobs(request):
        cursor = request.query.get("cursor", [None])[0]
        asked.append(cursor)
        if listing == "cursors going round":
            items, after = pages[cursor]
        else:
            items, after = cids, f"c{len(asked)}"  # the same page under an ever new cursor
        return json_reply({"cids": items, "cursor": after})

    def list_missing(request):
        page = list_blobs(request)
        return json_reply({"blobs": [{"cid": cid, "recordUri": "at://x"} for cid in json.loads(page.body)["cids"]],
                           "cursor": json.loads(page.body)["cursor"]})

    pds.route("POST", "/xrpc/com.atproto.server.createSession", json_reply(
        {"did": DID, "handle": "alice.test", "accessJwt": "access", "refreshJwt": "refresh"}))
    pds.route("GET", "/xrpc/com.atproto.sync.listBlobs", list_blobs)
    pds.route("GET", "/xrpc/com.atproto.repo.listMissingBlobs", list_missing)
    with XrpcClient(pds.url, allow_private_hosts=True) as client:
        client.login(DID, "password")
        listed = [ends_within(30, lambda: listing_of(client), lambda: f"{len(asked)} pages")
                  for listing_of in (lambda c: list_old_blobs(c, DID), list_missing_blobs)]
    assert listed == [("returned", cids)] * 2 and len(asked) <= 8


@pytest.mark.parametrize(("reply", "content_type", "stored"), [
    ({"size": "10"}, "image/\xe9", "size not a number"),
    ("x", "image/png", "blob not a map"),
    ({"ref": "x"}, "image/png; charset=binary", "ref not a map"),
], ids=["size as text, non-ASCII type", "blob not a map", "ref not a map"])
def test_odd_upload_answers_fail_the_blob_or_show_as_a_size_mismatch_not_an_error(servers, tmp_path, reply, content_type,
                                                                                      stored):
    """An upload answer of the wrong shape: before, `size` as text, `blob` or `ref` not a map raised
    TypeError or AttributeError outside the blob's handling (the account failed), and a Content-Type that
    is not ASCII failed the upload's request. Now the blob fails, or its size shows as not acknowledged;
    the type sent on is a media type or application/octet-stream."""
    old, new = servers(), servers()
    data = b"blob bytes"
    cid = str(CID.for_block(data, RAW))
    for pds in (old, new):
        pds.route("POST", "/xrpc/com.atproto.server.createSession", json_reply(
            {"did": DID, "handle": "alice.test", "accessJwt": "access", "refreshJwt": "refresh"}))
    old.route("GET", "/xrpc/com.atproto.sync.getBlob", Reply(200, data, {"Content-Type": content_type}))
    blob = {"ref": {"$link": cid}, **reply} if isinstance(reply, dict) and "ref" not in reply else reply
    new.route("POST", "/xrpc/com.atproto.repo.uploadBlob", json_reply({"blob": blob}))
    settings = TransferSettings(work_dir=tmp_path, attempts=1)
    with XrpcClient(old.url, allow_private_hosts=True) as source, XrpcClient(new.url, allow_private_hosts=True) as target:
        source.login(DID, "password")
        target.login(DID, "password")
        kind, value = ends_within(30, lambda: transfer_with_retries(source, target, DID, cid, settings, sleep=lambda s: None),
                                  lambda: "transferring")
    sent_type = new.calls("/xrpc/com.atproto.repo.uploadBlob")[0].headers["content-type"]
    assert sent_type == (content_type if content_type.isascii() else "application/octet-stream")
    if stored == "size not a number":
        assert kind == "returned" and (value.size, value.acknowledged_size) == (len(data), None)
    else:
        assert kind == "raised" and isinstance(value, BlobFailed) and "stored the upload as" in str(value), value
