"""DAG-CBOR decoding (cbor2 6), canonical encoding, and atproto's JSON form."""

import json
from typing import Any

import cbor2
import pytest

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID, RAW
from migration_assets.atproto.dagcbor import DagCborError

BLOB = CID.for_block(b"\x89PNG fake image", RAW)


def test_canonical_key_order_is_length_first():
    # DAG-CBOR: shorter keys first, then bytewise: "a" < "c" < "bb".
    assert dagcbor.encode({"bb": 1, "a": 2, "c": 3}) == bytes.fromhex("a3 6161 02 6163 03 626262 01")


def test_links_round_trip_as_tag_42():
    record = {"$type": "app.bsky.feed.post", "text": "hi", "embed": {"ref": BLOB}, "n": -5, "ok": True}
    encoded = dagcbor.encode(record)
    assert bytes.fromhex("d82a582500") + bytes(BLOB) in encoded  # tag 42, bytes(37), 0x00 prefix, CID
    assert dagcbor.decode(encoded) == record
    assert dagcbor.encode(dagcbor.decode(encoded)) == encoded


def test_json_form_uses_link_and_bytes_objects():
    record = {
        "$type": "app.bsky.feed.post",
        "image": {"$type": "blob", "ref": BLOB, "mimeType": "image/png", "size": 15},
        "raw": b"\xfb\xff",
        "tags": ["a", None, 3],
    }
    out: Any = json.loads(dagcbor.to_json_text(dagcbor.encode(record)))
    assert out["image"]["ref"] == {"$link": str(BLOB)}
    assert out["raw"] == {"$bytes": "+/8"}  # standard alphabet, no padding (atproto data model)
    assert out["tags"] == ["a", None, 3]
    assert out["$type"] == "app.bsky.feed.post" and out["image"]["size"] == 15


@pytest.mark.parametrize(
    "data, message",
    [
        (dagcbor.encode({"a": 1}) + b"\x00", "trailing"),
        (cbor2.dumps(cbor2.CBORTag(1, 0)), "tag 1"),  # cbor2 would decode this as a datetime
        (cbor2.dumps(cbor2.CBORTag(28, [])), "tag 28"),  # value sharing
        (cbor2.dumps(cbor2.CBORTag(99, 0)), "tag 99"),
        (cbor2.dumps(cbor2.CBORTag(42, b"\x01\x71")), "0x00"),
        (b"\x9f\x01\xff", "indefinite"),
        (bytes.fromhex("a2 6161 01 6161 02"), "Duplicate"),
        (cbor2.dumps({1: 2}), "map key"),
        (b"\xa1", "premature"),
        (b"", "premature"),
    ],
)
def test_invalid_dag_cbor_is_refused(data, message):
    with pytest.raises(DagCborError, match=message):
        dagcbor.decode(data)


def test_values_outside_the_data_model_are_refused():
    with pytest.raises(DagCborError, match="no floats"):
        dagcbor.encode({"x": 1.5})
    with pytest.raises(DagCborError, match="object"):
        dagcbor.encode({"x": object()})
    with pytest.raises(DagCborError, match="keys must be str"):
        dagcbor.to_json_text(cbor2.dumps({b"k": 1}))
    with pytest.raises(DagCborError, match="Out of range float"):
        dagcbor.to_json_text(cbor2.dumps({"x": float("nan")}))
    with pytest.raises(DagCborError, match="tag 1"):
        dagcbor.to_json_text(cbor2.dumps({"x": cbor2.CBORTag(1, 0)}))


# --- libipld (the fast path) against cbor2 (the reference), on the same vectors -------------------------
# to_json_text and mst.decode_node answer through libipld only where its answer is the reference's:
# the same value, or (leaving it to cbor2) the same refusal. Each vector is run through both.

LINK = CID.for_block(b"a record")


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


VALID = {
    "post": dagcbor.encode({"$type": "app.bsky.feed.post", "text": "héllo ✓ 😀", "createdAt": "2024-05-01T00:00:00Z",
                            "langs": ["en", "fr"], "facets": [{"index": {"byteStart": 0, "byteEnd": 5}}]}),
    "ints": dagcbor.encode({"a": 0, "b": -1, "c": 2**63, "d": -(2**64), "e": 2**64 - 1, "f": 23, "g": 24}),
    "nul": dagcbor.encode({"text": "a\x00b", "quote": 'say "\\u0000"'}),
    "empties": dagcbor.encode({"a": [], "b": {}, "c": "", "d": None, "e": True, "f": False}),
    "link": dagcbor.encode({"$type": "app.bsky.feed.post", "image": {"ref": LINK, "size": 3}}),
    "bytes": dagcbor.encode({"raw": b"\x00\x01", "cidlike": bytes(LINK)}),
    "f64": _hex("a1 6178 fb3ff8000000000000"),
    "f64_third": cbor2.dumps({"x": 1 / 3}),
    "scalar": dagcbor.encode("just a string"),
    "list": dagcbor.encode([1, "two", [3]]),
    "deep_400": b"\x81" * 400 + b"\x01",
    "deep_400_empty": b"\x81" * 400 + b"\x80",
}

HOSTILE = {
    "trailing": dagcbor.encode({"a": 1}) + b"\x00",
    "tag_1": cbor2.dumps(cbor2.CBORTag(1, 0)),
    "tag_28": cbor2.dumps(cbor2.CBORTag(28, [])),
    "tag_99": cbor2.dumps({"x": cbor2.CBORTag(99, 0)}),
    "tag_42_no_prefix": cbor2.dumps(cbor2.CBORTag(42, b"\x01\x71")),
    "tag_42_text": cbor2.dumps(cbor2.CBORTag(42, "bafy")),
    "indefinite_array": b"\x9f\x01\xff",
    "indefinite_map": _hex("bf 6161 01 ff"),
    "duplicate_key": _hex("a2 6161 01 6161 02"),
    "int_key": cbor2.dumps({1: 2}),
    "bytes_key": cbor2.dumps({b"k": 1}),
    "nan": cbor2.dumps({"x": float("nan")}),
    "infinity": cbor2.dumps({"x": float("inf")}),
    "f16": _hex("a1 6178 f93e00"),
    "f32": _hex("a1 6178 fa3fc00000"),
    "keys_bytewise_not_length_first": _hex("a2 6262 01 6161 02"),
    "keys_out_of_order": _hex("a2 6162 01 6161 02"),
    "non_minimal_int": _hex("a1 6161 1800"),
    "non_minimal_length": _hex("a1 6161 7800"),
    "undefined": _hex("a1 6161 f7"),
    "simple_value": _hex("a1 6161 f0"),
    "bad_utf8": _hex("a1 6161 62c328"),
    "truncated": b"\xa1",
    "empty": b"",
    "huge_length": _hex("5bffffffffffffffff"),
    "deep_401": b"\x81" * 401 + b"\x01",
    "deep_5000": b"\x81" * 5000 + b"\x01",
}


def _outcome(fn, data):
    try:
        return "ok", fn(data)
    except DagCborError:
        return "refused", None


@pytest.mark.parametrize("data", [*VALID.values(), *HOSTILE.values()], ids=[*VALID, *HOSTILE])
def test_json_form_through_libipld_is_the_references_or_left_to_it(data):
    reference = _outcome(dagcbor._reference_json_text, data)
    compiled = dagcbor._compiled_json_text(data)
    if compiled is not None:
        assert ("ok", compiled) == reference
    assert _outcome(dagcbor.to_json_text, data) == reference


@pytest.mark.parametrize("name", ["post", "ints", "nul", "empties", "f64", "scalar", "list", "deep_400"])
def test_plain_records_take_the_libipld_path(name):
    # What makes it fast: the common record has no link nor bytes, so libipld answers it alone.
    assert dagcbor._compiled_json_text(VALID[name]) is not None


@pytest.mark.parametrize("name", ["link", "bytes", "deep_401", "keys_out_of_order", "nan", "trailing"])
def test_links_bytes_and_doubtful_blocks_are_left_to_cbor2(name):
    assert dagcbor._compiled_json_text({**VALID, **HOSTILE}[name]) is None


def _links_as_bytes(value):
    if isinstance(value, CID):
        return bytes(value)
    if isinstance(value, list):
        return [_links_as_bytes(item) for item in value]
    if isinstance(value, dict):
        return {key: _links_as_bytes(item) for key, item in value.items()}
    return value


SHALLOW = {name: data for name, data in {**VALID, **HOSTILE}.items() if not name.startswith("deep")}


# decode_canonical leaves nesting to its caller's schema (an MST node is three levels deep): deep vectors
# are the node tests' business (tests/atproto/test_mst.py).
@pytest.mark.parametrize("data", SHALLOW.values(), ids=SHALLOW)
def test_canonical_decoding_is_the_references_with_links_as_bytes(data):
    value = dagcbor.decode_canonical(data)
    if value is not None:
        assert value == _links_as_bytes(dagcbor.decode(data))


def test_canonical_decoding_refuses_what_is_not_canonical():
    for name in ("keys_out_of_order", "non_minimal_int", "non_minimal_length", "f32", "trailing"):
        assert dagcbor.decode_canonical(HOSTILE[name]) is None, name
