"""Repo commits and the Merkle Search Tree (MST): walk a repo's records in key order, checking the tree.

A node is `{l: CID|null, e: [{p, k, v, t}]}`; an entry's key is the previous key's first `p` bytes + `k`.
A key's layer is the count of leading zero bits of sha256(key), halved (fanout 4). All entries of a node
share its layer, subtrees sit exactly one layer lower (empty intermediate nodes fill the gaps), and an
in-order walk yields strictly increasing keys. Checking these on untrusted input keeps a malicious or
corrupt repo from hiding, duplicating or reordering records. A key must be `collection/rkey`, the
collection a valid NSID and the rkey a valid record key (AT Protocol syntax), so no stored path holds
`..`, spaces or an unbounded length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CODEC_OF_PREFIX, CID, NOT_A_CID_START, usual_link
from migration_assets.atproto.compiled import fastrepo as _fastrepo
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.syntax import is_did, is_tid, is_valid_nsid, is_valid_record_key


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
    return parse_signed_commit(block)[0]


def parse_signed_commit(block: bytes) -> tuple[Commit, tuple[bytes, bytes] | None]:
    """(the commit, as parse_commit; (the bytes its signature covers, the signature) when they came with
    the decoding, as signature.unsigned_commit_bytes gives them, else None: that then re-encodes them).
    Decodes the block once, not twice."""
    compiled = _compiled_commit(block)
    return compiled if compiled is not None else (_reference_commit(block), None)


def _reference_commit(block: bytes) -> Commit:
    try:
        obj = dagcbor.decode(block)
    except AtprotoFormatError as exc:
        raise CommitError(f"commit block is not DAG-CBOR: {exc}") from None
    if not isinstance(obj, dict):
        raise CommitError("commit block is not a map")
    did, version, data, rev, prev, sig = (obj.get(k) for k in ("did", "version", "data", "rev", "prev", "sig"))
    problems = []
    if not is_did(did):
        problems.append(f"did {did!r:.200} is not a DID")
    if version not in (2, 3) or isinstance(version, bool):
        problems.append(f"version {version!r} is not 2 or 3")
    if not isinstance(data, CID):
        problems.append("data is not a CID link")
    if not is_tid(rev) and not (version == 2 and rev is None):  # the ledger and the stream order revs as TIDs
        problems.append(f"rev {rev!r:.200} is not a TID")
    if prev is not None and not isinstance(prev, CID):
        problems.append("prev is neither null nor a CID link")
    if not isinstance(sig, bytes):
        problems.append("sig is not bytes")
    if problems:
        raise CommitError("invalid commit: " + "; ".join(problems))
    return Commit.model_validate({"did": did, "version": version, "data": data, "rev": rev, "prev": prev, "sig": sig})


_COMMIT_KEYS = {"data", "did", "prev", "rev", "sig", "version"}
# The canonical map puts its keys length-first then bytewise: did, rev, sig, data, prev, version. The
# signature covers the same map without `sig`: a5 (five pairs), the pairs before `sig`, the pairs after.
_SIG_PAIR_HEAD = b"\x63sig\x58\x40"  # text "sig", then a 64-byte byte string


def _compiled_commit(block: bytes) -> tuple[Commit, tuple[bytes, bytes]] | None:
    """The commit through libipld and the bytes its signature covers, cut out of the block; None to leave
    it to the reference path, which decides and words the error. Only the usual commit takes this path:
    exactly the six keys of a version 3 commit, a 64-byte `sig` that can't be taken for a link, and a
    block that is the canonical encoding of its value (so `data` and `prev` are links, as in
    _compiled_node, and the map minus `sig` encodes as the block minus that pair, byte for byte)."""
    value = dagcbor.decode_canonical(block)
    if type(value) is not dict or value.keys() != _COMMIT_KEYS:
        return None
    did, rev, sig, prev, version = value["did"], value["rev"], value["sig"], value["prev"], value["version"]
    data = usual_link(value["data"])
    if (not is_did(did) or not is_tid(rev)
            or type(version) is not int or version != 3 or data is None
            or type(sig) is not bytes or len(sig) != 64 or sig[:1] in NOT_A_CID_START):
        return None
    if prev is not None and (prev := usual_link(prev)) is None:
        return None
    start = 1 + 4 + _text_size(did) + 4 + _text_size(rev)  # a6, "did", did, "rev", rev
    end = start + len(_SIG_PAIR_HEAD) + 64
    if block[:1] != b"\xa6" or block[start:start + len(_SIG_PAIR_HEAD)] != _SIG_PAIR_HEAD:
        return None
    commit = Commit.model_construct(did=did, version=version, data=data, rev=rev, prev=prev, sig=sig)
    return commit, (b"\xa5" + block[1:start] + block[end:], sig)


def _text_size(text: str) -> int:
    """Bytes of a CBOR text string (minimal head, UTF-8)."""
    size = len(text.encode())
    return size + (1 if size < 24 else 2 if size < 0x100 else 3 if size < 0x10000 else 5)


def key_layer(key: bytes | str) -> int:
    """MST layer of a key: leading zero bits of sha256(key) counted in 2-bit chunks."""
    raw = key.encode() if isinstance(key, str) else key
    digest = hashlib.sha256(raw).digest()
    if digest[0] >= 0x40:  # three keys in four: layer 0 without building a 256-bit integer
        return 0
    return (256 - int.from_bytes(digest, "big").bit_length()) // 2


# A decoded node: (left subtree, full keys, values, subtrees), every link a binary CID (`bytes`, what
# libipld decodes a link to): a repo's walk touches ~100,000 links, and making each a CID object was a
# quarter of its parse time. Keys are the entries' full keys (the previous key's first `p` bytes + `k`).
Node = tuple[bytes | None, list[bytes], list[bytes], list[bytes | None]]


def walk_records(blocks: Mapping[CID, bytes], root: CID) -> Iterator[tuple[str, str, CID]]:
    """Yield (collection, rkey, record CID) in key order from the MST rooted at `root` (a commit's
    `data`); walk_links over blocks keyed by CID. Raises MstError as walk_links does."""
    by_link = {bytes(cid): block for cid, block in blocks.items()}
    for collection, rkey, link in walk_links(by_link, bytes(root)):
        yield collection, rkey, CID.from_bytes(link)


def walk_links(blocks: Mapping[bytes, bytes], root: bytes,
               decoded: Mapping[bytes, Node] | None = None) -> Iterator[tuple[str, str, bytes]]:
    """Yield (collection, rkey, record link) in key order from the MST rooted at `root`, blocks and links
    as binary CIDs. `decoded`: nodes already decoded (by decode_node), not decoded again.

    Raises MstError on a missing node, a malformed node or key, keys out of order, or a wrong layer.
    """
    collections: set[str] = set()  # a repo has few collections: each is checked once
    for key, value in _walk(blocks, root, decoded or {}):
        collection, rkey = _split_key(key, collections)
        yield collection, rkey, value


def lookup(blocks: Mapping[bytes, bytes], root: bytes, key: str, nodes: dict[bytes, Node] | None = None) -> bytes | None:
    """The value (a record link) of `key` in the MST rooted at `root`, or None when the tree has no such
    key; blocks and links as binary CIDs. Needs only the nodes on the key's path (what a commit event
    carries); a missing one raises MstError. `nodes`: a cache of the nodes decoded so far, for several
    lookups in the same blocks (a commit's ops). Canonical nodes in a dict are looked up in one call of
    compiled code (atproto/_fastrepo.c); anything else takes the Python path below, which words errors."""
    if _fastrepo is not None and type(blocks) is dict and type(root) is bytes:
        found = _fastrepo.lookup(blocks, root, key.encode())
        if found is not None:
            return found[0]
    if nodes is None:
        nodes = {}
    wanted, link = key.encode(), root
    while True:
        node = nodes.get(link)
        if node is None:
            node = nodes[link] = _node(blocks, link)
        left, keys, values, trees = node
        subtree = left
        for i, entry_key in enumerate(keys):
            if entry_key == wanted:
                return values[i]
            if entry_key > wanted:
                break
            subtree = trees[i]
        if subtree is None:
            return None
        link = subtree


def _named(link: CID | bytes) -> str:
    """A link as errors name it: the CID's text."""
    if isinstance(link, CID):
        return str(link)
    try:
        return str(CID.from_bytes(link))
    except AtprotoFormatError:
        return f"0x{link.hex()}"


def _split_key(key: bytes, valid_collections: set[str]) -> tuple[str, str]:
    text = key.decode("utf-8", errors="replace")
    collection, sep, rkey = text.partition("/")
    problem = None
    if not key.isascii() or not sep:
        problem = "is not 'collection/rkey' in ASCII"
    elif collection not in valid_collections:
        if not is_valid_nsid(collection):
            problem = f"has collection {collection[:100]!r}, which is not a valid NSID"
        else:
            valid_collections.add(collection)
    if problem is None and not is_valid_record_key(rkey):
        problem = f"has record key {rkey[:100]!r} ({len(rkey)} characters), which is not a valid record key"
    if problem:
        shown = text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
        raise MstError(f"MST key {shown!r} {problem}; the repo export is invalid, so this repo is not stored")
    return collection, rkey


def _walk(blocks: Mapping[bytes, bytes], root: bytes, decoded: Mapping[bytes, Node]) -> Iterator[tuple[bytes, bytes]]:
    """In-order walk with an explicit stack (no generator per tree level). A stack item is either a
    subtree to expand, (None, node link, expected layer or None for the root), or an entry to yield,
    (key, record link, link of its node)."""
    stack: list[tuple[bytes | None, bytes, Any]] = [(None, root, None)]
    last = b""
    while stack:
        key, link, extra = stack.pop()
        if key is not None:
            if key <= last:
                raise MstError(f"MST key {key!r} in node {_named(extra)} is not after {last!r}; keys are out of order")
            last = key
            yield key, link
            continue
        node = decoded.get(link)
        left, keys, values, trees = node if node is not None else _node(blocks, link)
        layer = _node_layer(link, left, keys, extra)
        if layer is None:
            continue  # the empty root of an empty repo
        if layer == 0 and (left is not None or any(trees)):
            raise MstError(f"MST node {_named(link)} at layer 0 has a subtree; nothing can sit below layer 0")
        expand: list[tuple[bytes | None, bytes, Any]] = [] if left is None else [(None, left, layer - 1)]
        for key, value, tree in zip(keys, values, trees):
            expand.append((key, value, link))
            if tree is not None:
                expand.append((None, tree, layer - 1))
        stack.extend(reversed(expand))


def _node(blocks: Mapping[Any, bytes], link: CID | bytes) -> Node:
    """The decoded node of `link` (a CID or a binary CID, as `blocks` is keyed)."""
    try:
        block = blocks[link]
    except KeyError:
        raise MstError(
            f"MST node {_named(link)} is missing from the block set; the repo export is incomplete, fetch it again"
        ) from None
    try:
        return decode_node(block)
    except MstError as exc:
        raise MstError(f"MST node {_named(link)} {exc}") from None


def decode_node(block: bytes) -> Node:
    """A node's (left, keys, values, subtrees), links as binary CIDs. Raises MstError ("is not ...", for
    the caller to prefix with the node's CID)."""
    node = _compiled_node(block)
    if node is not None:
        return node
    left, entries = _reference_node(block)
    return (None if left is None else bytes(left), _entry_keys(entries), [bytes(e["v"]) for e in entries],
            [None if e.get("t") is None else bytes(e["t"]) for e in entries])


def _reference_node(block: bytes) -> tuple[CID | None, list[dict[str, Any]]]:
    try:
        value = dagcbor.decode(block)
    except AtprotoFormatError as exc:
        raise MstError(f"is not DAG-CBOR: {exc}") from None
    left = value.get("l") if isinstance(value, dict) else None
    entries = value.get("e") if isinstance(value, dict) else None
    if not isinstance(entries, list) or not (left is None or isinstance(left, CID)):
        raise MstError("is not {l: CID|null, e: [...]}")
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and type(entry.get("p")) is int
            and type(entry.get("k")) is bytes
            and type(entry.get("v")) is CID
            and (entry.get("t") is None or type(entry.get("t")) is CID)
        ):
            raise MstError("has an entry that is not {p: int, k: bytes, v: CID, t: CID|null}")
    return left, entries


_NODE_KEYS = {"e", "l"}
_ENTRY_KEYS = {"k", "p", "t", "v"}


def _compiled_node(block: bytes) -> Node | None:
    """The node through libipld (dagcbor.decode_canonical), or None to leave it to the reference decoder.
    The block is canonical, so a CID-shaped `bytes` was a link and any other a byte string: `v`, `t`, `l`
    must be atproto's CIDs (_is_link, inlined) and `k` must not look like a CID. Anything else, including
    keys beyond the usual ones and a prefix past the previous key, goes to the reference path, which
    decides and words the error. Keys are built in the same loop."""
    value = dagcbor.decode_canonical(block)
    if type(value) is not dict or value.keys() != _NODE_KEYS or type(value["e"]) is not list:
        return None
    left, prefixes = value["l"], CODEC_OF_PREFIX
    if left is not None and not _is_link(left):
        return None
    keys: list[bytes] = []
    values: list[bytes] = []
    trees: list[bytes | None] = []
    prev = b""
    for entry in value["e"]:
        if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
            return None
        prefix, key, link, tree = entry["p"], entry["k"], entry["v"], entry["t"]
        if (type(prefix) is not int or type(key) is not bytes or key[:1] in NOT_A_CID_START
                or type(link) is not bytes or len(link) != 36 or link[:4] not in prefixes):
            return None
        if tree is not None and (type(tree) is not bytes or len(tree) != 36 or tree[:4] not in prefixes):
            return None
        if not 0 <= prefix <= len(prev):
            return None
        prev = prev[:prefix] + key
        keys.append(prev)
        values.append(link)
        trees.append(tree)
    return left, keys, values, trees


def _is_link(value: object) -> bool:
    """A CID-shaped `bytes` of the usual kind (CIDv1, sha2-256, DAG-CBOR or raw)."""
    return type(value) is bytes and len(value) == 36 and value[:4] in CODEC_OF_PREFIX


def _entry_keys(entries: list[dict[str, Any]]) -> list[bytes]:
    """Full keys of a node's entries: each is the previous key's first `p` bytes + `k`."""
    keys: list[bytes] = []
    prev = b""
    for entry in entries:
        prefix = entry["p"]
        if not 0 <= prefix <= len(prev):
            raise MstError(f"has prefix length {prefix}, past the previous key")
        prev = prev[:prefix] + entry["k"]
        keys.append(prev)
    return keys


def _node_layer(link: bytes, left: bytes | None, keys: list[bytes], expected: int | None) -> int | None:
    """The node's layer, checked against where it sits (`expected`; None for the root)."""
    if keys:
        layers = {key_layer(k) for k in keys}
        if len(layers) > 1:
            raise MstError(f"MST node {_named(link)} mixes keys of layers {sorted(layers)}; the tree is malformed")
        layer = layers.pop()
        if expected is not None and layer != expected:
            raise MstError(f"MST node {_named(link)} holds layer-{layer} keys where layer {expected} belongs")
        return layer
    if expected is None:
        if left is not None:  # an empty root with a child is an untrimmed tree: no canonical repo has one
            raise MstError(f"MST root {_named(link)} has no entries but a subtree; the tree is not canonical")
        return None
    if left is None:
        raise MstError(f"MST node {_named(link)} below the root is empty")
    return expected
