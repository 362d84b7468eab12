"""A blob's transfer against a PDS on loopback that answers what no real one should: each case must end,
failing the blob or the account with a clear reason, not hold the run."""

import json
from contextlib import contextmanager

import pytest

from migration_assets.atproto.cid import CID, RAW
from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.blobs.store import FAILED_BLOBS_LISTED, ProgressData
from migration_assets.blobs.transfer import (
    CHECK_NO_FAILED_BLOBS, BlobFailed, JobFailure, TransferSettings, list_missing_blobs, list_old_blobs,
    migrate_blobs, transfer_with_retries, verify_account,
)
from tests.atproto.loopback import Reply, json_reply, serve, xrpc_error
from tests.ending import ends_within

DID = "did:plc:" + "a" * 24


GET_BLOB, UPLOAD_BLOB = "/xrpc/com.atproto.sync.getBlob", "/xrpc/com.atproto.repo.uploadBlob"


@pytest.fixture
def servers():
    yield from serve()


def pdses(servers, count: int = 2):
    """Loopback PDSes that let the account log in."""
    started = [servers() for _ in range(count)]
    for pds in started:
        pds.route("POST", "/xrpc/com.atproto.server.createSession", json_reply(
            {"did": DID, "handle": "alice.test", "accessJwt": "access", "refreshJwt": "refresh"}))
    return started


@contextmanager
def logged_in(*servers, **options):
    clients = [XrpcClient(server.url, allow_private_hosts=True, **options) for server in servers]
    try:
        for client in clients:
            client.login(DID, "password")
        yield clients
    finally:
        for client in clients:
            client.close()


def uploaded(cid: str, size: int) -> Reply:
    return json_reply({"blob": {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/png", "size": size}})


def test_a_rate_limit_answered_without_a_429_is_waited_out_within_the_limit_then_fails_the_job(servers, tmp_path):
    """`RateLimitExceeded` with status 400 and no reset: each answer is a short pause that uses no try.
    Without a limit on those waits in all, the blob (and its account's slot) was held for as long as
    the host kept answering so."""
    old, new = pdses(servers)
    old.route("GET", GET_BLOB, xrpc_error(400, "RateLimitExceeded", "slow down"))
    settings = TransferSettings(work_dir=tmp_path, max_rate_limit_sleep=35)
    slept: list[float] = []
    with logged_in(old, new) as (source, target):
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
    [pds] = pdses(servers, 1)
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

    pds.route("GET", "/xrpc/com.atproto.sync.listBlobs", list_blobs)
    pds.route("GET", "/xrpc/com.atproto.repo.listMissingBlobs", list_missing)
    with logged_in(pds) as (client,):
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
    old, new = pdses(servers)
    data = b"blob bytes"
    cid = str(CID.for_block(data, RAW))
    old.route("GET", GET_BLOB, Reply(200, data, {"Content-Type": content_type}))
    blob = {"ref": {"$link": cid}, **reply} if isinstance(reply, dict) and "ref" not in reply else reply
    new.route("POST", UPLOAD_BLOB, json_reply({"blob": blob}))
    settings = TransferSettings(work_dir=tmp_path, attempts=1)
    with logged_in(old, new) as (source, target):
        kind, value = ends_within(30, lambda: transfer_with_retries(source, target, DID, cid, settings, sleep=lambda s: None),
                                  lambda: "transferring")
    sent_type = new.calls(UPLOAD_BLOB)[0].headers["content-type"]
    assert sent_type == (content_type if content_type.isascii() else "application/octet-stream")
    if stored == "size not a number":
        assert kind == "returned" and (value.size, value.acknowledged_size) == (len(data), None)
    else:
        assert kind == "raised" and isinstance(value, BlobFailed) and "stored the upload as" in str(value), value


def test_a_blob_dripped_byte_by_byte_fails_that_blob_at_its_deadline(servers, tmp_path):
    """Each byte comes within the per-read timeout; before, the download went on for as long as the host
    dripped (here 1,000 bytes, 0.2 s apart: 200 s). Now each try is cut at its deadline, and the blob
    fails: the host answers, so its account's other blobs go on."""
    old, new = pdses(servers)
    data = b"x" * 1000
    cid = str(CID.for_block(data, RAW))
    old.route("GET", GET_BLOB, Reply(200, [bytes([b]) for b in data], chunk_delay=0.2))
    settings = TransferSettings(work_dir=tmp_path, attempts=2, min_bytes_per_second=1e9)
    with logged_in(old, new, timeout=5, deadline_seconds=1) as (source, target):
        kind, error = ends_within(10, lambda: transfer_with_retries(source, target, DID, cid, settings, sleep=lambda s: None),
                                  lambda: f"{len(old.calls(GET_BLOB))} downloads")
    assert kind == "raised" and isinstance(error, BlobFailed), error
    assert f"getBlob of {cid} from the old PDS took longer than its deadline of 1 s" in str(error)
    assert len(old.calls(GET_BLOB)) == 2 and not new.calls(UPLOAD_BLOB)


def test_a_big_blob_at_a_fair_rate_gets_more_than_the_request_deadline(servers, tmp_path):
    """1.5 MB in 0.8 s is past the 0.5 s deadline, but at 1 MB/s and more each byte extends it."""
    old, new = pdses(servers)
    data = bytes(range(256)) * 6144
    cid = str(CID.for_block(data, RAW))
    old.route("GET", GET_BLOB, Reply(200, [data[i:i + 65536] for i in range(0, len(data), 65536)], chunk_delay=0.035))
    new.route("POST", UPLOAD_BLOB, uploaded(cid, len(data)))
    settings = TransferSettings(work_dir=tmp_path, attempts=1, min_bytes_per_second=1e6)
    with logged_in(old, new, deadline_seconds=0.5) as (source, target):
        sent = transfer_with_retries(source, target, DID, cid, settings, sleep=lambda s: None)
    assert (sent.size, sent.acknowledged_size) == (len(data), len(data))
    assert new.calls(UPLOAD_BLOB)[0].body == data


def test_a_blob_the_old_pds_does_not_have_is_asked_for_once(servers, tmp_path):
    """"Blob not found" is final: before, it took every try, with backoff between them."""
    old, new = pdses(servers)
    old.route("GET", GET_BLOB, xrpc_error(400, "InvalidRequest", "Blob not found"))
    settings = TransferSettings(work_dir=tmp_path, attempts=3)
    with logged_in(old, new) as (source, target), pytest.raises(BlobFailed, match="BlobNotFound"):
        transfer_with_retries(source, target, DID, str(CID.for_block(b"gone", RAW)), settings, sleep=lambda s: None)
    assert len(old.calls(GET_BLOB)) == 1


def test_a_new_pds_listing_many_blobs_the_old_one_lacks_fails_each_once_and_lists_the_first(servers, tmp_path):
    """1,200 CIDs only the new PDS lists as missing: each is asked of the old PDS once and fails. The
    progress written every 10 blobs lists the first FAILED_BLOBS_LISTED and counts them all: before,
    every write carried the whole list so far (quadratic in a hostile list), each CID took 3 tries."""
    old, new = pdses(servers)
    fake = [str(CID.for_block(n.to_bytes(4, "big"), RAW)) for n in range(1200)]

    def missing(request):
        start = int(request.query.get("cursor", ["0"])[0])
        page = fake[start:start + 1000]
        return json_reply({"blobs": [{"cid": cid, "recordUri": f"at://{DID}/x/{n}"} for n, cid in enumerate(page)],
                           **({"cursor": str(start + 1000)} if page else {})})

    old.route("GET", "/xrpc/com.atproto.sync.listBlobs", json_reply({"cids": []}))
    old.route("GET", GET_BLOB, xrpc_error(400, "InvalidRequest", "Blob not found"))
    new.route("GET", "/xrpc/com.atproto.repo.listMissingBlobs", missing)
    new.route("GET", "/xrpc/com.atproto.server.checkAccountStatus", json_reply({"expectedBlobs": 1200, "importedBlobs": 0}))
    settings = TransferSettings(work_dir=tmp_path, attempts=3)
    written: list[int] = []
    with logged_in(old, new) as (source, target):
        result = migrate_blobs(source, target, DID, settings, ProgressData(),
                               lambda progress: written.append(len(progress.failed_blobs)), sleep=lambda s: None)
        checks = {check.name: check for check in verify_account(target, result)}
    assert result.progress.failures == 1200 and len(result.progress.failed_blobs) == FAILED_BLOBS_LISTED
    assert [f.cid for f in result.progress.failed_blobs] == fake[:FAILED_BLOBS_LISTED]
    assert len(old.calls(GET_BLOB)) == 1200 and max(written) == FAILED_BLOBS_LISTED
    failed = checks[CHECK_NO_FAILED_BLOBS]
    assert not failed.passed and failed.summary.startswith("1200 blobs failed") and failed.metadata["failed_blobs"] == 1200


def test_an_old_pds_that_never_answers_fails_the_account_not_each_blob(servers, tmp_path):
    """No headers come in time: the host is down for every blob, so after the blob's tries the account
    fails (and is run again later), rather than each of its blobs waiting out a deadline in turn."""
    old, new = pdses(servers)
    old.route("GET", GET_BLOB, Reply(200, b"late", delay=10))
    settings = TransferSettings(work_dir=tmp_path, attempts=2)
    with logged_in(old, new, timeout=5, retries=0, deadline_seconds=1) as (source, target):
        kind, error = ends_within(10, lambda: transfer_with_retries(
            source, target, DID, str(CID.for_block(b"late", RAW)), settings, sleep=lambda s: None), lambda: "waiting")
    assert kind == "raised" and isinstance(error, JobFailure) and "took longer than its deadline" in str(error), error


def test_blobs_slow_one_after_another_fail_the_account_after_three(servers, tmp_path):
    """Each blob cut as too slow fails only itself; three in a row say the old PDS is slow for all of
    them: the job fails (run again later) instead of spending a deadline on every blob of the account."""
    old, new = pdses(servers)
    blobs = [bytes([n]) * 200 for n in range(5)]
    cids = [str(CID.for_block(data, RAW)) for data in blobs]
    old.route("GET", "/xrpc/com.atproto.sync.listBlobs", json_reply({"cids": cids}))
    old.route("GET", GET_BLOB, Reply(200, [bytes([b]) for b in blobs[0]], chunk_delay=0.05))
    new.route("GET", "/xrpc/com.atproto.repo.listMissingBlobs",
              json_reply({"blobs": [{"cid": cid, "recordUri": "at://x"} for cid in cids]}))
    settings = TransferSettings(work_dir=tmp_path, attempts=1, min_bytes_per_second=1e9)
    written: list[ProgressData] = []
    with logged_in(old, new, deadline_seconds=0.5) as (source, target):
        kind, error = ends_within(20, lambda: migrate_blobs(source, target, DID, settings, ProgressData(),
                                                            lambda p: written.append(p.model_copy(deep=True)),
                                                            sleep=lambda s: None), lambda: "transferring")
    assert kind == "raised" and isinstance(error, JobFailure) and "3 blobs in a row came slower" in str(error), error
    assert len(old.calls(GET_BLOB)) == 3 and written[-1].failures == 3
