"""The stream check's fast paths against the reference paths they stand in for, on valid and hostile input:
a commit decoded once with its unsigned bytes cut out of the block (vs the cbor2 decode and re-encode),
MST lookups that make CIDs only on the searched path (vs the decode_node walk), a CAR slice read in
one loop (vs CarReader), and CarReader's inline read of a section buffered whole (vs its general way, which
a stream fed byte by byte always takes). Same value, or the same exception with the same message."""

import random

import cbor2
import pytest

from migration_assets.atproto import dagcbor, mst
from migration_assets.atproto.car import CarReader, read_blocks
from migration_assets.atproto.cid import CID
from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.signature import unsigned_commit_bytes
from tests.atproto.builders import build_mst, car_bytes, put
from tests.compiled import count_compiled


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except AtprotoError as exc:
        return type(exc).__name__, str(exc)


def link(cid: CID) -> cbor2.CBORTag:
    return cbor2.CBORTag(42, b"\x00" + bytes(cid))


def random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice("abc:xyz019é☃") for _ in range(size))


def random_tid(rng: random.Random) -> str:
    return rng.choice("234567abcdefghij") + "".join(rng.choice("234567abcdefghijklmnopqrstuvwxyz") for _ in range(12))


def commit_values(rng: random.Random):
    """Commit maps (as cbor2 values, links as tag 42): mostly valid, with one thing changed at times."""
    for n in range(3000):
        sig = bytes(rng.randrange(256) for _ in range(64))
        if n % 7 == 0:
            sig = bytes([rng.choice([0, 1, 0x12])]) + sig[1:]  # starts like a CID
        # DIDs of sizes around CBOR's text-head boundaries (24, 256 bytes); revs mostly TIDs, at times not
        did_size = rng.choice([1, 10, 15, 16, 20, 250, 300])
        rev = random_tid(rng) if rng.random() < 0.8 else random_text(rng, rng.choice([1, 13, 23, 24, 255, 256]))
        value = {"did": "did:plc:" + "".join(rng.choice("abc:xyz019") for _ in range(did_size)) + "a",
                 "rev": rev,
                 "version": 3, "data": link(CID.for_block(bytes([n % 256, n // 256]))),
                 "prev": rng.choice([None, link(CID.for_block(b"prev"))]), "sig": sig}
        change = rng.randrange(16)
        if change == 0:
            value["version"] = rng.choice([2, 4, True, "3"])
        elif change == 1:
            value.pop(rng.choice(sorted(value)))
        elif change == 2:
            value[rng.choice(["extra", "aaa", "zzzzzzzzz"])] = rng.choice([1, 1.5, b"\x01q", link(CID.for_block(b"x"))])
        elif change == 3:
            value["sig"] = sig[: rng.choice([0, 23, 24, 63])] if rng.random() < 0.8 else sig + b"\x00"
        elif change == 4:
            value["data"] = bytes(CID.for_block(b"a byte string, not a link"))
        elif change == 5:
            value["sig"] = link(CID.for_block(b"sig"))
        elif change == 6:
            value["did"] = rng.choice(["plc:nodid", b"did:plc:x", 5, ""])
        elif change == 7:
            value["rev"] = rng.choice(["", None, 7])
        yield value, change == 8  # 8: encoded with its keys out of canonical order


def commit_blocks():
    rng = random.Random(17)
    for value, shuffled in commit_values(rng):
        if shuffled:
            items = list(value.items())
            rng.shuffle(items)
            block = cbor2.dumps(dict(items))
        else:
            block = cbor2.dumps(value, canonical=True)
        yield block
        if rng.random() < 0.05:
            yield block + b"\x00"
            yield block[:-1]


def test_a_commit_decoded_once_is_the_reference_commit_and_its_unsigned_bytes_the_re_encoding():
    fast = valid = 0
    for block in commit_blocks():
        compiled = mst._compiled_commit(block)
        reference = outcome(mst._reference_commit, block)
        valid += reference[0] == "ok"
        assert outcome(lambda b: mst.parse_signed_commit(b)[0], block) == reference
        assert outcome(mst.parse_commit, block) == reference
        if compiled is not None:
            fast += 1
            commit, signed = compiled
            assert reference == ("ok", commit)
            assert unsigned_commit_bytes(block) == signed  # byte for byte
            assert signed[1] == commit.sig
    assert fast > valid / 2 > 500  # the fast path was taken (most of the valid ones) ...
    assert fast < sum(1 for _ in commit_blocks())  # ... and not for everything


def test_a_cid_pickles_to_itself():
    import pickle

    for cid in (CID.for_block(b"x"), CID.for_block(b"y", 0x55), CID(0x71, b"\x01" * 20, 0x13)):
        assert pickle.loads(pickle.dumps(cid)) == cid


# --- MST lookups --------------------------------------------------------------------------------------


def reference_lookup(blocks, root, key):
    """The lookup on the reference decoder alone (cbor2, every link a CID), with the walk's errors."""
    wanted, cid = key.encode(), root
    while True:
        if cid not in blocks:
            raise mst.MstError(f"MST node {cid} is missing from the block set; the repo export is incomplete, "
                               "fetch it again")
        try:
            left, entries = mst._reference_node(blocks[cid])
        except mst.MstError as exc:
            raise mst.MstError(f"MST node {cid} {exc}") from None
        subtree, previous = left, b""
        for entry in entries:
            if not 0 <= entry["p"] <= len(previous):
                raise mst.MstError(f"MST node {cid} has prefix length {entry['p']}, past the previous key")
            previous = previous[: entry["p"]] + entry["k"]
            if previous == wanted:
                return entry["v"]
            if previous > wanted:
                break
            subtree = entry["t"]
        if subtree is None:
            return None
        cid = subtree


def mutated_node(rng: random.Random, block: bytes) -> bytes:
    value = dagcbor.decode(block)
    entries = value["e"]
    change = rng.randrange(9)
    if change == 0 and entries:
        rng.choice(entries)["p"] = 10_000
    elif change == 1 and entries:
        rng.choice(entries)["k"] = b"\x01" + rng.choice(entries)["k"]
    elif change == 2 and entries:
        rng.choice(entries)["v"] = b"not a link"
    elif change == 3 and entries:
        rng.choice(entries)["t"] = CID(0x70, b"\x00" * 32)  # a link of another codec: the reference decides
    elif change == 4:
        value["x"] = 1
    elif change == 5 and entries:
        rng.choice(entries)["v"] = bytes(CID.for_block(b"bytes"))  # CID-shaped bytes, not a link
    elif change == 6:
        value["l"] = rng.choice([None, CID.for_block(b"elsewhere"), 5])
    elif change == 7 and entries:
        entry = rng.choice(entries)
        entry["p"] = True
    else:
        # keys out of canonical order
        return cbor2.dumps({"l": value["l"], "e": entries}, default=lambda encoder, v: encoder.encode(link(v)))
    return dagcbor.encode(value)


def test_lookups_with_lazy_links_and_a_node_cache_agree_with_the_reference_walk():
    rng = random.Random(5)
    checked = errors = 0
    for n in range(120):
        blocks = {}
        records = {f"app.bsky.feed.post/{rng.getrandbits(40):010x}": CID.for_block(b"r%d" % i)
                   for i in range(rng.choice([0, 1, 5, 40, 200]))}
        root = build_mst(records, blocks)
        if n % 2:  # a hostile tree: a node missing or changed
            victim = rng.choice(sorted(blocks, key=bytes))
            if rng.random() < 0.3:
                del blocks[victim]
            else:
                blocks[victim] = mutated_node(rng, blocks[victim])
        keys = list(records)[:30] + [f"app.bsky.feed.post/{rng.getrandbits(40):010x}" for _ in range(10)]
        nodes, by_link = {}, {bytes(cid): block for cid, block in blocks.items()}
        for key in keys:
            expected = outcome(reference_lookup, blocks, root, key)
            if expected[0] == "ok" and expected[1] is not None:
                expected = ("ok", bytes(expected[1]))  # lookup answers with a binary CID
            assert outcome(mst.lookup, by_link, bytes(root), key) == expected
            assert outcome(mst.lookup, by_link, bytes(root), key, nodes) == expected  # the cache across lookups
            checked += 1
            errors += expected[0] != "ok"
    assert checked > 2000 and errors > 50


def test_lookups_in_a_usual_tree_take_the_compiled_path(monkeypatch):
    # The test above holds mst.lookup to the reference whichever path it takes: here, that mst.lookup
    # takes the compiled one on canonical nodes (every host's), for keys present and absent, and leaves
    # a key too long for it (over 1,024 bytes) to the Python path.
    counting = count_compiled(monkeypatch, mst, "lookup")
    blocks: dict = {}
    records = {f"app.bsky.feed.post/3k{n:011d}": CID.for_block(b"r%d" % n) for n in range(300)}
    root = bytes(build_mst(records, blocks))
    by_link = {bytes(cid): block for cid, block in blocks.items()}
    keys = list(records.items())[::7]
    for key, cid in keys:
        assert mst.lookup(by_link, root, key) == bytes(cid)
        assert mst.lookup(by_link, root, key + "x") is None
    assert counting.answered == counting.calls == 2 * len(keys)
    long_blocks: dict = {}
    long_key = "app.bsky.feed.post/" + "k" * 1100
    long_root = bytes(build_mst({long_key: CID1_FOR_LOOKUP}, long_blocks))
    assert mst.lookup({bytes(c): b for c, b in long_blocks.items()}, long_root, long_key) == bytes(CID1_FOR_LOOKUP)
    assert counting.answered == 2 * len(keys)  # the long key's lookup was the Python path's


CID1_FOR_LOOKUP = CID.for_block(b"a record")


# --- a CAR slice read in one loop ---------------------------------------------------------------------


def car_slices():
    rng = random.Random(9)
    for n in range(600):
        blocks = {}
        for i in range(rng.randrange(1, 8)):
            put(blocks, {"n": n, "i": i, "pad": "x" * rng.choice([0, 10, 100, 200, 20_000])})
        pairs = list(blocks.items())
        if rng.random() < 0.2:
            pairs.append(pairs[0])  # a block twice
        if rng.random() < 0.1:
            raw = b"raw block"
            pairs.append((CID.for_block(raw, 0x55), raw))
        data = car_bytes([pairs[0][0]], pairs)
        yield data
        change = rng.randrange(10)
        if change == 0:
            yield data[: rng.randrange(len(data))]
        elif change == 1:
            spot = rng.randrange(len(data))
            yield data[:spot] + bytes([data[spot] ^ 0x41]) + data[spot + 1:]
        elif change == 2:
            yield data + b"\x00"
        elif change == 3:
            yield b"\x00" + data[1:]
        elif change == 4:
            header = dagcbor.encode({"version": 1, "roots": [pairs[0][0]], "x": 1})
            yield bytes([len(header)]) + header + data[1 + data[0]:]
        elif change == 5:
            header = cbor2.dumps({"version": 2, "roots": [link(pairs[0][0])]})
            yield bytes([len(header)]) + header + data[1 + data[0]:]
        elif change == 6:
            yield data + b"\x80\x00"  # a non-minimal varint
        elif change == 7:
            yield data + b"\x05" + bytes(5)


@pytest.mark.parametrize("max_size", [1 << 24, 300])
def test_a_car_slice_read_in_one_loop_is_what_carreader_reads(max_size):
    for data in car_slices():
        assert outcome(lambda d: read_blocks(d, max_size=max_size), data) == \
            outcome(lambda d: dict(CarReader(iter([d]), max_size=max_size).links()), data)


def test_usual_car_slices_take_the_compiled_path(monkeypatch):
    # The test above holds read_blocks to CarReader whichever path it takes: here, that read_blocks
    # takes the compiled one for a usual slice (one root, no block twice), as every host's events are.
    from migration_assets.atproto import car

    counting = count_compiled(monkeypatch, car, "blocks")
    read = 0
    for data in car_slices():
        read += outcome(lambda d: read_blocks(d, max_size=1 << 24), data)[0] == "ok"
    assert read > 500 and counting.answered > read * 0.7, (read, counting.answered)


def test_carreader_reads_a_car_alike_in_one_chunk_and_byte_by_byte():
    # Under the cap: past it, which of the cap's two errors comes first depends on the chunking.
    def read(chunks):
        return outcome(lambda c: list(CarReader(c, max_size=1 << 24).links()), chunks)

    for data in car_slices():
        assert read(iter([data])) == read(data[i:i + 1] for i in range(len(data)))
