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
