"""The compiled repo parse (atproto/_fastrepo.c) against the Python parse, its reference: on valid repos
both give the same snapshot, and the compiled one took them; on hostile ones, both give the same snapshot
or the same error (the compiled parse leaves whatever it does not take to the reference)."""

import random

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor, mst
from migration_assets.atproto.car import CarError
from migration_assets.atproto.cid import CID, encode_varint
from migration_assets.core.concurrency import ByteBudget
from migration_assets.repos import snapshot as snapshot_module
from migration_assets.repos.collections import CollectionFilter, RecordScope
from migration_assets.repos.snapshot import read_snapshot
from tests.atproto.builders import build_mst, car_bytes, node, private_key, put, signed_commit
from tests.atproto.conftest import make_repo
from tests.compiled import CountedCalls, count_compiled
from tests.repos.conftest import handle

DID = "did:plc:testrepo"
KEY = private_key(ec.SECP256K1(), 0xFA57)
CID1 = CID.decode("bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454")
# Keys of known MST layers (the atproto spec's vectors, as tests/atproto/test_mst.py uses them).
L0A, L0B, L0C = (f"com.example.record/3jqfcqzm{s}" for s in ("3fp2j", "3fr2j", "3ft2j"))
L1 = "com.example.record/3jqfcqzm3fs2j"
L2 = "com.example.record/3jqfcqzm3fx2j"


@pytest.fixture
def compiled(monkeypatch) -> CountedCalls:
    """The compiled parse as read_snapshot calls it, counting the CARs it took."""
    return count_compiled(monkeypatch, snapshot_module, "parse")


@pytest.fixture(params=["whole", "streamed"])
def path(request, monkeypatch) -> CountedCalls:
    """The compiled path as read_snapshot takes it, counting the repos it took: parse() of a CAR read
    whole, or walk() of the MST of one that streams (no memory for whole CARs), its records handed over
    7 at a time, so a tree it leaves to the Python walk is often left after some were kept."""
    if request.param == "streamed":
        monkeypatch.setattr(snapshot_module, "WHOLE_CAR_BYTES", 0)
        monkeypatch.setattr(snapshot_module, "_WALK_BATCH", 7)
    return count_compiled(monkeypatch, snapshot_module, "parse" if request.param == "whole" else "walk")


def test_the_compiled_parse_is_built():
    assert snapshot_module._fastrepo is not None, (
        "migration_assets/atproto/_fastrepo.c was not built: `pip install -e .` needs gcc, the Python headers "
        "and OpenSSL's (Debian: libssl-dev); without it every repo takes the slower Python parse")


def outcome(car: bytes, *, compiled: bool, monkeypatch, scope: RecordScope = RecordScope(), did: str = DID):
    """What read_snapshot makes of `car` through one path: the snapshot's every field, or the error."""
    with monkeypatch.context() as patch:
        if not compiled:
            patch.setattr(snapshot_module, "_fastrepo", None)
        try:
            snapshot = read_snapshot(did, [car[i:i + 4096] for i in range(0, len(car), 4096)], len(car), scope)
        except Exception as exc:  # noqa: BLE001 (the error itself is what is compared)
            return type(exc).__name__, str(exc)
    with snapshot:
        return (str(snapshot.head), snapshot.commit, snapshot.commit_block, snapshot.car_bytes, snapshot.signed,
                dict(snapshot.collections), snapshot.wanted, snapshot.signal_missing, snapshot.in_memory,
                list(snapshot.keys), sorted(snapshot.blocks))


def assert_same(car: bytes, monkeypatch, **options):
    reference = outcome(car, compiled=False, monkeypatch=monkeypatch, **options)
    assert outcome(car, compiled=True, monkeypatch=monkeypatch, **options) == reference
    return reference


def export(blocks: dict[CID, bytes], root: CID, *, did: str = DID, shuffle: int | None = None,
           extra: list[tuple[CID, bytes]] = ()) -> bytes:
    commit_block = signed_commit(KEY, root, did=did)
    commit = CID.for_block(commit_block)
    sections = [(commit, commit_block), *blocks.items(), *extra]
    if shuffle is not None:
        random.Random(shuffle).shuffle(sections)
    return car_bytes([commit], sections)


def records_export(count: int, **options) -> bytes:
    repo = make_repo(count)
    del repo.blocks[repo.commit]
    return export(repo.blocks, repo.root, **options)


VALID = {
    "empty repo": lambda: (lambda blocks: export(blocks, build_mst({}, blocks)))({}),
    "one record": lambda: records_export(1),
    "400 records, empty nodes between layers": lambda: records_export(400),
    "blocks in any order": lambda: records_export(300, shuffle=7),
    "a record shaped like an MST node": lambda: (lambda blocks: export(
        blocks, build_mst({L0A: put(blocks, {"e": [], "l": None})}, blocks)))({}),
    "a record missing from the CAR": lambda: _missing_record(),
}


def _missing_record() -> bytes:
    blocks: dict[CID, bytes] = {}
    root = build_mst({L0A: CID1, L0B: put(blocks, {"text": "kept"})}, blocks)  # CID1's block is not there
    return export(blocks, root)


@pytest.mark.parametrize("make", VALID.values(), ids=VALID)
def test_valid_repos_read_alike_through_the_compiled_parse(make, path, monkeypatch):
    result = assert_same(make(), monkeypatch)
    assert not isinstance(result[0], str) or result[0].startswith("bafy"), result
    assert path.answered == 1, "the compiled path left a valid repo to the Python one"


@pytest.mark.parametrize("scope", [RecordScope(CollectionFilter.parse("app.bsky.feed.*")),
                                   RecordScope(signal="app.bsky.feed.like"), RecordScope(signal="com.example.absent")],
                         ids=["filter", "signal", "no signal"])
def test_collection_filters_and_signals_read_alike(scope, path, monkeypatch):
    assert_same(records_export(60), monkeypatch, scope=scope)
    assert path.answered == 1


def assert_same_but_held_in_memory(car: bytes, monkeypatch) -> None:
    """The compiled parse's snapshot keeps its rows in memory (its whole-CAR share covers them) for the
    store's compiled COPY lines, where the Python parse spools them to disk; it is otherwise the same."""
    reference = outcome(car, compiled=False, monkeypatch=monkeypatch)
    whole = outcome(car, compiled=True, monkeypatch=monkeypatch)
    assert (reference[8], whole[8]) == (False, True)  # in_memory
    assert whole[:8] + whole[9:] == reference[:8] + reference[9:]


def test_a_whole_car_keeps_its_rows_in_memory_past_the_spool_budget(compiled, monkeypatch):
    monkeypatch.setattr(snapshot_module, "SPOOL_MEMORY_BYTES", 1000)
    assert_same_but_held_in_memory(records_export(200), monkeypatch)
    assert compiled.answered == 1


def test_an_export_of_5_mb_is_parsed_whole(compiled, monkeypatch):
    """An export past the 4 MB the compiled parse once stopped at (a heavy account's: most of the network's
    records are in such repos) takes it too, at a quarter of the Python parse's CPU."""
    blocks: dict[CID, bytes] = {}
    records = {f"com.example.record/3k{n:011d}": put(blocks, {"text": f"{n} " + "x" * 1000}) for n in range(5000)}
    car = export(blocks, build_mst(records, blocks))
    assert len(car) > 5_000_000
    assert_same_but_held_in_memory(car, monkeypatch)
    assert compiled.answered == 1


def test_a_car_past_the_whole_car_share_streams_through_the_python_parse(compiled, monkeypatch):
    monkeypatch.setattr(snapshot_module, "WHOLE_CAR_BYTES", 1000)
    assert_same(records_export(50), monkeypatch)
    assert compiled.answered == 0


def read(car: bytes, whole_cars: ByteBudget):
    return read_snapshot(DID, [car[i:i + 4096] for i in range(0, len(car), 4096)], len(car), whole_cars=whole_cars)


def test_reads_share_the_memory_for_whole_cars_and_a_car_that_does_not_fit_streams(compiled):
    """Every download of a run reads into one share: a big export read whole is not read whole by every
    thread at once. What does not fit in what is left streams (the same snapshot); a closed snapshot
    gives its share back."""
    small, big = records_export(100), records_export(400)
    whole_cars = ByteBudget(2 * len(big) + len(small) - 1)
    with read(big, whole_cars) as first, read(big, whole_cars) as second:
        assert whole_cars.taken == 2 * len(big) and first.in_memory and second.in_memory
        with read(small, whole_cars) as third:
            assert compiled.answered == 2, "read whole past the share left"
            assert third.records == 100 and whole_cars.taken == 2 * len(big)
    assert whole_cars.taken == 0
    with read(small, whole_cars) as fourth, read(small, whole_cars) as fifth:
        assert compiled.answered == 4 and whole_cars.taken == 2 * len(small)
        assert list(fourth.keys) == list(fifth.keys) and fourth.records == 100
    assert whole_cars.taken == 0


def test_an_export_over_half_the_share_streams_and_a_failed_download_gives_its_share_back(compiled):
    car = records_export(400)
    whole_cars = ByteBudget(2 * len(car) - 1)  # the export fits, but is more than half
    with read(car, whole_cars) as snapshot:
        assert compiled.calls == 0 and whole_cars.taken == 0 and snapshot.records == 400
    whole_cars = ByteBudget(1 << 20)

    def cut_short():
        yield car[:4096]
        yield car[4096:8192]
        raise ConnectionResetError("the host went away")

    with pytest.raises(ConnectionResetError):
        read_snapshot(DID, cut_short(), len(car), whole_cars=whole_cars)
    assert whole_cars.taken == 0, "a failed download kept its share"


def test_a_repo_without_its_signal_collection_gives_its_share_back_at_once(compiled):
    whole_cars = ByteBudget(1 << 20)
    with read_snapshot(DID, [records_export(30)], 1 << 20, RecordScope(signal="com.example.absent"),
                       whole_cars=whole_cars) as snapshot:
        assert snapshot.signal_missing and compiled.answered == 1
        assert whole_cars.taken == 0
    assert whole_cars.taken == 0, "given back twice"


def test_a_refused_or_left_car_gives_its_share_back(compiled):
    whole_cars = ByteBudget(1 << 20)
    with pytest.raises(CarError, match="not did:plc:other"):
        read_snapshot("did:plc:other", [records_export(20)], 1 << 20, whole_cars=whole_cars)
    assert compiled.calls == 1 and whole_cars.taken == 0
    with read(_missing_record(), whole_cars) as snapshot:  # taken whole
        assert whole_cars.taken > 0
    left = hostile()["keys out of order in a node"]
    with pytest.raises(Exception):  # noqa: B017 (the Python parse words the refusal)
        read(left, whole_cars)
    assert compiled.calls == 3 and compiled.answered == 2 and whole_cars.taken == 0
    assert snapshot.release is None


def _node_block(left: bytes, entries: bytes, count: int) -> bytes:
    """An MST node's DAG-CBOR written by hand (to make what the encoder never would)."""
    return b"\xa2\x61e" + bytes([0x80 + count]) + entries + b"\x61l" + left


def _link(cid: CID) -> bytes:
    return b"\xd8\x2a\x58\x25\x00" + bytes(cid)


def _entry(key: bytes, prefix: bytes = b"\x00") -> bytes:
    return b"\xa4\x61k" + bytes([0x40 + len(key)]) + key + b"\x61p" + prefix + b"\x61t\xf6\x61v" + _link(CID1)


def hostile() -> dict[str, bytes]:
    cases: dict[str, bytes] = {}

    def tree(name: str, build) -> None:
        blocks: dict[CID, bytes] = {}
        cases[name] = export(blocks, build(blocks))

    tree("keys out of order in a node", lambda b: put(b, node(None, [(L0B, CID1, None), (L0A, CID1, None)])))
    tree("keys out of order across a subtree",
         lambda b: put(b, node(put(b, node(None, [(L0C, CID1, None)])), [(L1, CID1, None)])))
    tree("a subtree met twice", lambda b: (lambda low: put(b, node(None, [(L1, CID1, low), (L2[:-1] + "z", CID1, low)])))(
        put(b, node(None, [(L0A, CID1, None)]))))
    tree("a node on the wrong layer", lambda b: put(b, node(put(b, node(None, [(L0A, CID1, None)])), [(L2, CID1, None)])))
    tree("a node mixing layers", lambda b: put(b, node(None, [(L0A, CID1, None), (L1, CID1, None)])))
    tree("a layer-0 node with a subtree",
         lambda b: put(b, node(put(b, node(None, [(L0A, CID1, None)])), [(L0B, CID1, None)])))
    tree("an empty node below the root", lambda b: put(b, node(put(b, node(None, [])), [(L1, CID1, None)])))
    tree("an empty root with a subtree", lambda b: put(b, node(put(b, node(None, [(L0A, CID1, None)])), [])))
    tree("a layer-1 empty node above layer 0 is fine, above nothing is not",
         lambda b: put(b, node(put(b, node(put(b, node(None, [])), [])), [(L2, CID1, None)])))
    for name, key in {"a key without a collection": "asdf", "a record key '..'": "com.example.record/..",
                      "a record key with a space": "com.example.record/a b",
                      "a record key of 513 characters": "com.example.record/" + "a" * 513,
                      "a collection that is no NSID": "notnsid/3jqfcqzm3fp2j",
                      "a key that is not ASCII": "com.example.récord/3jqfcqzm3fp2j",
                      "an empty record key": "com.example.record/"}.items():
        tree(name, lambda b, key=key: put(b, node(None, [(key, CID1, None)])))
    tree("an entry with a text key",
         lambda b: put(b, {"l": None, "e": [{"p": 0, "k": L0A, "v": CID1, "t": None}]}))
    tree("a prefix past the previous key",
         lambda b: put(b, {"l": None, "e": [{"p": 3, "k": L0A.encode(), "v": CID1, "t": None}]}))
    tree("a node with a key too many",
         lambda b: put(b, {"l": None, "x": 1, "e": [{"p": 0, "k": L0A.encode(), "v": CID1, "t": None}]}))
    tree("a non-minimal prefix length", lambda b: _put_raw(b, _node_block(b"\xf6", _entry(L0A.encode(), b"\x18\x00"), 1)))
    tree("a node that is not DAG-CBOR", lambda b: _put_raw(b, b"\xa2\x61e\x81\xff"))
    tree("a node that is a list", lambda b: put(b, ["not", "a", "node"]))
    tree("a node missing", lambda b: CID.for_block(dagcbor.encode(node(None, [(L0A, CID1, None)]))))
    tree("a record that is a node of the tree", lambda b: (lambda low: put(b, node(None, [(L1, low, low)])))(
        put(b, node(None, [(L0C, CID1, None)]))))

    good = records_export(30)
    cases["another repo's commit"] = (lambda blocks: export(blocks, build_mst({L0A: CID1}, blocks), did="did:plc:other"))({})
    cases["a block that does not match its CID"] = good.replace(b"record 7", b"record 8")
    cases["a CAR cut short"] = good[:-10]
    cases["a CAR with a byte too many"] = good + b"\x00"
    cases["a section length written long"] = _long_first_length(good)
    repo = make_repo(10)
    cases["a block repeated (read, by the reference)"] = car_bytes(
        [repo.commit], [(repo.commit, repo.blocks[repo.commit]), *repo.blocks.items(), next(iter(repo.blocks.items()))])
    cases["no commit among the blocks"] = car_bytes(
        [repo.commit], [(cid, data) for cid, data in repo.blocks.items() if cid != repo.commit])
    cases["a commit that is not one"] = car_bytes([repo.commit], [(repo.commit, b"\xa1\x61a\x01")])
    cases["a header of another shape"] = _header_with_extra_root(good)
    return cases


def _put_raw(blocks: dict[CID, bytes], data: bytes) -> CID:
    cid = CID.for_block(data)
    blocks[cid] = data
    return cid


def _long_first_length(car: bytes) -> bytes:
    """The first section's one-byte length written in two (0x80 | n, 0x00): not minimal."""
    start = 1 + car[0]
    size = car[start]
    assert size >= 0x80 and car[start + 1] < 0x80  # the commit's section: a two-byte length
    return car[:start] + bytes([size, car[start + 1] | 0x80, 0]) + car[start + 2:]


def _header_with_extra_root(car: bytes) -> bytes:
    start = 1 + car[0]
    header = dagcbor.decode(car[1:start])
    header["roots"].append(CID1)
    encoded = dagcbor.encode(header)
    return encode_varint(len(encoded)) + encoded + car[start:]


HOSTILE = hostile()


@pytest.mark.parametrize("car", HOSTILE.values(), ids=HOSTILE)
def test_hostile_repos_fail_alike_through_both_parses(car, path, monkeypatch):
    assert_same(car, monkeypatch)


def test_most_hostile_repos_are_refused(monkeypatch):
    # The differential test above is only as good as its cases: most must be refusals, named.
    refused = [name for name, car in HOSTILE.items() if isinstance(outcome(car, compiled=False, monkeypatch=monkeypatch)[0], str)
               and not outcome(car, compiled=False, monkeypatch=monkeypatch)[0].startswith("bafy")]
    assert len(refused) >= len(HOSTILE) - 3, sorted(set(HOSTILE) - set(refused))


def test_random_corruption_reads_alike(path, monkeypatch):
    """Bytes flipped in a real-shaped export, a thousand times: the same snapshot or the same error. A
    flip breaks a block's hash (or a length) almost always, so this holds the compiled parse's refusals
    to the reference; test_corrupted_mst_nodes_read_alike reaches its walk."""
    good, rng = records_export(40), random.Random(1)
    for _ in range(1000):
        car = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            car[rng.randrange(len(car))] = rng.randrange(256)
        assert_same(bytes(car), monkeypatch)


def test_corrupted_mst_nodes_read_alike(path, monkeypatch):
    """Bytes flipped in an MST node, its CID and every link up to a new signed commit made anew, so the
    corruption reaches the node's decoding and the walk, not only the hash check; a thousand times."""
    repo, rng = make_repo(40), random.Random(2)
    del repo.blocks[repo.commit]
    nodes = [cid for cid, data in repo.blocks.items() if data[:3] == b"\xa2\x61e"]
    for _ in range(1000):
        blocks = dict(repo.blocks)
        cid = rng.choice(nodes)
        data = bytearray(blocks[cid])
        for _ in range(rng.randint(1, 2)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        assert_same(export(blocks, _replace(blocks, cid, bytes(data), repo.root)), monkeypatch)


def _replace(blocks: dict[CID, bytes], old: CID, data: bytes, root: CID) -> CID:
    """`old`'s block replaced by `data`, and each node linking to it relinked, up to the root: the new root."""
    if data == blocks[old]:
        return root
    new = _put_raw(blocks, data)
    del blocks[old]
    if old == root:
        return new
    (parent,) = [cid for cid, block in blocks.items() if bytes(old) in block and block[:3] == b"\xa2\x61e"]
    return _replace(blocks, parent, blocks[parent].replace(bytes(old), bytes(new)), root)


def test_a_dev_env_export_reads_alike_through_the_compiled_parse(pds, compiled, monkeypatch):
    """A repo the reference PDS wrote (its own MST, its own block order), through both parses."""
    account = pds.create_account(handle())
    pds.create_records(account, "app.bsky.feed.post", [
        {"$type": "app.bsky.feed.post", "text": f"post {n}", "createdAt": "2024-05-01T00:00:00.000Z"} for n in range(300)])
    car = httpx.get(f"{account.pds.url}/xrpc/com.atproto.sync.getRepo", params={"did": account.did}).content
    result = assert_same(car, monkeypatch, did=account.did)
    assert len(result[9]) >= 300 and compiled.answered == 1


def python_subtrees(block: bytes) -> list[bytes] | None:
    try:
        left, _, _, trees = mst.decode_node(block)
    except mst.MstError:
        return None
    return [tree for tree in (left, *trees) if tree is not None]


def test_a_nodes_subtrees_are_the_python_decodes_own():
    """What the streamed parse reaches below a node as the CAR streams (_fastrepo.subtrees, or the Python
    decode where it leaves the node): the same links, and never any for a block the Python decode refuses."""
    nodes = [block for block in make_repo(3000).blocks.values() if block[:3] == b"\xa2\x61\x65"]
    assert sum(bool(python_subtrees(block)) for block in nodes) > 20
    for block in nodes:
        assert snapshot_module._fastrepo.subtrees(block) == python_subtrees(block)
    rng, taken = random.Random(7), 0
    for _ in range(3000):
        block = bytearray(rng.choice(nodes))
        block[rng.randrange(len(block))] = rng.randrange(256)
        links = snapshot_module._fastrepo.subtrees(bytes(block))
        if links is not None:
            assert links == python_subtrees(bytes(block)), bytes(block)
            taken += 1
    assert taken > 100  # a flipped key byte or link digest keeps a node
    assert snapshot_module._fastrepo.subtrees(b"\xa2\x61\x65\x80\x61\x6c\xf6\x00") is None  # a trailing byte


# --- a record's COPY line: _fastrepo.copy_lines against snapshot.record_json and COPY's escaping ------

def reference_line(block: bytes) -> bytes | None:
    """The line the Python path's rows make (`record_json`, then COPY's text escaping); None where the
    record has no plain JSON form to write that way (an error, or U+0000 kept with its exact block)."""
    text, error, exact = snapshot_module.record_json(block)
    if text is None or exact is not None:
        return None
    escaped = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return f"app.bsky.feed.post\t3kabc\tbafycid\t{escaped}\t\\N\n".encode()


def compiled_line(block: bytes) -> bytes | None:
    link = bytes(CID.for_block(block))
    return snapshot_module._fastrepo.copy_lines([("app.bsky.feed.post", "3kabc", "bafycid", link)], {link: block},
                                                b"", b"\t\\N\n")


TEXTS = ["", "plain", "quote \" and backslash \\ and slash /", "tab\tnew\nline\rcr\bbs\fff\x01\x1f\x7f",
         "é ü ß 中文 🦋 \u2028 \u00a0 \U0010ffff", "\\u0000 written out", "nul \x00 inside", "\ud7ff\ue000"]
INTEGERS = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
            -1, -24, -25, -256, -257, -2**32, -2**63, -2**63 - 1, -2**64]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return rng.choice(TEXTS) + "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(4)))
    if kind == 1:
        return rng.choice(INTEGERS)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return CID.for_block(bytes([rng.randrange(256)]))
    if kind == 4:
        return rng.choice([b"", b"\x00bytes"]) if rng.random() < 0.2 else rng.choice(TEXTS)
    if kind in (5, 6):
        return rng.randrange(-1000, 1000)
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(TEXTS[:6]) + str(n): random_value(rng, depth + 1) for n in range(rng.randrange(5))}


def test_record_lines_are_the_python_paths_own():
    rng, written = random.Random(3), 0
    for _ in range(3000):
        block = dagcbor.encode({"$type": "app.bsky.feed.post", "value": random_value(rng)})
        line = compiled_line(block)
        if line is not None:
            assert line == reference_line(block), block
            written += 1
    assert written > 2000, "the compiled path left most plain records to the Python one"


def test_record_lines_refuse_what_the_python_path_refuses():
    """Blocks with bytes flipped: the compiled line is the Python path's, or none (never one the Python
    path would refuse or write otherwise)."""
    rng, taken = random.Random(4), 0
    for _ in range(3000):
        block = bytearray(dagcbor.encode({"text": rng.choice(TEXTS), "n": rng.choice(INTEGERS),
                                          "list": [1, "two", None, CID1], "ok": True}))
        block[rng.randrange(len(block))] = rng.randrange(256)
        line = compiled_line(bytes(block))
        if line is not None:
            assert line == reference_line(bytes(block)), bytes(block)
            taken += 1
    assert taken > 100  # some flips keep a valid record (another character, another number)


@pytest.mark.parametrize("block", [b"\xa1\x61a\xf9\x3c\x00", b"\xa1\x61a\x41x", b"\xa2\x61b\x01\x61a\x02",
                                   b"\xa1\x61a\x01\x00", b"\xa1\x62\xc3\x28\x01", b"\xa1\x61a\x18\x01",
                                   dagcbor.encode({"a": "nul\x00"})],
                         ids=["float", "byte string", "keys out of order", "trailing byte", "invalid UTF-8",
                              "integer not minimal", "U+0000"])
def test_record_lines_leave_the_unusual_to_the_python_path(block):
    assert compiled_line(block) is None


def test_a_record_missing_its_block_leaves_the_rows_to_the_python_path():
    assert snapshot_module._fastrepo.copy_lines([("a.b.c", "k", "bafy", bytes(CID1))], {}, b"", b"\n") is None


def python_batches(snapshot):
    """staged_batches as the Python path makes them: every batch as its rows."""
    return (list(snapshot._staged(batch)) for batch in snapshot.blocks.batches())


@pytest.mark.parametrize("held", ["in_memory", "spooled"])
def test_stored_records_are_the_python_paths_own(held, target_url, monkeypatch):
    """The same repos stored through the compiled lines and through the Python rows, a first sync then a
    resync (the diff's staging): PostgreSQL holds the same records. Held in memory, a repo's lines are
    its records' (copy_lines); spooled to disk, its blocks' (staged_batches), joined to its keys there."""
    from migration_assets.core.postgres import shared_pool
    from migration_assets.repos import ledger
    from migration_assets.repos.store import store_snapshot

    rng = random.Random(5)
    values = [{"$type": "app.bsky.feed.post", "value": random_value(rng)} for _ in range(300)]
    plain = [v for v in values if compiled_line(dagcbor.encode(v)) is not None]
    first = {f"app.bsky.feed.post/3k{n:011d}": value for n, value in enumerate(plain)}
    second = {**dict(list(first.items())[::2]), "app.bsky.feed.post/3kzzz": {"text": "new \\ \t"}}

    made, staged = snapshot_module.RepoSnapshot.copy_lines, snapshot_module.RepoSnapshot.staged_batches
    compiled_batches: list[bytes] = []
    if held == "spooled":
        monkeypatch.setattr(snapshot_module, "WHOLE_CAR_BYTES", 0)
        monkeypatch.setattr(snapshot_module, "SPOOL_MEMORY_BYTES", 0)

    def lines_made(snapshot, *args):
        assert snapshot.in_memory == (held == "in_memory")
        lines = made(snapshot, *args)
        assert lines is not None or held == "spooled", "the compiled path left these records to the Python one"
        return lines

    def batches_made(snapshot):
        batches = list(staged(snapshot))
        assert batches and all(isinstance(batch, bytes) for batch in batches), "left to the Python path"
        compiled_batches.extend(batches)
        return batches

    def sync(did: str, records: dict, compiled: bool) -> None:
        blocks: dict[CID, bytes] = {}
        car = export(blocks, build_mst({key: put(blocks, value) for key, value in records.items()}, blocks), did=did)
        with monkeypatch.context() as patch:
            patch.setattr(snapshot_module.RepoSnapshot, "copy_lines", lines_made if compiled else lambda *args: None)
            patch.setattr(snapshot_module.RepoSnapshot, "staged_batches", batches_made if compiled else python_batches)
            with read_snapshot(did, [car], len(car)) as snapshot, shared_pool(target_url).connection() as conn:
                with conn.transaction():
                    store_snapshot(conn, snapshot, "https://pds.example")

    with shared_pool(target_url).connection() as conn:
        ledger.enqueue(conn, ["did:plc:compiled", "did:plc:python"], 256)
        conn.commit()
    for records in (first, second):
        sync("did:plc:compiled", records, compiled=True)
        sync("did:plc:python", records, compiled=False)
        with shared_pool(target_url).connection() as conn:
            rows = conn.execute("SELECT did, collection, rkey, cid, record::text, record_cbor FROM records"
                                " ORDER BY collection, rkey, did").fetchall()
        compiled_rows = [row[1:] for row in rows if row[0] == "did:plc:compiled"]
        assert compiled_rows == [row[1:] for row in rows if row[0] == "did:plc:python"]
        assert len(compiled_rows) == len(records) > 100
    assert bool(compiled_batches) == (held == "spooled"), "a spooled repo's blocks were not staged as lines"


def test_a_spooled_repo_with_unusual_records_is_stored_as_the_python_paths_own(target_url, monkeypatch):
    """Batches of a spooled repo's blocks staged as compiled lines and, where a kept block is unusual (a
    byte string, U+0000, an integer past 64 bits signed), as rows, in one COPY; a collection filter leaves
    some out (an unusual one too): PostgreSQL holds what the Python rows alone store."""
    from migration_assets.core.postgres import shared_pool
    from migration_assets.repos import ledger
    from migration_assets.repos.store import store_snapshot

    monkeypatch.setattr(snapshot_module, "WHOLE_CAR_BYTES", 0)
    monkeypatch.setattr(snapshot_module, "SPOOL_MEMORY_BYTES", 0)
    monkeypatch.setattr(snapshot_module, "_BATCH", 10)
    unusual = {7: {"data": b"\x00bytes"}, 33: {"text": "nul \x00"}, 60: {"n": -2**63 - 2}, 61: {"n": -2**63 - 1}}
    records = {f"{'app.bsky.feed.post' if n % 4 else 'app.bsky.feed.like'}/3k{n:011d}":
               unusual.get(n, {"text": f"post {n}", "n": n}) for n in range(90)}
    blocks: dict[CID, bytes] = {}
    scope = RecordScope(CollectionFilter(["app.bsky.feed.post"]))
    staged, made = [], snapshot_module.RepoSnapshot.staged_batches

    def counted(snapshot):
        batches = list(made(snapshot))
        staged.extend(type(batch) for batch in batches)
        return batches

    with shared_pool(target_url).connection() as conn:
        ledger.enqueue(conn, ["did:plc:mixed", "did:plc:rows"], 256)
        conn.commit()
    for did, batches in (("did:plc:mixed", counted), ("did:plc:rows", python_batches)):
        car = export(blocks, build_mst({key: put(blocks, value) for key, value in records.items()}, blocks), did=did)
        with monkeypatch.context() as patch:
            patch.setattr(snapshot_module.RepoSnapshot, "staged_batches", batches)
            with read_snapshot(did, [car], len(car), scope) as snapshot, shared_pool(target_url).connection() as conn:
                assert not snapshot.in_memory
                with conn.transaction():
                    store_snapshot(conn, snapshot, "https://pds.example")
    assert bytes in staged and list in staged, "the COPY did not mix compiled lines and rows"
    with shared_pool(target_url).connection() as conn:
        rows = conn.execute("SELECT did, collection, rkey, cid, record::text, record_cbor FROM records"
                            " ORDER BY collection, rkey, did").fetchall()
    mixed = [row[1:] for row in rows if row[0] == "did:plc:mixed"]
    assert mixed == [row[1:] for row in rows if row[0] == "did:plc:rows"]
    assert len(mixed) == sum(key.startswith("app.bsky.feed.post/") for key in records)


def reference_staged_line(link: bytes, block: bytes) -> bytes | None:
    """staged_blocks' row for the block as COPY writes it; None where it has no plain JSON form."""
    line = reference_line(block)
    if line is None:
        return None
    record = line.split(b"\t", 3)[3].removesuffix(b"\t\\N\n")
    return b"\\\\x" + link.hex().encode() + b"\t" + record + b"\t\\N\t\\N\n"


def test_staged_lines_are_the_python_paths_own():
    rng, rows = random.Random(6), []
    for _ in range(3000):
        block = dagcbor.encode({"$type": "app.bsky.feed.post", "value": random_value(rng)})
        link = bytes(CID.for_block(block))
        line = snapshot_module._fastrepo.staged_lines([(link, block)], None)
        if line is not None:  # else left to the Python path, as copy_lines leaves it
            assert line == reference_staged_line(link, block), block
            rows.append((link, block))
    assert len(rows) > 2000, "the compiled path left most plain records to the Python one"

    # A batch: its wanted blocks' lines in order; an unusual block among them leaves the batch to the
    # Python path, one that is not wanted (a filtered-out record) does not.
    wanted = {link for link, _ in rows[::3]}
    lines = b"".join(reference_staged_line(link, block) for link, block in rows if link in wanted)
    assert snapshot_module._fastrepo.staged_lines(rows, wanted) == lines
    nul = dagcbor.encode({"text": "nul\x00"})
    with_nul = [*rows[:500], (bytes(CID.for_block(nul)), nul), *rows[500:]]
    assert snapshot_module._fastrepo.staged_lines(with_nul, None) is None
    assert snapshot_module._fastrepo.staged_lines(with_nul, wanted) == lines
    assert snapshot_module._fastrepo.staged_lines([], None) == b""


def test_copy_lines_takes_only_plain_bytes_keys():
    """A caller's bytes subclass could run code during the block lookup (its __eq__ emptied the list of
    rows being read, which freed the row under it: a crash under AddressSanitizer): such a row is left
    to the Python path. Repo data never makes one; this holds the function to its contract."""
    rows = []

    class Sneaky(bytes):
        __hash__ = bytes.__hash__

        def __eq__(self, other):
            rows.clear()
            return bytes.__eq__(self, other)

    link = bytes(CID.for_block(b"\xa0"))
    rows.append(("app.bsky.feed.post", "3kabc", "bafycid", Sneaky(link)))
    assert snapshot_module._fastrepo.copy_lines(rows, {link: b"\xa0"}, b"", b"\n") is None
