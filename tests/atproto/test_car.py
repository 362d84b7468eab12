"""Streaming CAR v1 reader: header, blocks, size cap, truncation and corruption."""

import io
import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from migration_assets.atproto import car as car_module
from migration_assets.atproto import dagcbor
from migration_assets.atproto.car import CarError, CarReader, CarTooLarge
from migration_assets.atproto.cid import CID, encode_varint
from tests.atproto.builders import car_bytes

CAP = 10 * 1024 * 1024


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture(scope="module")
def car(repo) -> bytes:
    # Commit first, then the rest: the order getRepo uses, though readers must not rely on it.
    order = [repo.commit] + [c for c in repo.blocks if c != repo.commit]
    return car_bytes([repo.commit], [(c, repo.blocks[c]) for c in order])


def test_reads_roots_and_every_block_from_a_file(repo, car):
    reader = CarReader(io.BytesIO(car), max_size=CAP)
    assert reader.roots == [repo.commit]
    blocks = list(reader)
    assert blocks[0][0] == repo.commit
    assert dict(blocks) == repo.blocks


@pytest.mark.parametrize("size", [1, 7, 36, 4096])
def test_chunking_of_an_iterator_does_not_matter(repo, car, size):
    reader = CarReader(chunks(car, size), max_size=CAP)
    assert reader.roots == [repo.commit] and dict(reader) == repo.blocks


def test_duplicate_and_reordered_blocks_are_accepted(repo):
    items = list(repo.blocks.items())
    data = car_bytes([repo.commit], items[::-1] + items[:3])
    assert len(list(CarReader(io.BytesIO(data), max_size=CAP))) == len(items) + 3


def test_reading_is_lazy(car):
    pulled = []

    def source() -> Iterator[bytes]:
        for chunk in chunks(car, 64):
            pulled.append(len(chunk))
            yield chunk

    blocks = iter(CarReader(source(), max_size=CAP))
    next(blocks)
    assert sum(pulled) < 1024 < len(car)  # only the header and first block were pulled


def section_starts(car: bytes) -> set[int]:
    starts, pos = set(), 0
    while pos < len(car):
        starts.add(pos)
        size, width = 0, 0
        while True:  # varint
            byte = car[pos + width]
            size |= (byte & 0x7F) << (7 * width)
            width += 1
            if not byte & 0x80:
                break
        pos += width + size
    return starts


def test_truncation_anywhere_inside_a_section_is_an_error(car):
    boundaries = section_starts(car)
    for cut in range(1, len(car), 13):
        if cut in boundaries:
            continue  # a CAR cut between sections is well-formed; the MST walk notices missing blocks
        with pytest.raises(CarError, match="truncated|no header"):
            list(CarReader(io.BytesIO(car[:cut]), max_size=CAP))


def test_cut_at_a_section_boundary_yields_fewer_blocks(repo, car):
    cut = sorted(section_starts(car))[3]
    assert len(list(CarReader(io.BytesIO(car[:cut]), max_size=CAP))) == 2


def test_corrupt_block_names_its_cid(repo):
    record_cid = next(c for c in repo.blocks if c != repo.commit)
    bad = bytearray(repo.blocks[record_cid])
    bad[-1] ^= 1
    data = car_bytes([repo.commit], [(repo.commit, repo.blocks[repo.commit]), (record_cid, bytes(bad))])
    reader = iter(CarReader(io.BytesIO(data), max_size=CAP))
    next(reader)
    with pytest.raises(CarError, match=f"{record_cid} does not match"):
        next(reader)


def test_size_cap(car):
    assert len(list(CarReader(io.BytesIO(car), max_size=len(car)))) > 0  # exactly at the cap is fine
    with pytest.raises(CarTooLarge, match=f"cap of {len(car) - 1} bytes"):
        list(CarReader(chunks(car, 100), max_size=len(car) - 1))


def test_a_huge_section_length_fails_before_buffering(repo):
    header = dagcbor.encode({"version": 1, "roots": [repo.commit]})
    data = encode_varint(len(header)) + header + encode_varint(2**40) + b"\x01"
    with pytest.raises(CarTooLarge, match="claims 1099511627776 bytes"):
        list(CarReader(io.BytesIO(data), max_size=CAP))


def header(value) -> bytes:
    encoded = dagcbor.encode(value)
    return encode_varint(len(encoded)) + encoded


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"\x00", "header length is 0"),
        (b"\xff" * 12, "bad varint"),
        (b"\x80\x00", "non-minimal"),
        (header({"version": 2, "roots": []}), "only CAR v1"),
        (header({"version": 1, "roots": []}), "roots"),
        (header({"version": 1}), "roots"),
        (encode_varint(3) + b"\xa1\x01\x02", "not DAG-CBOR"),
    ],
)
def test_bad_headers(data, message):
    with pytest.raises(CarError, match=message):
        CarReader(io.BytesIO(data), max_size=CAP)


def test_bad_sections(repo):
    head = header({"version": 1, "roots": [repo.commit]})
    with pytest.raises(CarError, match="empty CAR section"):
        list(CarReader(io.BytesIO(head + b"\x00"), max_size=CAP))
    with pytest.raises(CarError, match="bad CID"):
        list(CarReader(io.BytesIO(head + b"\x05\x12\x20abc"), max_size=CAP))
    with pytest.raises(CarError, match="bad varint"):
        list(CarReader(io.BytesIO(head + b"\xff" * 10), max_size=CAP))
    empty_raw = CID.for_block(b"", 0x55)  # a zero-length block is legal
    assert list(CarReader(io.BytesIO(head + encode_varint(36) + bytes(empty_raw)), max_size=CAP)) == [(empty_raw, b"")]


# --- the compiled sections (_fastrepo.sections) against the Python loop, the reference ----------------

def read_through(data: bytes, chunk: int, monkeypatch, compiled: bool):
    """What CarReader makes of `data` fed `chunk` bytes at a time: every (link, block), or the error."""
    with monkeypatch.context() as patch:
        if not compiled:
            patch.setattr(car_module, "_fastrepo", None)
        try:
            return list(CarReader(chunks(data, chunk), max_size=CAP).links())
        except CarError as exc:
            return type(exc).__name__, str(exc)


def hostile_sections(repo, car: bytes) -> list[bytes]:
    head = header({"version": 1, "roots": [repo.commit]})
    block = dagcbor.encode({"text": "x"})
    link = bytes(CID.for_block(block))
    section = link + block
    return [
        head + b"\x00",  # an empty section
        head + bytes([0x80 | len(section), 0x00]) + section,  # a length that is not minimal
        head + bytes([0x80 | len(section), 0x80, 0x80, 0x00]) + section,  # four bytes of length
        head + encode_varint(len(section)) + section[:-1] + b"\x00",  # the block's hash fails
        head + encode_varint(len(section) + 1) + section,  # cut short at the end
        head + encode_varint(len(block) + 34) + b"\x12\x20" + link[4:] + block,  # a CIDv0
        head + encode_varint(len(section)) + b"\x01\x55" + section[2:],  # a raw link to DAG-CBOR bytes: hash still sha256
        car + encode_varint(10) + b"\x01" * 10,  # a short section after valid ones
    ]


def test_compiled_sections_read_as_the_python_loop(repo, car, monkeypatch):
    hostile = hostile_sections(repo, car)
    assert all(isinstance(read_through(data, 4096, monkeypatch, compiled=False)[0], str) for data in hostile[:6])
    rng = random.Random(8)
    cases = [car, *hostile]
    for _ in range(300):
        data = bytearray(car)
        data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    for data in cases:
        for chunk in (1, 100, 4096, len(data) or 1):
            assert read_through(data, chunk, monkeypatch, compiled=True) == \
                read_through(data, chunk, monkeypatch, compiled=False), (data, chunk)


def test_compiled_sections_read_most_blocks_and_not_a_whole_car_at_once(car, monkeypatch):
    calls = []
    sections = car_module._fastrepo.sections

    def counted(buffer, pos, max_bytes):
        found, end = sections(buffer, pos, max_bytes)
        calls.append((len(found), end - pos))
        return found, end

    monkeypatch.setattr(car_module, "_fastrepo", SimpleNamespace(sections=counted))
    monkeypatch.setattr(car_module, "_FAST_BYTES", 4096)
    blocks = list(CarReader(chunks(car, len(car)), max_size=CAP).links())
    assert sum(found for found, _ in calls) == len(blocks)  # the whole CAR in one chunk: every block compiled
    assert len(calls) > 1 and max(size for _, size in calls) < 4096 + max(len(block) for _, block in blocks) + 40
