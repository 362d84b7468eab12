"""Repo commits and the Merkle Search Tree (MST): walk a repo's records in key order, checking the tree.

A node is `{l: CID|null, e: [{p, k, v, t}]}`; an entry's key is the previous key's first `p` bytes + `k`.
A key's layer is the count of leading zero bits of sha256(key), halved (fanout 4). All entries of a node
share its layer, subtrees sit exactly one layer lower (empty intermediate nodes fill the gaps), and an
in-order walk yields strictly increasing keys. Checking these on untrusted input keeps a malicious or
corrupt repo from hiding, duplicating or reordering records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoFormatError


class MstError(AtprotoFormatError):
    """The MST is malformed: a missing or undecodable node, keys out of order, or a node at the wrong layer."""


class CommitError(AtprotoFormatError):
    """A commit block is not a valid atproto commit."""


class Commit(BaseModel):
    """A signed repo commit (version 3, or legacy version 2 which has no `rev`)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    did: str
    version: Literal[2, 3]
    data: CID
    rev: str | None
    prev: CID | None
    sig: bytes


def parse_commit(block: bytes) -> Commit:
    """Decode and check a commit block (the CAR's first root)."""
    try:
        obj = dagcbor.decode(block)
    except AtprotoFormatError as exc:
        raise CommitError(f"commit block is not DAG-CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise CommitError("commit block is not a map")
    did, version, data, rev, prev, sig = (obj.get(k) for k in ("did", "version", "data", "rev", "prev", "sig"))
    problems = []
    if not isinstance(did, str) or not did.startswith("did:"):
        problems.append(f"did {did!r} is not a DID")
    if version not in (2, 3) or isinstance(version, bool):
        problems.append(f"version {version!r} is not 2 or 3")
    if not isinstance(data, CID):
        problems.append("data is not a CID link")
    if not (isinstance(rev, str) and rev) and not (version == 2 and rev is None):
        problems.append(f"rev {rev!r} is not a TID string")
    if prev is not None and not isinstance(prev, CID):
        problems.append("prev is neither null nor a CID link")
    if not isinstance(sig, bytes):
        problems.append("sig is not bytes")
    if problems:
        raise CommitError("invalid commit: " + "; ".join(problems))
    return Commit.model_validate({"did": did, "version": version, "data": data, "rev": rev, "prev": prev, "sig": sig})


def key_layer(key: bytes | str) -> int:
    """MST layer of a key: leading zero bits of sha256(key) counted in 2-bit chunks."""
    raw = key.encode() if isinstance(key, str) else key
    digest = int.from_bytes(hashlib.sha256(raw).digest(), "big")
    return (256 - digest.bit_length()) // 2


def walk_records(blocks: Mapping[CID, bytes], root: CID) -> Iterator[tuple[str, str, CID]]:
    """Yield (collection, rkey, record CID) in key order from the MST rooted at `root` (a commit's `data`).

    Raises MstError on a missing node, a malformed node or key, keys out of order, or a wrong layer.
    """
    last: list[bytes] = [b""]
    for key, value in _walk(blocks, root, None, last):
        text = key.decode("ascii", errors="replace")
        collection, sep, rkey = text.partition("/")
        if not key.isascii() or not sep or not collection or not rkey or "/" in rkey:
            raise MstError(f"MST key {text!r} is not 'collection/rkey'")
        yield collection, rkey, value


def _node(blocks: Mapping[CID, bytes], cid: CID) -> tuple[CID | None, list[dict[str, Any]]]:
    try:
        block = blocks[cid]
    except KeyError:
        raise MstError(
            f"MST node {cid} is missing from the block set; the repo export is incomplete, fetch it again"
        ) from None
    try:
        node = dagcbor.decode(block)
    except AtprotoFormatError as exc:
        raise MstError(f"MST node {cid} is not DAG-CBOR: {exc}") from None
    left = node.get("l") if isinstance(node, dict) else None
    entries = node.get("e") if isinstance(node, dict) else None
    if not isinstance(entries, list) or not (left is None or isinstance(left, CID)):
        raise MstError(f"MST node {cid} is not {{l: CID|null, e: [...]}}")
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("p"), int)
            and not isinstance(entry.get("p"), bool)
            and isinstance(entry.get("k"), bytes)
            and isinstance(entry.get("v"), CID)
            and (entry.get("t") is None or isinstance(entry.get("t"), CID))
        ):
            raise MstError(f"MST node {cid} has an entry that is not {{p: int, k: bytes, v: CID, t: CID|null}}")
    return left, entries


def _walk(blocks: Mapping[CID, bytes], cid: CID, layer: int | None, last: list[bytes]) -> Iterator[tuple[bytes, CID]]:
    """In-order walk of the subtree at `cid`, expected at `layer` (None: the root, whose layer is its keys')."""
    left, entries = _node(blocks, cid)
    keys: list[bytes] = []
    prev = b""
    for entry in entries:
        prefix = entry["p"]
        if not 0 <= prefix <= len(prev):
            raise MstError(f"MST node {cid}: prefix length {prefix} exceeds the previous key")
        prev = prev[:prefix] + entry["k"]
        keys.append(prev)
    if keys:
        layers = {key_layer(k) for k in keys}
        if len(layers) > 1:
            raise MstError(f"MST node {cid} mixes keys of layers {sorted(layers)}; the tree is malformed")
        node_layer = layers.pop()
        if layer is not None and node_layer != layer:
            raise MstError(f"MST node {cid} holds layer-{node_layer} keys where layer {layer} belongs")
    elif layer is None:
        if left is not None:  # an empty root with a child is an untrimmed tree: no canonical repo has one
            raise MstError(f"MST root {cid} has no entries but a subtree; the tree is not canonical")
        return
    elif left is None:
        raise MstError(f"MST node {cid} below the root is empty")
    else:
        node_layer = layer
    children = [left] + [entry["t"] for entry in entries]
    if node_layer == 0 and any(children):
        raise MstError(f"MST node {cid} at layer 0 has a subtree; nothing can sit below layer 0")
    if left is not None:
        yield from _walk(blocks, left, node_layer - 1, last)
    for key, entry in zip(keys, entries):
        if key <= last[0]:
            raise MstError(f"MST key {key!r} in node {cid} is not after {last[0]!r}; keys are out of order")
        last[0] = key
        yield key, entry["v"]
        if entry["t"] is not None:
            yield from _walk(blocks, entry["t"], node_layer - 1, last)
