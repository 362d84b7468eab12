"""Reading a CAR into a spooled snapshot and storing it: the set-based diff in a real PostgreSQL."""

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID
from migration_assets.atproto.mst import MstError
from migration_assets.core.postgres import shared_pool
from migration_assets.repos import ledger
from migration_assets.repos import snapshot as snapshot_module
from migration_assets.repos.snapshot import read_snapshot
from migration_assets.repos.store import store_snapshot
from tests.atproto.builders import build_mst, car_bytes, private_key, put, signed_commit

DID = "did:plc:storetest"
KEY = private_key(ec.SECP256K1(), 0x57012E)


def export(records: dict[str, object], *, drop: str | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    """A CAR of a repo holding `records` ("collection/rkey" -> record). `drop`: leave that record's block
    out; `replace`: serve these records as raw blocks (CID taken from the bytes, so they verify)."""
    blocks: dict[CID, bytes] = {}
    cids = {key: put(blocks, value) for key, value in records.items()}
    for key, raw in (replace or {}).items():
        del blocks[cids[key]]
        cids[key] = CID.for_block(raw)
        blocks[cids[key]] = raw
    if drop:
        del blocks[cids[drop]]
    commit_block = signed_commit(KEY, build_mst(cids, blocks), did=DID)
    commit = CID.for_block(commit_block)
    return car_bytes([commit], [(commit, commit_block), *blocks.items()])


def sync(conn, car: bytes):
    with read_snapshot(DID, [car[i : i + 1000] for i in range(0, len(car), 1000)], len(car)) as snapshot:
        with conn.transaction():
            return store_snapshot(conn, snapshot, "https://pds.example")


def stored(conn) -> dict[str, tuple[str, dict]]:
    rows = conn.execute("SELECT collection, rkey, cid, record FROM records WHERE did = %s", (DID,)).fetchall()
    return {f"{c}/{r}": (cid, record) for c, r, cid, record in rows}


def post(text: str) -> dict:
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-05-01T00:00:00.000Z"}


@pytest.fixture(autouse=True, params=["in_memory", "spooled"])
def spool_memory(request, monkeypatch):
    """Every test twice: a small repo's rows in memory (one COPY), and as a big repo's that does not fit
    in the memory for whole CARs: streamed through the Python parse, spooled to disk (two COPYs joined in
    PostgreSQL)."""
    if request.param == "spooled":
        monkeypatch.setattr(snapshot_module, "WHOLE_CAR_BYTES", 0)
        monkeypatch.setattr(snapshot_module, "SPOOL_MEMORY_BYTES", 0)
    return request.param


@pytest.fixture
def conn(target_url):
    with shared_pool(target_url).connection() as conn:
        ledger.enqueue(conn, [DID], 256)
        conn.commit()
        yield conn


def test_creates_then_only_what_changed(conn):
    first = {f"app.bsky.feed.post/3k{i:03d}": post(f"post {i}") for i in range(300)}
    first["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "Store"}
    changes = sync(conn, export(first))
    assert (changes.created, changes.updated, changes.deleted, changes.unchanged) == (301, 0, 0, 0)
    before = stored(conn)
    assert before["app.bsky.feed.post/3k007"][1] == post("post 7")
    stamps = dict(conn.execute("SELECT rkey, indexed_at FROM records WHERE did = %s", (DID,)).fetchall())

    second = dict(first)
    second["app.bsky.feed.post/3k001"] = post("edited")
    del second["app.bsky.feed.post/3k002"]
    second["app.bsky.feed.like/3kzzz"] = {"$type": "app.bsky.feed.like", "subject": {"uri": "at://x", "cid": "y"}}
    changes = sync(conn, export(second))
    assert (changes.created, changes.updated, changes.deleted, changes.unchanged) == (1, 1, 1, 299)
    after = stored(conn)
    assert set(after) == set(second)
    assert after["app.bsky.feed.post/3k001"][1]["text"] == "edited"
    assert after["app.bsky.feed.post/3k005"] == before["app.bsky.feed.post/3k005"]
    unchanged_stamp = conn.execute("SELECT indexed_at FROM records WHERE did = %s AND rkey = '3k005'", (DID,)).fetchone()
    assert unchanged_stamp[0] == stamps["3k005"]  # not rewritten
    counts = dict(conn.execute("SELECT collection, records FROM repo_collection_counts WHERE did = %s", (DID,)).fetchall())
    assert counts == {"app.bsky.feed.post": 299, "app.bsky.actor.profile": 1, "app.bsky.feed.like": 1}
    assert conn.execute("SELECT status, records_count FROM repos WHERE did = %s", (DID,)).fetchone() == ("synced", 301)


def test_a_record_shaped_like_an_mst_node_is_stored(conn):
    # {"e": ..., "$type": ...} encodes with the same first bytes as an MST node {e, l}
    odd = {"e": 1, "$type": "com.example.odd"}
    assert dagcbor.encode(odd)[:3] == b"\xa2\x61\x65"
    sync(conn, export({"com.example.odd/1": odd, "app.bsky.feed.post/1": post("x")}))
    assert stored(conn)["com.example.odd/1"][1] == odd


def test_a_missing_record_block_stores_nothing(conn):
    records = {f"app.bsky.feed.post/{i}": post(str(i)) for i in range(20)}
    with pytest.raises(MstError, match=r"app.bsky.feed.post/7\) is missing from the CAR; the export is incomplete"):
        sync(conn, export(records, drop="app.bsky.feed.post/7"))
    conn.rollback()
    assert stored(conn) == {}
    assert conn.execute("SELECT status FROM repos WHERE did = %s", (DID,)).fetchone() == ("pending",)


def test_a_first_sync_with_a_record_that_is_not_dag_cbor_stores_nothing(conn):
    records = {f"app.bsky.feed.post/{i}": post(str(i)) for i in range(5)}
    bad = dagcbor.encode(post("3")) + b"\x00"  # a repo never stored takes the COPY without a diff
    with pytest.raises(MstError, match=r"app.bsky.feed.post/3 .* is not valid DAG-CBOR: .*trailing bytes"):
        sync(conn, export(records, replace={"app.bsky.feed.post/3": bad}))
    conn.rollback()
    assert stored(conn) == {}
    assert conn.execute("SELECT status FROM repos WHERE did = %s", (DID,)).fetchone() == ("pending",)


def test_a_record_that_is_not_dag_cbor_stores_nothing(conn):
    records = {f"app.bsky.feed.post/{i}": post(str(i)) for i in range(5)}
    sync(conn, export(records))
    records["app.bsky.feed.post/3"] = post("changed")
    bad = dagcbor.encode(post("changed")) + b"\x00"  # trailing bytes: hashes fine, decodes to no value
    with pytest.raises(MstError, match=r"app.bsky.feed.post/3 .* is not valid DAG-CBOR: .*trailing bytes"):
        sync(conn, export(records, replace={"app.bsky.feed.post/3": bad}))
    conn.rollback()
    assert stored(conn)["app.bsky.feed.post/3"][1] == post("3")  # still the old rev


def test_spool_files_are_removed_when_the_snapshot_closes(spool_memory):
    car = export({"app.bsky.feed.post/1": post("x")})
    with read_snapshot(DID, [car], len(car)) as snapshot:
        files = [snapshot.blocks._file, snapshot.keys._file]
        assert [row[:2] for row in snapshot.keys] == [("app.bsky.feed.post", "1")]
    if spool_memory == "in_memory":
        assert files == [None, None]  # a small repo costs no file
    else:
        assert all(f.closed for f in files)


def test_a_record_holding_u0000_is_stored_faithfully(conn):
    # U+0000 is legal in atproto strings, keys too; jsonb refuses it (the whole repo used to fail).
    nul = {"$type": "com.example.nul", "text": "a\x00b", "facets": [{"k\x00ey": {"deep": "\x00"}}]}
    literal = post("a backslash, then u0000: \\u0000")  # looks like the escape in JSON text, is not
    records = {"com.example.nul/1": nul, "app.bsky.feed.post/1": literal}
    sync(conn, export(records))

    rows = {f"{c}/{r}": (cid, record, raw) for c, r, cid, record, raw in conn.execute(
        "SELECT collection, rkey, cid, record, record_cbor FROM records WHERE did = %s", (DID,))}
    cid, record, raw = rows["com.example.nul/1"]
    assert dagcbor.decode(raw) == nul, "record_cbor is the exact record"
    assert str(CID.for_block(raw)) == cid
    assert record == {"$type": "com.example.nul", "text": "a\ufffdb", "facets": [{"k\ufffdey": {"deep": "\ufffd"}}]}
    assert rows["app.bsky.feed.post/1"][1:] == (literal, None), "a record without U+0000 is jsonb alone"

    records["com.example.nul/1"] = {"$type": "com.example.nul", "text": "ab"}  # edited: no U+0000 left
    sync(conn, export(records))
    assert conn.execute("SELECT record, record_cbor FROM records WHERE rkey = '1' AND collection = 'com.example.nul'"
                        ).fetchone() == (records["com.example.nul/1"], None)
