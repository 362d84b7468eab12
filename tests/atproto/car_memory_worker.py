"""Run in a fresh process: write a repo CAR padded with unreferenced node-shaped blocks, then read it
with the repo snapshot reader and print how much the peak RSS grew while reading (KiB, from VmHWM)."""

import json
import os
import sys

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID, encode_varint
from migration_assets.core.concurrency import ByteBudget
from migration_assets.repos.snapshot import read_snapshot
from tests.atproto.conftest import make_repo


def peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def write_car(path: str, junk_bytes: int, junk_block: int) -> int:
    """The repo's blocks interleaved with node-shaped junk ({e: bytes, l: null}); returns the repo's
    record count. Written as it goes: the CAR is never whole in this process's memory."""
    repo = make_repo()
    blocks = list(repo.blocks.items())
    with open(path, "wb") as out:
        header = dagcbor.encode({"version": 1, "roots": [repo.commit]})
        out.write(encode_varint(len(header)) + header)
        n = 0
        while n * junk_block < junk_bytes or blocks:
            if blocks and n % 50 == 0:
                cid, data = blocks.pop()
            else:
                data = dagcbor.encode({"e": n.to_bytes(8, "big") * (junk_block // 8), "l": None})
                cid = CID.for_block(data)
            section = bytes(cid) + data
            out.write(encode_varint(len(section)) + section)
            n += 1
    return len(repo.records)


def chunks(path: str):
    with open(path, "rb") as car:
        while chunk := car.read(64 * 1024):
            yield chunk


if __name__ == "__main__":
    path, junk_bytes = sys.argv[1], int(sys.argv[2])
    records = write_car(path, junk_bytes, junk_block=2048)
    before = peak_rss_kib()
    # 4 MiB for whole CARs: the first 2 MiB (half) are read as if the CAR might fit, then let go as it streams.
    whole_cars = ByteBudget(4 << 20)
    with read_snapshot("did:plc:testrepo", chunks(path), 2 * junk_bytes, whole_cars=whole_cars) as snapshot:
        seen = snapshot.records
    os.unlink(path)
    print(json.dumps({"records": seen, "expected": records, "growth_kib": peak_rss_kib() - before}))
