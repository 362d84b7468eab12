"""did:key parsing and commit signature checks on both curves, low-S only."""

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import CommitError
from migration_assets.atproto.signature import (
    DidKeyError,
    PublicKey,
    SignatureError,
    b58decode,
    b58encode,
    parse_did_key,
    unsigned_commit_bytes,
    verify_commit,
    verify_signature,
)
from tests.atproto.builders import private_key, sign, signed_commit

# Example keys from the atproto cryptography spec ("Public Key Encoding").
SPEC_K256 = "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"
SPEC_P256 = "did:key:zDnaembgSGUhZULN2Caob4HLJPaxBh92N7rtH21TErzqf8HQo"
DATA = CID.for_block(b"mst root")
CURVES = [(ec.SECP256K1(), "did:key:zQ3sh"), (ec.SECP256R1(), "did:key:zDn")]


def did_key(key: ec.EllipticCurvePrivateKey) -> str:
    return PublicKey(key.public_key()).did_key()


def test_spec_keys_parse_and_round_trip():
    assert parse_did_key(SPEC_K256).curve == "secp256k1"
    assert parse_did_key(SPEC_P256).curve == "secp256r1"
    assert parse_did_key(SPEC_K256).did_key() == SPEC_K256
    assert parse_did_key(SPEC_P256.removeprefix("did:key:")).did_key() == SPEC_P256  # bare publicKeyMultibase


@pytest.mark.parametrize("curve, prefix", CURVES)
def test_commits_verify_on_both_curves(curve, prefix):
    key = private_key(curve, 0xA7)
    text = did_key(key)
    assert text.startswith(prefix)
    verify_commit(signed_commit(key, DATA), text)
    verify_commit(signed_commit(key, DATA), parse_did_key(text))


@pytest.mark.parametrize("curve, prefix", CURVES)
def test_high_s_is_rejected_though_mathematically_valid(curve, prefix):
    key = private_key(curve, 0xB0B)
    message = b"unsigned commit bytes"
    high = sign(key, message, high_s=True)
    r, s = int.from_bytes(high[:32], "big"), int.from_bytes(high[32:], "big")
    key.public_key().verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))  # plain ECDSA: ok
    with pytest.raises(SignatureError, match="high-S"):
        verify_signature(did_key(key), message, high)
    verify_signature(did_key(key), message, sign(key, message))


@pytest.mark.parametrize("curve, prefix", CURVES)
def test_bad_signatures_are_rejected(curve, prefix):
    key = private_key(curve, 0xC0FFEE)
    commit = signed_commit(key, DATA)
    # Tampered content: a different rev than the one signed.
    obj = dagcbor.decode(commit)
    obj["rev"] = "3l5zzzzzzzz22"
    with pytest.raises(SignatureError, match="does not verify"):
        verify_commit(dagcbor.encode(obj), did_key(key))
    # Right content, someone else's key (on either curve).
    for other_curve, _ in CURVES:
        with pytest.raises(SignatureError, match="does not verify"):
            verify_commit(commit, did_key(private_key(other_curve, 0xD00D)))
    message, sig = unsigned_commit_bytes(commit)
    with pytest.raises(SignatureError, match="64"):
        verify_signature(did_key(key), message, sig[:63])
    with pytest.raises(SignatureError, match="out of range"):
        verify_signature(did_key(key), message, sig[:32] + b"\x00" * 32)


def test_unsigned_bytes_are_the_commit_without_sig():
    key = private_key(ec.SECP256K1(), 0xA7)
    commit = signed_commit(key, DATA)
    message, sig = unsigned_commit_bytes(commit)
    expected = {k: v for k, v in dagcbor.decode(commit).items() if k != "sig"}
    assert message == dagcbor.encode(expected) and len(sig) == 64
    with pytest.raises(CommitError, match="sig"):
        unsigned_commit_bytes(dagcbor.encode(expected))


@pytest.mark.parametrize(
    "text, message",
    [
        ("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK", "neither secp256k1"),  # ed25519 (W3C example)
        ("did:key:f" + "e701" + "02" * 33, "base58btc"),
        ("did:key:z0OIl", "base58btc character"),
        ("did:key:z" + b58encode(b"\xe7\x01" + b"\x02" * 32), "33-byte"),
        ("did:key:z" + b58encode(b"\xe7\x01\x02" + b"\xff" * 32), "not a point"),  # x >= field prime
    ],
)
def test_bad_keys(text, message):
    with pytest.raises(DidKeyError, match=message):
        parse_did_key(text)


def test_base58_round_trip_keeps_leading_zeros():
    for data in (b"", b"\x00", b"\x00\x00\x01\xff", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"  # the Bitcoin wiki / base58 test-suite vector
