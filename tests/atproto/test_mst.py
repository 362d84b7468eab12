"""MST walk (order, layers, shape) and commit parsing."""

import pytest

from migration_assets.atproto import dagcbor
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
        ({"did": "alice"}, "not a DID"),
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
