"""MST walk (order, layers, shape) and commit parsing."""

import cbor2
import pytest

from migration_assets.atproto import dagcbor, mst
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import CommitError, MstError, key_layer, parse_commit, walk_records
from tests.atproto.builders import Blocks, build_mst, layer, node, put
from tests.atproto.conftest import make_repo

# Key layers published in the atproto repository spec (MST section).
SPEC_LAYERS = {
    "2653ae71": 0,
    "blue": 1,
    "app.bsky.feed.post/454397e440ec": 4,
    "app.bsky.feed.post/9adeb165882c": 8,
}
# From the atproto MST tests (packages/repo/tests/mst.test.ts): keys, their layers, and root CIDs.
CID1 = CID.decode("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")
L0A, L0B, L0C, L0D = (f"com.example.record/3jqfcqzm{s}" for s in ("3fp2j", "3fr2j", "3ft2j", "4fc2j"))
L1 = "com.example.record/3jqfcqzm3fs2j"
L2 = "com.example.record/3jqfcqzm3fx2j"
TS_ROOTS = [
    ({}, "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"),  # empty tree
    ({"com.example.record/3jqfcqzm3fo2j": CID1}, "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"),
    ({L2: CID1}, "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai"),  # single layer-2 key
    (dict.fromkeys([L0A, L0B, L1, L0C, L0D], CID1), "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m"),
]


def test_key_layers_match_published_vectors():
    for key, expected in SPEC_LAYERS.items():
        assert key_layer(key) == expected == layer(key)
    assert [key_layer(k) for k in (L0A, L0B, L0C, L0D, L1, L2)] == [0, 0, 0, 0, 1, 2]


@pytest.mark.parametrize("records, root", TS_ROOTS)
def test_published_trees_build_and_walk(records, root):
    blocks: Blocks = {}
    assert str(build_mst(records, blocks)) == root  # builder + DAG-CBOR + CID agree with the reference PDS
    walked = [(f"{c}/{r}", v) for c, r, v in walk_records(blocks, CID.decode(root))]
    assert walked == sorted(records.items())


def test_walk_yields_every_record_in_key_order(repo):
    assert max(key_layer(k) for k in repo.records) >= 2  # the tree has several layers and empty nodes
    walked = list(walk_records(repo.blocks, repo.root))
    assert [(f"{c}/{r}", v) for c, r, v in walked] == sorted(repo.records.items())
    assert ("app.bsky.actor.profile", "self", repo.records["app.bsky.actor.profile/self"]) in walked


def test_larger_tree_with_intermediate_empty_nodes():
    big = make_repo(400)
    nodes = [dagcbor.decode(data) for data in big.blocks.values()]
    empty = [n for n in nodes if isinstance(n, dict) and n.keys() == {"l", "e"} and not n["e"]]
    assert empty and all(n["l"] is not None for n in empty)  # no entries, only a subtree a layer down
    walked = [(f"{c}/{r}", v) for c, r, v in walk_records(big.blocks, big.root)]
    assert walked == sorted(big.records.items())


def walk(blocks: Blocks, root: CID) -> list:
    return list(walk_records(blocks, root))


def test_out_of_order_keys_in_a_node():
    blocks: Blocks = {}
    root = put(blocks, node(None, [(L0B, CID1, None), (L0A, CID1, None)]))
    with pytest.raises(MstError, match="out of order"):
        walk(blocks, root)


def test_out_of_order_keys_across_a_subtree():
    blocks: Blocks = {}
    left = put(blocks, node(None, [(L0C, CID1, None)]))  # L0C sorts after L1, so cannot be left of it
    root = put(blocks, node(left, [(L1, CID1, None)]))
    with pytest.raises(MstError, match="out of order"):
        walk(blocks, root)


def test_duplicate_key_is_out_of_order():
    blocks: Blocks = {}
    right = put(blocks, node(None, [(L0C, CID1, None)]))
    root = put(blocks, node(None, [(L1, CID1, right)]))
    assert len(walk(blocks, root)) == 2
    dup = put(blocks, node(None, [(L0A, CID1, None), (L0C, CID1, None)]))
    root = put(blocks, node(None, [(L1, CID1, dup)]))
    with pytest.raises(MstError, match="out of order"):
        walk(blocks, root)


def test_node_at_the_wrong_layer():
    blocks: Blocks = {}
    # Root at layer 2; its left subtree must be at layer 1 (an empty node), not directly a layer-0 node.
    low = put(blocks, node(None, [(L0A, CID1, None)]))
    with pytest.raises(MstError, match="layer-0 keys where layer 1 belongs"):
        walk(blocks, put(blocks, node(low, [(L2, CID1, None)])))
    # The canonical shape with the empty layer-1 node walks fine.
    middle = put(blocks, node(low, []))
    assert len(walk(blocks, put(blocks, node(middle, [(L2, CID1, None)])))) == 2


def test_key_promoted_to_the_wrong_node():
    blocks: Blocks = {}
    with pytest.raises(MstError, match="mixes keys of layers"):
        walk(blocks, put(blocks, node(None, [(L0A, CID1, None), (L1, CID1, None)])))
    # A layer-1 key in a layer-0 slot below a layer-2 root's layer-1 child.
    deep = put(blocks, node(None, [(L1, CID1, None)]))
    mid = put(blocks, node(None, [(L1, CID1, deep)]))
    with pytest.raises(MstError, match="layer-1 keys where layer 0 belongs"):
        walk(blocks, put(blocks, node(mid, [(L2, CID1, None)])))


def test_bad_shapes():
    blocks: Blocks = {}
    leaf = put(blocks, node(None, [(L0A, CID1, None)]))
    with pytest.raises(MstError, match="layer 0 has a subtree"):
        walk(blocks, put(blocks, node(leaf, [(L0B, CID1, None)])))
    empty = put(blocks, node(None, []))
    with pytest.raises(MstError, match="below the root is empty"):
        walk(blocks, put(blocks, node(empty, [(L1, CID1, None)])))
    with pytest.raises(MstError, match="not canonical"):
        walk(blocks, put(blocks, node(leaf, [])))
    with pytest.raises(MstError, match="entry"):
        walk(blocks, put(blocks, {"l": None, "e": [{"p": 0, "k": "text", "v": CID1, "t": None}]}))
    with pytest.raises(MstError, match="prefix length"):
        walk(blocks, put(blocks, {"l": None, "e": [{"p": 3, "k": b"asdf", "v": CID1, "t": None}]}))
    with pytest.raises(MstError, match="not 'collection/rkey'"):
        walk(blocks, put(blocks, node(None, [("asdf", CID1, None)])))  # "asdf" is layer 0 (spec)


def test_missing_node_is_named(repo):
    blocks = dict(repo.blocks)
    del blocks[repo.root]
    with pytest.raises(MstError, match=f"{repo.root} is missing"):
        walk(blocks, repo.root)
    not_a_node = put(blocks, ["not", "a", "node"])
    with pytest.raises(MstError, match="is not"):
        walk(blocks, not_a_node)


def test_parse_commit_v3(repo):
    commit = parse_commit(repo.blocks[repo.commit])
    assert (commit.did, commit.version, commit.data, commit.rev, commit.prev) == (
        "did:plc:testrepo",
        3,
        repo.root,
        "3l5aaaaaaaa22",
        None,
    )
    assert len(commit.sig) == 64


def test_parse_commit_v2_has_no_rev():
    prev = CID.for_block(b"older commit")
    block = dagcbor.encode({"did": "did:web:example.com", "version": 2, "data": CID1, "prev": prev, "sig": b"s"})
    commit = parse_commit(block)
    assert (commit.version, commit.rev, commit.prev) == (2, None, prev)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 4}, "version 4"),
        ({"version": True}, "version True"),
        ({"data": str(CID1)}, "data is not a CID"),
        ({"rev": None}, "rev None"),
        # A rev is a TID: the ledger and the stream compare revs as such (a rev of "zzz" would have every
        # later event skipped as a replay), and PostgreSQL's text can't hold U+0000
        ({"rev": "zzzzzzzzzzzzzzzz"}, "not a TID"),
        ({"rev": "3l5aaaaaaaa2\0"}, "not a TID"),
        ({"did": "alice"}, "not a DID"),
        ({"did": "did:plc:\0"}, "not a DID"),
        ({"prev": "x"}, "prev"),
        ({"sig": None}, "sig"),
    ],
)
def test_bad_commits(change, message):
    good = {"did": "did:plc:x", "version": 3, "data": CID1, "rev": "3l5aaaaaaaa22", "prev": None, "sig": b"s"}
    with pytest.raises(CommitError, match=message):
        parse_commit(dagcbor.encode(good | change))
    with pytest.raises(CommitError, match="not DAG-CBOR"):
        parse_commit(b"\xff")


# --- node decoding: libipld (fast path) against cbor2 (reference), on the same valid and hostile nodes ---

def _entry(**change):
    return {"k": b"app.bsky.feed.post/3k2a", "p": 0, "t": None, "v": CID1} | change


def _node_vectors() -> dict[str, bytes]:
    repo = make_repo(200)
    real = [block for block in repo.blocks.values() if block[:3] == b"\xa2\x61\x65"]
    raw_link = CID.for_block(b"blob", 0x55)
    odd_hash = CID(0x71, bytes(64), hash_code=0x13)  # sha2-512: a valid CID, not the usual shape
    vectors = {f"real_{n}": block for n, block in enumerate(real[:5])}
    vectors |= {
        "raw_codec_value": dagcbor.encode({"e": [_entry(v=raw_link)], "l": None}),
        "subtrees": dagcbor.encode({"e": [_entry(t=CID1)], "l": CID1}),
        "odd_hash_value": dagcbor.encode({"e": [_entry(v=odd_hash)], "l": None}),
        "value_as_byte_string": dagcbor.encode({"e": [_entry(v=bytes(CID1))], "l": None}),
        "subtree_as_byte_string": dagcbor.encode({"e": [_entry(t=bytes(CID1))], "l": None}),
        "left_as_byte_string": dagcbor.encode({"e": [], "l": bytes(CID1)}),
        "key_as_link": dagcbor.encode({"e": [_entry(k=CID1)], "l": None}),
        "key_shaped_like_a_cid": dagcbor.encode({"e": [_entry(k=bytes(CID1))], "l": None}),
        "key_as_text": dagcbor.encode({"e": [_entry(k="app.bsky.feed.post/3k2a")], "l": None}),
        "prefix_as_bool": dagcbor.encode({"e": [_entry(p=True)], "l": None}),
        "no_subtree_key": dagcbor.encode({"e": [{"k": b"a/b", "p": 0, "v": CID1}], "l": None}),
        "extra_entry_key": dagcbor.encode({"e": [_entry(x=1)], "l": None}),
        "extra_node_key": dagcbor.encode({"e": [], "l": None, "x": 1}),
        "deep_extra_key": b"\xa2\x61e\x81\xa5" + dagcbor.encode(_entry())[1:] + b"\x61x" + b"\x81" * 401 + b"\x01"
                          + b"\x61l\xf6",
        "deep_but_allowed": b"\xa2\x61e\x81\xa5" + dagcbor.encode(_entry())[1:] + b"\x61x" + b"\x81" * 390 + b"\x01"
                            + b"\x61l\xf6",
        "entries_not_a_list": dagcbor.encode({"e": {}, "l": None}),
        "not_a_map": dagcbor.encode([1]),
        "non_canonical_order": cbor2.dumps({"l": None, "e": []}),
        "trailing": dagcbor.encode({"e": [], "l": None}) + b"\x00",
        "garbage": b"\xa2\x61\x65\xff",
    }
    return vectors


NODES = _node_vectors()


def _node_outcome(fn, block):
    try:
        return "ok", fn(block)
    except MstError:
        return "refused", None


def _reference_node(block):
    """The reference decoding (cbor2, links as CID) in decode_node's form: (left, full keys, values,
    subtrees), links as binary CIDs."""
    left, entries = mst._reference_node(block)
    keys, previous = [], b""
    for entry in entries:
        if not 0 <= entry["p"] <= len(previous):
            raise MstError("prefix past the previous key")
        previous = previous[: entry["p"]] + entry["k"]
        keys.append(previous)
    links = [None if link is None else bytes(link) for link in [left] + [e.get("t") for e in entries]]
    return links[0], keys, [bytes(e["v"]) for e in entries], links[1:]


@pytest.mark.parametrize("block", NODES.values(), ids=NODES)
def test_node_decoding_through_libipld_is_the_references_or_left_to_it(block):
    reference = _node_outcome(_reference_node, block)
    compiled = mst._compiled_node(block)
    if compiled is not None:
        assert ("ok", compiled) == reference
    assert _node_outcome(mst.decode_node, block) == reference


def test_real_nodes_take_the_libipld_path():
    for name in ("real_0", "real_1", "raw_codec_value", "subtrees"):
        assert mst._compiled_node(NODES[name]) is not None, name
    for name in ("odd_hash_value", "value_as_byte_string", "key_as_link", "key_shaped_like_a_cid", "extra_entry_key",
                 "non_canonical_order"):
        assert mst._compiled_node(NODES[name]) is None, name
