"""A record holding U+0000 (legal in atproto strings, refused by jsonb) must not stall its bucket: the
bucket's run stores it and goes on to the next repo. PDS-free: a loopback PLC and PDS serve built CARs."""

import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.signature import PublicKey
from migration_assets.repos.buckets import bucket_key, bucket_of
from tests.atproto.builders import build_mst, car_bytes, private_key, put, signed_commit
from tests.atproto.loopback import Reply, Request, json_reply, serve, xrpc_error
from tests.repos.helpers import discover, ledger_row, run_bucket

KEY = private_key(ec.SECP256K1(), 0xA11CE)
NUL_DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
# The next repo of the same bucket (256 buckets), sorted after the one holding U+0000.
NEXT_DID = next(did for did in (f"did:plc:bbbbbbbbbbbbbbbbbbbb{''.join(s)}"
                                for s in itertools.product("abcdefgh", repeat=4))
                if bucket_of(did, 256) == bucket_of(NUL_DID, 256))
NUL_RECORD = {"$type": "com.example.nul", "text": "before\x00after", "nested": {"k\x00": ["\x00"]}}


def export(did: str, records: dict[str, object]) -> bytes:
    blocks: dict[CID, bytes] = {}
    cids = {key: put(blocks, value) for key, value in records.items()}
    commit_block = signed_commit(KEY, build_mst(cids, blocks), did=did)
    commit = CID.for_block(commit_block)
    return car_bytes([commit], [(commit, commit_block), *blocks.items()])


def document(did: str, pds: str) -> dict:
    key = PublicKey(KEY.public_key()).did_key().removeprefix("did:key:")
    return {
        "id": did,
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                "publicKeyMultibase": key}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }


@pytest.fixture
def servers():
    yield from serve()


def test_a_u0000_record_neither_fails_its_repo_nor_the_next_one(servers, target, instance):
    plc, pds = servers(), servers()
    cars = {
        NUL_DID: export(NUL_DID, {"com.example.nul/1": NUL_RECORD}),
        NEXT_DID: export(NEXT_DID, {"app.bsky.feed.post/1": {"$type": "app.bsky.feed.post", "text": "next"}}),
    }
    for did in cars:
        plc.route("GET", f"/{did}", json_reply(document(did, pds.url)))

    def get_repo(request: Request) -> Reply:
        return Reply(200, cars[request.query["did"][0]], {"Content-Type": "application/vnd.ipld.car"})

    pds.route("GET", "/xrpc/com.atproto.sync.getRepo", get_repo)
    source = {"plc_url": plc.url, "allow_private_hosts": True}
    discover(instance, dids=list(cars), **source)

    result = run_bucket(instance, bucket_key(bucket_of(NUL_DID, 256)), raise_on_error=False, **source)

    assert result.success
    assert {did: ledger_row(target, did)["status"] for did in cars} == {NUL_DID: "synced", NEXT_DID: "synced"}
    raw, = target.execute("SELECT record_cbor FROM records WHERE did = %s", (NUL_DID,)).fetchone()
    assert dagcbor.decode(raw) == NUL_RECORD


def test_an_error_message_holding_u0000_or_a_lone_surrogate_fails_only_its_repo(servers, target, instance):
    """A host's error message is quoted in the repo's last_error, which PostgreSQL's text can't hold
    with U+0000 or a lone surrogate in it: the repo fails with the message (U+FFFD in their place), the
    next one is synced."""
    plc, pds = servers(), servers()
    cars = {NEXT_DID: export(NEXT_DID, {"app.bsky.feed.post/1": {"$type": "app.bsky.feed.post", "text": "next"}})}
    for did in (NUL_DID, NEXT_DID):
        plc.route("GET", f"/{did}", json_reply(document(did, pds.url)))

    def get_repo(request: Request) -> Reply:
        did = request.query["did"][0]
        if did == NUL_DID:
            return xrpc_error(400, "InvalidRequest", "no repo\x00here\ud800")  # JSON: \u0000, \ud800
        return Reply(200, cars[did], {"Content-Type": "application/vnd.ipld.car"})

    pds.route("GET", "/xrpc/com.atproto.sync.getRepo", get_repo)
    source = {"plc_url": plc.url, "allow_private_hosts": True}
    discover(instance, dids=[NUL_DID, NEXT_DID], **source)

    result = run_bucket(instance, bucket_key(bucket_of(NUL_DID, 256)), raise_on_error=False, **source)

    assert result.success
    failed, synced = ledger_row(target, NUL_DID), ledger_row(target, NEXT_DID)
    assert (failed["status"], synced["status"]) == ("error", "synced")
    assert "no repo\ufffdhere\ufffd" in failed["last_error"], failed["last_error"]
