"""Test-side builders for atproto vectors: canonical MST nodes, commits, CAR streams, signing keys.

Written from the atproto repository spec independently of the library under test, so the walker and
the reader are checked against structure built a second way (and against published root CIDs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID, encode_varint

Blocks = dict[CID, bytes]


def layer(key: str) -> int:
    """Layer by counting leading zero bits one at a time (a second way, unlike mst.key_layer's int maths)."""
    bits = "".join(f"{b:08b}" for b in hashlib.sha256(key.encode()).digest())
    return (len(bits) - len(bits.lstrip("0"))) // 2


def put(blocks: Blocks, value: object) -> CID:
    data = dagcbor.encode(value)
    cid = CID.for_block(data)
    blocks[cid] = data
    return cid


def node(left: CID | None, entries: list[tuple[str, CID, CID | None]]) -> dict:
    """An MST node dict with prefix-compressed keys; entries are (key, value, right subtree)."""
    out, prev = [], b""
    for key, value, right in entries:
        raw = key.encode()
        p = 0
        while p < min(len(raw), len(prev)) and raw[p] == prev[p]:
            p += 1
        out.append({"p": p, "k": raw[p:], "v": value, "t": right})
        prev = raw
    return {"l": left, "e": out}


def build_mst(records: Mapping[str, CID], blocks: Blocks) -> CID:
    """Canonical MST of `records`, its nodes added to `blocks`; returns the root CID."""
    items = sorted(records.items())
    if not items:
        return put(blocks, node(None, []))
    return _build(items, max(layer(k) for k, _ in items), blocks)


def _build(items: list[tuple[str, CID]], at: int, blocks: Blocks) -> CID:
    entries: list[tuple[str, CID, CID | None]] = []
    left: CID | None = None
    pending: list[tuple[str, CID]] = []  # lower-layer keys waiting to become a subtree

    def flush() -> CID | None:
        sub = _build(pending, at - 1, blocks) if pending else None
        pending.clear()
        return sub

    for key, value in items:
        if layer(key) == at:
            sub = flush()
            if entries:
                entries[-1] = (*entries[-1][:2], sub)
            else:
                left = sub
            entries.append((key, value, None))
        else:
            pending.append((key, value))
    sub = flush()
    if entries:
        entries[-1] = (*entries[-1][:2], sub)
    else:
        left = sub
    return put(blocks, node(left, entries))


def car_bytes(roots: list[CID], blocks: Iterable[tuple[CID, bytes]]) -> bytes:
    header = dagcbor.encode({"version": 1, "roots": roots})
    out = [encode_varint(len(header)), header]
    for cid, data in blocks:
        section = bytes(cid) + data
        out += [encode_varint(len(section)), section]
    return b"".join(out)


ORDERS = {
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}


def private_key(curve: ec.EllipticCurve, secret: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(secret, curve)


def sign(key: ec.EllipticCurvePrivateKey, message: bytes, *, high_s: bool = False) -> bytes:
    """Compact r||s signature (RFC 6979 deterministic), low-S unless `high_s`."""
    der = key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    n = ORDERS[key.curve.name]
    if (s > n // 2) != high_s:
        s = n - s  # (r, n - s) is the same signature's malleable twin
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def signed_commit(key: ec.EllipticCurvePrivateKey, data: CID, *, did: str = "did:plc:testrepo", **extra) -> bytes:
    unsigned = {"did": did, "version": 3, "data": data, "rev": "3l5aaaaaaaa22", "prev": None, **extra}
    return dagcbor.encode({**unsigned, "sig": sign(key, dagcbor.encode(unsigned))})
