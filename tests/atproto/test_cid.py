"""CID parsing, formatting and block verification."""

import base64
import hashlib
import random

import pytest

from migration_assets.atproto.cid import (
    CID,
    DAG_CBOR,
    RAW,
    CidError,
    CidMismatch,
    link_text,
    decode_varint,
    encode_varint,
    link_from_tag42,
    read_cid,
)

# sha256("hello") = 2cf24dba...; its raw-codec CIDv1 is the usual IPFS example.
HELLO = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
# The "cid1" record value of the atproto MST tests (packages/repo/tests/mst.test.ts).
CID1 = "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"


def test_known_raw_cid_of_hello():
    cid = CID.for_block(b"hello", RAW)
    assert str(cid) == HELLO
    assert cid.digest == hashlib.sha256(b"hello").digest()
    assert CID.decode(HELLO) == cid


def test_text_and_binary_round_trip():
    cid = CID.decode(CID1)
    assert cid.codec == DAG_CBOR and str(cid) == CID1
    raw = bytes(cid)
    assert raw[:4] == b"\x01\x71\x12\x20" and len(raw) == 36
    assert CID.from_bytes(raw) == cid
    assert {cid: 1}[CID.decode(CID1)] == 1  # hashable, equal by value


def test_read_cid_at_offset_leaves_the_rest():
    cid = CID.decode(CID1)
    data = b"xx" + bytes(cid) + b"block"
    got, end = read_cid(data, 2)
    assert got == cid and data[end:] == b"block"


def test_other_codecs_and_hashes_parse_on_the_slow_path():
    cid = CID(0x70, b"\x01" * 32, 0x1E)  # dag-pb, blake3: not atproto's, but legal CIDv1
    assert CID.from_bytes(bytes(cid)) == cid
    assert CID.decode(str(cid)) == cid
    with pytest.raises(CidError, match="only sha2-256"):
        cid.verify(b"")


@pytest.mark.parametrize(
    "text",
    [
        "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",  # CIDv0 (base58btc)
        "BAFKREIBM6JG3UX5QUMHCN2B3FLC3TYU6DMLB4XA7U5BF44YEGNRJHC4YEQ",  # upper-case base32
        "bafkrei!!",
        "b",
        "",
        HELLO[:-1] + "r",  # same bytes, different trailing bits: non-canonical spelling
        HELLO[:-4],  # digest truncated
    ],
)
def test_bad_text_cids_are_refused(text):
    with pytest.raises(CidError):
        CID.decode(text)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x12\x20" + b"\x00" * 32, "CIDv0"),
        (b"\x02\x71\x12\x20" + b"\x00" * 32, "version 2"),
        (b"\x01\x71\x12\x20" + b"\x00" * 31, "truncated"),
        (b"\x01\x71\x12\x20" + b"\x00" * 33, "stray bytes"),
        (b"\x01\xf1\x00\x12\x20" + b"\x00" * 32, "non-minimal"),
    ],
)
def test_bad_binary_cids_are_refused(raw, message):
    with pytest.raises(CidError, match=message):
        CID.from_bytes(raw)


def test_varints():
    for value in (0, 1, 127, 128, 300, 0x1200, 2**63 - 1):
        encoded = encode_varint(value)
        assert decode_varint(encoded + b"\xff") == (value, len(encoded))
    assert encode_varint(0x1200) == b"\x80\x24"  # P-256 multicodec, as in did:key
    with pytest.raises(CidError, match="longer than 9"):
        decode_varint(b"\xff" * 10)
    with pytest.raises(CidError, match="truncated"):
        decode_varint(b"\xff\xff")


def test_verify_names_the_cid_on_mismatch():
    cid = CID.for_block(b"hello", RAW)
    cid.verify(b"hello")
    with pytest.raises(CidMismatch, match=HELLO) as info:
        cid.verify(b"hellO")
    assert info.value.actual == CID.for_block(b"hellO", RAW)


def test_tag42_needs_the_identity_prefix():
    cid = CID.decode(CID1)
    assert link_from_tag42(b"\x00" + bytes(cid)) == cid
    with pytest.raises(CidError, match="0x00"):
        link_from_tag42(bytes(cid))


def test_text_form_is_multibase_base32_of_the_binary_form():
    rng = random.Random(7)
    cids = [CID(codec, rng.randbytes(32)) for codec in (DAG_CBOR, RAW) for _ in range(50)]
    cids += [CID(DAG_CBOR, rng.randbytes(size)) for size in range(1, 70)]  # malformed sha2-256 sizes too
    for size, cid in enumerate(cids):
        expected = "b" + base64.b32encode(bytes(cid)).decode().lower().rstrip("=")
        assert str(cid) == expected, size
        assert CID.decode(expected) == cid


def test_link_text_is_the_cids_own_text():
    # The repo walk and the stream's check write CIDs as text from their binary form through libipld (a
    # hot path): the same text, also for a CID libipld refuses (a digest of 65 bytes, which
    # a hostile MST node may link to): that one must not raise.
    rng = random.Random(7)
    cids = [CID(codec, rng.randbytes(32)) for codec in (0x71, 0x55) for _ in range(200)]
    cids += [CID(0x71, rng.randbytes(64), hash_code=0x13), CID(0x71, rng.randbytes(65))]
    for cid in cids:
        assert link_text(bytes(cid)) == str(cid)
