"""DAG-CBOR through cbor2 (>=6): decode with tag 42 as CID, canonical encode, and atproto's JSON form."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import cbor2

from migration_assets.atproto.cid import CID, link_from_tag42
from migration_assets.atproto.errors import AtprotoFormatError

class DagCborError(AtprotoFormatError):
    """Bytes are not valid DAG-CBOR, or a value cannot be represented in it."""


def _link(value: Any, immutable: bool) -> CID:
    return link_from_tag42(value)


def _refuse_tag(tag: int) -> Any:
    def refuse(value: Any, immutable: bool) -> Any:
        raise DagCborError(f"CBOR tag {tag} is not allowed in DAG-CBOR (only tag 42, a CID link)")

    return refuse


# cbor2 6 API: `semantic_decoders` maps a tag to `fn(value, immutable)` and overrides cbor2's built-in
# decoders; `tag_hook(tag, immutable)` sees only tags with no decoder. DAG-CBOR allows tag 42 alone, so
# every tag cbor2 would otherwise decode itself (dates, bignums, value sharing, stringrefs, sets, ...)
# is refused here; value sharing (28/29) in particular could build cyclic structures.
_CBOR2_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
                       43000, 55799)  # fmt: skip
_SEMANTIC_DECODERS = {tag: _refuse_tag(tag) for tag in _CBOR2_BUILTIN_TAGS} | {42: _link}


def _unknown_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    raise DagCborError(f"CBOR tag {tag.tag} is not allowed in DAG-CBOR (only tag 42, a CID link)")


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode one DAG-CBOR value; links become CID, bytes stay bytes. Raises DagCborError."""
    return _decode(data, _SEMANTIC_DECODERS)


def _decode(data: bytes | bytearray | memoryview, semantic_decoders: dict) -> Any:
    data = bytes(data)
    # A CBORDecoder rather than cbor2.loads because loads ignores trailing bytes; after decoding,
    # read(1) from the decoder's own buffer tells whether anything is left.
    decoder = cbor2.CBORDecoder(
        io.BytesIO(data),
        read_size=max(len(data), 1),
        semantic_decoders=semantic_decoders,
        tag_hook=_unknown_tag,
        allow_indefinite=False,  # DAG-CBOR requires definite lengths
        allow_duplicate_keys=False,
        strict_hashable_types=True,  # map keys must be strings; also stops hash-collision tricks
    )
    try:
        value = decoder.decode()
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__
        raise DagCborError(f"invalid DAG-CBOR: {cause if isinstance(cause, AtprotoFormatError) else exc}") from exc
    try:
        decoder.read(1)
    except cbor2.CBORDecodeEOF:
        return value
    raise DagCborError("invalid DAG-CBOR: trailing bytes after the value")


def _encode_cid(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if not isinstance(value, CID):
        raise DagCborError(f"cannot encode {type(value).__name__} as DAG-CBOR")
    encoder.encode(cbor2.CBORTag(42, b"\x00" + bytes(value)))


def _refuse_float(encoder: cbor2.CBOREncoder, value: float) -> None:
    # atproto's data model has no floats, and canonical cbor2 would shrink them, which DAG-CBOR forbids.
    raise DagCborError(f"float {value!r} cannot be encoded: the atproto data model has no floats")


def encode(value: Any) -> bytes:
    """Canonical DAG-CBOR (map keys length-first then bytewise, minimal integers), CIDs as tag 42."""
    try:
        return cbor2.dumps(value, canonical=True, default=_encode_cid, encoders={float: _refuse_float})
    except DagCborError:
        raise
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        if isinstance(exc.__cause__, DagCborError):
            raise exc.__cause__ from None
        raise DagCborError(f"cannot encode as DAG-CBOR: {exc}") from exc


def _json_link(value: Any, immutable: bool) -> dict[str, str]:
    return {"$link": str(link_from_tag42(value))}


def _json_bytes(value: Any) -> dict[str, str]:
    if isinstance(value, bytes):  # the data model spec: standard base64 alphabet, no padding
        return {"$bytes": base64.b64encode(value).decode("ascii").rstrip("=")}
    raise TypeError(f"{type(value).__name__} value {value!r} has no atproto JSON form")


# Links become their JSON form while decoding and bytes while encoding, so a record goes from DAG-CBOR
# to JSON text with no Python walk over it (the walk was a third of a repo's parse time).
_JSON_DECODERS = _SEMANTIC_DECODERS | {42: _json_link}
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_bytes)


def to_json_text(data: bytes | bytearray | memoryview) -> str:
    """atproto's JSON form of a DAG-CBOR block: links as {"$link": cid}, bytes as {"$bytes": base64}.
    Raises DagCborError for bytes that are not DAG-CBOR or hold a value JSON cannot carry."""
    value = _decode(data, _JSON_DECODERS)
    try:
        return _JSON_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:  # a bytes map key, NaN, infinity: json names which
        raise DagCborError(f"no atproto JSON form: {exc}") from None
