"""IdentityResolver against a PLC directory and a did:web host served on loopback."""

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
from migration_assets.atproto.signature import PublicKey
from migration_assets.atproto.xrpc import PrivateHostRefused
from tests.atproto.loopback import LoopbackServer, Reply, json_reply

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
        (json_reply(["a", "list"]), InvalidDidDocument, "not a DID document"),
        (json_reply(document(did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")), InvalidDidDocument, "not the DID requested"),
        (json_reply(document(service=[])), InvalidDidDocument, "no #atproto_pds"),
        (json_reply(document(service=[{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": "https://x"}])),
         InvalidDidDocument, "type 'Other'"),
        (json_reply(document(pds="https://pds.example.com/some/path")), InvalidDidDocument, "origin"),
        (json_reply(document(pds="ftp://pds.example.com")), InvalidDidDocument, "origin"),
        (json_reply(document(verificationMethod=[])), InvalidDidDocument, "no #atproto verification method"),
        (json_reply(document(key="zNotAKey")), InvalidDidDocument, "#atproto key"),
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
