"""A #commit's checks, in this process and in worker processes (the same results), on both curves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from migration_assets.atproto.cid import CID, link_text
from migration_assets.atproto.signature import PublicKey
from migration_assets.repos.collections import CollectionFilter
from migration_assets.repos.commit_check import CommitChecker, CommitToCheck, check_commit
from tests.atproto.builders import build_mst, car_bytes, private_key, put, signed_commit

DID, REV = "did:plc:checkedcommit", "3l5aaaaaaaa22"
POST = "app.bsky.feed.post"
EVERYTHING = CollectionFilter()


def commit_event(key: ec.EllipticCurvePrivateKey, n: int = 0, did: str = DID) -> CommitToCheck:
    """A commit creating one post, with its MST, as a #commit event carries it."""
    blocks: dict[CID, bytes] = {}
    path = f"{POST}/3k{n:03d}"
    record = put(blocks, {"$type": POST, "text": f"post {n}", "createdAt": "2026-12-04T10:00:00.000Z"})
    data = build_mst({path: record}, blocks)
    commit_block = signed_commit(key, data, did=did, rev=REV)
    commit = CID.for_block(commit_block)
    car = car_bytes([commit], [(commit, commit_block), *blocks.items()])
    return CommitToCheck(did, REV, bytes(commit), car, (("create", path, bytes(record)),),
                         signing_key=PublicKey(key.public_key()).did_key().removeprefix("did:key:"))


@pytest.mark.parametrize("curve", [ec.SECP256K1(), ec.SECP256R1()])
def test_a_signed_commit_checks_and_a_stranger_s_signature_does_not(curve):
    event = commit_event(private_key(curve, 0xA11CE))
    checked = check_commit(event, EVERYTHING)
    assert checked.problem is None and not checked.bad_signature
    assert [json.loads(row[1])["text"] for row in checked.records.values()] == ["post 0"]
    assert checked.records[event.ops[0][1]][0] == link_text(event.ops[0][2])
    stranger = commit_event(private_key(curve, 0xBAD), did=DID)
    forged = check_commit(CommitToCheck(**{**vars(stranger), "signing_key": event.signing_key}), EVERYTHING)
    assert forged.bad_signature and "does not verify" in forged.problem


def test_an_op_the_signed_tree_does_not_hold_is_refused_and_filtered_records_are_not_staged():
    event = commit_event(private_key(ec.SECP256K1(), 7))
    action, path, cid = event.ops[0]
    injected = CommitToCheck(**{**vars(event), "ops": (*event.ops, (action, path + "x", cid))})
    assert "disagrees with the signed commit's tree" in check_commit(injected, EVERYTHING).problem
    assert check_commit(event, CollectionFilter.parse("app.bsky.graph.*")).records == {}


def test_workers_give_the_same_results_and_a_dead_worker_falls_back_to_this_process():
    keys = [private_key(ec.SECP256K1(), 11), private_key(ec.SECP256R1(), 12)]
    events = [commit_event(keys[n % 2], n) for n in range(6)]
    events[3] = CommitToCheck(**{**vars(events[3]), "signing_key": events[2].signing_key})  # another's key
    expected = [check_commit(e, EVERYTHING) for e in events]
    with CommitChecker(2, EVERYTHING) as checker:
        assert checker.submit(events)() == expected  # in this process while the workers start
        assert checker.wait_started(60)
        assert checker.submit(events)() == expected
        assert [c.problem is None for c in expected] == [True, True, True, False, True, True]
        pool = checker._pool
        for pid in checker.worker_pids:
            os.kill(pid, signal.SIGKILL)
        # Once the pool has seen its workers die, handing it work raises at once (not from the result):
        # the batch is checked here all the same.
        deadline = time.monotonic() + 30
        while not pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._broken, "the pool never saw its workers die"
        assert checker.submit(events)() == expected
        assert checker._pool is None, "the broken pool was not let go"


def _checker_then_hang(collections) -> None:  # a follower's stand-in, run in a child and SIGKILLed
    checker = CommitChecker(1, collections)
    assert checker.wait_started(60)
    print(checker.worker_pids[0], flush=True)
    signal.pause()


def test_workers_exit_when_the_follower_is_killed():
    code = ("import sys; sys.path.insert(0, '.'); from tests.repos.test_commit_check import _checker_then_hang, "
            "EVERYTHING; _checker_then_hang(EVERYTHING)")
    follower = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(follower.stdout.readline())
        os.kill(worker, 0)  # the worker is up
    finally:
        follower.kill()
        follower.wait()
    deadline = time.monotonic() + 30  # the worker polls its parent every second
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker), f"check worker {worker} outlived its follower"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie waiting for init's reap is gone too
    except FileNotFoundError:
        return False
