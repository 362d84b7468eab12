"""collect_repo_blocks: the MST nodes the commit reaches, whatever order the CAR lists blocks in."""

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import MstError, walk_links
from migration_assets.atproto.repo import (
    MAX_MST_DEPTH, NODE_PREFIX, WAITING_MEMORY_BYTES, _Waiting, collect_repo_blocks,
)
from tests.atproto.builders import private_key, put, signed_commit
from tests.atproto.conftest import make_repo


@pytest.mark.parametrize("memory_bytes", [WAITING_MEMORY_BYTES, 2000, 0], ids=["in_memory", "part_on_disk", "on_disk"])
@pytest.mark.parametrize("order", ["by_cid", "reversed_by_cid", "as_built", "commit_last"])
def test_only_reached_nodes_are_kept_in_any_block_order(order, memory_bytes):
    repo = make_repo(400)
    junk: dict[CID, bytes] = {}
    for n in range(20):
        put(junk, {"e": [], "l": None} if n == 0 else {"e": n.to_bytes(4, "big"), "l": None})
    blocks = [(bytes(cid), data) for cid, data in [*repo.blocks.items(), *junk.items()]]
    if order == "by_cid":  # how the reference PDS sends getRepo
        blocks.sort(key=lambda item: item[0])
    elif order == "reversed_by_cid":
        blocks.sort(key=lambda item: item[0], reverse=True)
    elif order == "commit_last":
        blocks.sort(key=lambda item: item[0] == bytes(repo.commit))
    others: dict[bytes, bytes] = {}
    found = collect_repo_blocks(blocks, bytes(repo.commit), others.__setitem__, memory_bytes)
    node_cids = {cid for cid, data in repo.blocks.items() if data[:3] == NODE_PREFIX}
    assert set(found.nodes) == {bytes(cid) for cid in node_cids}
    assert found.commit_block == repo.blocks[repo.commit]
    assert {CID.from_bytes(link) for link in others} == (set(repo.blocks) - node_cids - {repo.commit}) | set(junk)
    walked = {f"{c}/{r}": CID.from_bytes(link) for c, r, link in walk_links(found.nodes, bytes(repo.root))}
    assert walked == repo.records


def test_a_missing_commit_leaves_every_block_to_the_caller():
    repo = make_repo(10)
    others: dict[bytes, bytes] = {}
    blocks = [(bytes(cid), data) for cid, data in repo.blocks.items() if cid != repo.commit]
    found = collect_repo_blocks(blocks, bytes(repo.commit), others.__setitem__)
    assert found.commit_block is None and found.nodes == {}
    assert set(others) == {cid for cid, _ in blocks}
    assert dagcbor.decode(repo.blocks[repo.commit])["data"] == repo.root


def test_a_chain_of_nodes_sent_children_first_is_rescanned_a_bounded_number_of_times(monkeypatch):
    """A hostile CAR: a chain of empty nodes, each listed before its parent, waiting on disk. Each pass over
    the waiting file reaches one more of them, so without a bound the rescan is quadratic in the chain's
    length; a real tree needs at most MAX_MST_DEPTH passes. The walk fails such a tree."""
    chain: list[tuple[bytes, bytes]] = []
    below = None
    for _ in range(3 * MAX_MST_DEPTH):
        block = dagcbor.encode({"e": [], "l": below})
        below = CID.for_block(block)
        chain.append((bytes(below), block))
    commit_block = signed_commit(private_key(ec.SECP256K1(), 5), below)
    passes = []
    drain = _Waiting.drain
    monkeypatch.setattr(_Waiting, "drain", lambda waiting: passes.append(1) or drain(waiting))
    found = collect_repo_blocks([*chain, (bytes(CID.for_block(commit_block)), commit_block)],
                                bytes(CID.for_block(commit_block)), lambda link, block: None, memory_bytes=0)
    assert MAX_MST_DEPTH <= len(found.nodes) < len(chain)
    assert len(passes) <= MAX_MST_DEPTH + 1  # the passes, and handing the unreached rest to `other`
    with pytest.raises(MstError):
        list(walk_links(found.nodes, bytes(below), found.decoded))
