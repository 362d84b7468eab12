"""IdentityResolver against a PLC directory and a did:web host served on loopback."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto.identity import (
    DidDocument,
    DidNotFound,
    DidResolutionFailed,
    DidTombstoned,
    IdentityResolver,
    InvalidDid,
    InvalidDidDocument,
    UnsupportedDidMethod,
    parse_document,
)
from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.atproto.signature import PublicKey
from migration_assets.atproto.xrpc import PrivateHostRefused, RateLimited
from tests.atproto.loopback import LoopbackServer, Reply, json_reply
from tests.ending import ends_within

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
KEY = PublicKey(ec.derive_private_key(0xC0FFEE, ec.SECP256K1()).public_key()).did_key().removeprefix("did:key:")
P256_KEY = PublicKey(ec.derive_private_key(0xBEEF, ec.SECP256R1()).public_key()).did_key().removeprefix("did:key:")


def document(did: str = DID, pds: str = "https://pds.example.com", key: str = KEY, **overrides) -> dict:
    doc = {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": ["at://alice.example.com"],
        "verificationMethod": [
            {"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": key}
        ],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }
    doc.update(overrides)
    return doc


@pytest.fixture
def plc(servers) -> LoopbackServer:
    return servers()


def resolver_for(plc: LoopbackServer, **kwargs) -> IdentityResolver:
    kwargs.setdefault("allow_private_hosts", True)
    return IdentityResolver(plc.url, **kwargs)


def test_plc_document_resolves_to_pds_and_key(plc):
    plc.route("GET", f"/{DID}", json_reply(document()))
    with resolver_for(plc) as resolver:
        doc = resolver.resolve(DID)
    assert doc == DidDocument(id=DID, also_known_as=["at://alice.example.com"],
                              pds_endpoint="https://pds.example.com", signing_key=KEY)
    assert doc.handle == "alice.example.com"
    assert doc.public_key().curve == "secp256k1"


def test_plc_url_from_environment(plc, monkeypatch):
    monkeypatch.setenv("ATPROTO_PLC_URL", plc.url + "/")
    plc.route("GET", f"/{DID}", json_reply(document(key=P256_KEY)))
    with IdentityResolver(allow_private_hosts=True) as resolver:
        assert resolver.resolve(DID).public_key().curve == "secp256r1"


@pytest.mark.parametrize(
    ("reply", "error", "words"),
    [
        (json_reply({"message": "DID not registered"}, 404), DidNotFound, "404"),
        (json_reply({"message": "DID not available"}, 410), DidTombstoned, "tombstoned"),
        (Reply(500, b"boom"), DidResolutionFailed, "HTTP 500"),
        (Reply(200, b"not json"), InvalidDidDocument, "not JSON"),
        (Reply(200, b"[" * 100_000), InvalidDidDocument, "not JSON"),  # too deep to decode: RecursionError
        (json_reply(["a", "list"]), InvalidDidDocument, "not a DID document"),
        (json_reply(document(did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")), InvalidDidDocument, "not the DID requested"),
        (json_reply(document(service=[])), InvalidDidDocument, "no #atproto_pds"),
        (json_reply(document(service=[{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": "https://x"}])),
         InvalidDidDocument, "type 'Other'"),
        (json_reply(document(pds="https://pds.example.com/some/path")), InvalidDidDocument, "origin"),
        (json_reply(document(pds="ftp://pds.example.com")), InvalidDidDocument, "origin"),
        # The host keys the shared rate limits (a primary key: PostgreSQL refuses a 3 KB one)
        (json_reply(document(pds="https://" + "a" * 3000 + ".com")), InvalidDidDocument, "plain origin"),
        (json_reply(document(pds="https://user:pw@pds.example.com")), InvalidDidDocument, "plain origin"),
        (json_reply(document(verificationMethod=[])), InvalidDidDocument, "no #atproto verification method"),
        (json_reply(document(key="zNotAKey")), InvalidDidDocument, "#atproto key"),
        # jsonb can't store U+0000: stored as it came, the document would fail the batch that saved it
        (json_reply(document(alsoKnownAs=["at://alice\u0000.example.com"])), InvalidDidDocument, "U\\+0000"),
        (Reply(200, b'{"id": "%s", "alsoKnownAs": ["at://\\ud800"]}' % DID.encode()), InvalidDidDocument, "surrogate"),
    ],
)
def test_plc_failures_name_what_is_wrong(plc, reply, error, words):
    plc.route("GET", f"/{DID}", reply)
    with resolver_for(plc, retries=1) as resolver, pytest.raises(error, match=words) as raised:
        resolver.resolve(DID)
    assert raised.value.did == DID


def test_transient_plc_failure_is_retried(plc):
    plc.route("GET", f"/{DID}", [Reply(503, b"busy"), json_reply(document())])
    with resolver_for(plc, retries=2) as resolver:
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
    assert len(plc.calls(f"/{DID}")) == 2


def test_cache_ttl_and_invalidate(plc):
    plc.route("GET", f"/{DID}", [json_reply(document()), json_reply(document(pds="https://moved.example.com"))])
    with resolver_for(plc) as resolver:
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
        assert len(plc.calls(f"/{DID}")) == 1
        resolver.invalidate(DID)
        assert resolver.resolve(DID).pds_endpoint == "https://moved.example.com"
    with resolver_for(plc, ttl_seconds=0) as uncached:
        uncached.resolve(DID)
        uncached.resolve(DID)
    assert len(plc.calls(f"/{DID}")) == 4


def test_did_web_with_port_on_loopback(plc, servers):
    web = servers()
    did = f"did:web:localhost%3A{web.port}"
    web.route("GET", "/.well-known/did.json", json_reply(document(did=did, pds=f"http://localhost:{web.port}")))
    with resolver_for(plc) as resolver:
        doc = resolver.resolve(did)
    assert doc.pds_endpoint == f"http://localhost:{web.port}" and doc.id == did


def test_did_web_on_loopback_refused_unless_private_hosts_allowed(plc, servers, monkeypatch):
    monkeypatch.delenv("ATPROTO_ALLOW_PRIVATE_HOSTS", raising=False)
    web = servers()
    did = f"did:web:localhost%3A{web.port}"
    web.route("GET", "/.well-known/did.json", json_reply(document(did=did)))
    with IdentityResolver(plc.url) as resolver, pytest.raises(PrivateHostRefused):
        resolver.resolve(did)
    assert web.requests == []


def test_http_pds_endpoint_only_when_private_hosts_allowed():
    doc = document(pds="http://pds.example.com")
    assert parse_document(DID, doc, allow_http_endpoint=True).pds_endpoint == "http://pds.example.com"
    with pytest.raises(InvalidDidDocument, match="https origin"):
        parse_document(DID, doc)


@pytest.mark.parametrize(
    ("did", "error"),
    [
        ("did:key:zQ3shabc", UnsupportedDidMethod),
        ("did:plc:short", InvalidDid),
        ("did:web:example.com:user:alice", InvalidDid),
        ("alice.bsky.social", InvalidDid),
    ],
)
def test_unresolvable_dids(plc, did, error):
    with resolver_for(plc) as resolver, pytest.raises(error):
        resolver.resolve(did)
    assert plc.requests == []


# --- hostile hosts: slow drips and huge documents; the shared rate limit; re-resolving ---


def test_a_document_dripped_byte_by_byte_is_cut_at_the_deadline(plc, servers):
    """Every byte comes within the per-read timeout, so only a whole-request deadline ends the fetch: the
    last 60 bytes come one every 0.7 s (about 40 s), the deadline is 1.5 s."""
    web = servers()
    did = f"did:web:localhost%3A{web.port}"
    body = json.dumps(document(did=did)).encode()
    drip = [body[:-60]] + [bytes([b]) for b in body[-60:]]
    web.route("GET", "/.well-known/did.json", Reply(200, drip, {"Content-Type": "application/json"},
                                                    chunk_delay=0.7))
    with resolver_for(plc, retries=0, deadline_seconds=1.5) as resolver:
        with pytest.raises(DidResolutionFailed, match="deadline") as raised:
            resolver.resolve(did)
    assert raised.value.did == did


def test_a_directory_sending_early_hints_without_end_is_cut_at_the_deadline(plc):
    """No answer's headers ever end: a 103 every 0.5 s, within the per-read timeout. Before, the PLC
    fetch waited on them for as long as they came; the deadline was checked between body chunks only."""
    hints = [b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"] * 200
    plc.route("GET", f"/{DID}", Reply(raw=hints, chunk_delay=0.5))
    with resolver_for(plc, retries=0, deadline_seconds=1.5) as resolver:
        kind, error = ends_within(6, lambda: resolver.resolve(DID), lambda: "waiting for the answer")
    assert kind == "raised" and isinstance(error, DidResolutionFailed), error
    assert "ATPROTO_DID_FETCH_DEADLINE_SECONDS" in str(error)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_10_mb_document_is_refused(plc, chunked):
    padding = "x" * (10 * 1024 * 1024)
    body = json.dumps(document(alsoKnownAs=[f"at://{padding}"])).encode()
    parts = [body[i:i + 65536] for i in range(0, len(body), 65536)] if chunked else body
    plc.route("GET", f"/{DID}", Reply(200, parts, {"Content-Type": "application/json"}))
    with resolver_for(plc, retries=0) as resolver, pytest.raises(InvalidDidDocument, match="larger than"):
        resolver.resolve(DID)


def test_resolution_takes_tokens_from_the_shared_host_limiter(plc, target_url):
    plc.route("GET", f"/{DID}", json_reply(document()))
    limiter = HostRateLimiter(target_url, limit=1, window_seconds=600)
    with resolver_for(plc, limiter=limiter, max_rate_limit_wait=0) as resolver:
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
        with pytest.raises(RateLimited) as raised:
            resolver.resolve(DID, fresh=True)  # the host's one token of this window is spent
    assert raised.value.host == f"127.0.0.1:{plc.port}"
    assert len(plc.calls(f"/{DID}")) == 1


def test_a_429_from_the_directory_pauses_the_host_for_everyone(plc, target_url):
    plc.route("GET", f"/{DID}", Reply(429, b"", {"Retry-After": "600"}))
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    with resolver_for(plc, limiter=limiter) as resolver, pytest.raises(RateLimited):
        resolver.resolve(DID)
    other = HostRateLimiter(target_url, limit=100, window_seconds=60)
    with resolver_for(plc, limiter=other, max_rate_limit_wait=0) as resolver, pytest.raises(RateLimited):
        resolver.resolve(DID)
    assert len(plc.calls(f"/{DID}")) == 1


def test_cached_for_the_ttl_then_fresh_on_request(plc, monkeypatch):
    plc.route("GET", f"/{DID}", [json_reply(document()), json_reply(document(pds="https://moved.example.com"))])
    monkeypatch.setenv("ATPROTO_IDENTITY_TTL_SECONDS", "3600")
    with resolver_for(plc) as resolver:
        assert resolver.ttl_seconds == 3600
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
        assert resolver.resolve(DID).pds_endpoint == "https://pds.example.com"
        assert resolver.resolve(DID, fresh=True).pds_endpoint == "https://moved.example.com"
        assert resolver.resolve(DID).pds_endpoint == "https://moved.example.com"  # the fresh one is cached
    assert len(plc.calls(f"/{DID}")) == 2
