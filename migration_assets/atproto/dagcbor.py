"""DAG-CBOR: decode with tag 42 as CID, canonical encode, and atproto's JSON form.

cbor2 (>=6) is the strict reference: `decode`, `encode` and the refusals. libipld (Rust) decodes about
25 times faster and serves the hot paths (`to_json_text`, `decode_canonical` for MST nodes) only where
its answer is the reference's: when it refuses, or its result could differ, the reference decides.
libipld 3 returns links and byte strings alike as `bytes`, so a block whose value holds bytes is left
to cbor2 unless the caller's schema says which fields are links (`decode_canonical`).
tests/atproto/test_dagcbor.py runs both on the same valid and hostile vectors.
"""

from __future__ import annotations

import base64
import io
import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

import cbor2
import libipld

from migration_assets.atproto.cid import CID, link_from_tag42
from migration_assets.atproto.errors import AtprotoFormatError

class DagCborError(AtprotoFormatError):
    """Bytes are not valid DAG-CBOR, or a value cannot be represented in it."""


# Deepest nesting decoded (cbor2's default, set on both decoders): a value directly inside N non-empty
# containers (or a tag) is at level N; past MAX_DEPTH the block is refused.
MAX_DEPTH = 400


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
        max_depth=MAX_DEPTH,
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
    text = _compiled_json_text(data)
    return text if text is not None else _reference_json_text(data)


class _HasBytes(Exception):
    pass


def _no_bytes(value: Any) -> Any:
    raise _HasBytes


# `_JSON_ENCODER.encode` refusing bytes (_HasBytes), with its C encoder built once: JSONEncoder.encode
# builds a new one at every call, which was half the cost of a small record. A decoded block cannot
# hold a cycle, so the encoder keeps no markers for cycle detection.
_PLAIN_JSON = c_make_encoder(None, _no_bytes, encode_basestring, None, ":", ",", False, False, False)


def _compiled_json_text(data: bytes | bytearray | memoryview) -> str | None:
    """The JSON form through libipld, or None where only the reference can answer: libipld refused the
    block (cbor2 may still accept it, e.g. keys out of canonical order, and words its refusals), it nests
    past MAX_DEPTH, or it holds bytes (a link or a byte string: libipld 3 does not say which)."""
    try:
        value = libipld.decode_dag_cbor(bytes(data))
    except Exception:  # noqa: BLE001 - ValueError, RecursionError: the reference decides and explains
        return None
    if len(data) > MAX_DEPTH and _nests_deeper(value, MAX_DEPTH):  # shorter blocks cannot nest that deep
        return None
    try:
        return "".join(_PLAIN_JSON(value, 0))
    except Exception:  # noqa: BLE001 - _HasBytes, or a value JSON refuses: the reference decides
        return None


def decode_canonical(data: bytes) -> Any | None:
    """libipld's decoding of a block that is the canonical encoding of its value, links and byte strings
    both as `bytes`; None where the reference `decode` must answer (libipld refused it, or it is not
    canonical). libipld re-encodes a `bytes` that is a valid CID as a link, so a block equal to its
    re-encoding holds a link exactly where the value holds CID-shaped bytes: a caller that knows its
    schema (MST nodes) can then tell links from byte strings. Nesting is not checked against MAX_DEPTH:
    the caller's schema must fix the depth (an MST node is three levels), else use `decode`."""
    try:
        value = libipld.decode_dag_cbor(data)
        return value if libipld.encode_dag_cbor(value) == data else None
    except Exception:  # noqa: BLE001 - ValueError, RecursionError: the reference decides and explains
        return None


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether any item of `value` sits inside more than `limit` non-empty lists or maps."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children:
            if level >= limit:
                return True
            stack.extend((child, level + 1) for child in children)
    return False


def _reference_json_text(data: bytes | bytearray | memoryview) -> str:
    value = _decode(data, _JSON_DECODERS)
    try:
        return _JSON_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:  # a bytes map key, NaN, infinity: json names which
        raise DagCborError(f"no atproto JSON form: {exc}") from None
