"""CPU per event of following a stream, by phase, over real subscribeRepos frames replayed from a file.

`capture` starts a reference PDS (npm @atproto/dev-env) and a PLC directory as bench/repo_stream.py does,
backfill-sized accounts and `--commits` commits of one record each round-robin over them, then saves the
stream's raw frames and each DID's signing key (pickle). `replay` measures, in this process with
time.process_time over every frame (best of `--rounds`): decoding the frames (stream.decode_frame), the
commit check (commit_check.check_commit) split into its phases, and the follower's per-event work that
needs no database (the check item, the batch's writes). With `--profile` it also prints a cProfile.

    python bench/repo_stream_cpu.py capture /tmp/frames.pickle --accounts 50 --commits 5000
    python bench/repo_stream_cpu.py replay /tmp/frames.pickle [--profile]
"""

import argparse
import cProfile
import pickle
import pstats
import sys
import time
from pathlib import Path


def capture(path: Path, accounts: int, commits: int) -> None:
    from websockets.sync.client import connect

    from migration_assets.atproto.identity import IdentityResolver
    from migration_assets.devstack.atproto import PdsSeeder, populate, start_atproto_network
    from migration_assets.repos.stream import websocket_url

    try:
        from bench.repo_stream import write_commits
    except ImportError:
        from repo_stream import write_commits

    with start_atproto_network(0, log_path=Path("/tmp/bench-stream-cpu-plc.log")) as plc, start_atproto_network(
        1, plc_url=plc.plc_url, log_path=Path("/tmp/bench-stream-cpu.log")
    ) as network:
        seeder = PdsSeeder(network.pdses[0])
        made = populate(seeder, accounts, 1, handle_prefix="cpu")
        write_commits(seeder, made, commits, 1)
        frames = []
        with connect(websocket_url(seeder.pds.url, 0), max_size=1 << 24) as ws:
            while True:
                try:
                    frames.append(ws.recv(timeout=2.0))
                except TimeoutError:
                    break
        with IdentityResolver(plc_url=plc.plc_url, allow_private_hosts=True) as resolver:
            keys = {a.did: resolver.resolve(a.did).signing_key for a in made}
        seeder.close()
    path.write_bytes(pickle.dumps({"frames": frames, "keys": keys}))
    print(f"{len(frames)} frames, {len(keys)} keys -> {path}")


def _best(rounds: int, fn, *args) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - started)
    return best


def replay(path: Path, rounds: int, profile: bool) -> None:
    from migration_assets.atproto.car import read_blocks
    from migration_assets.atproto.mst import lookup, parse_signed_commit
    from migration_assets.atproto.signature import verify_commit
    from migration_assets.repos import commit_check
    from migration_assets.repos.collections import CollectionFilter
    from migration_assets.repos.follow import BATCH_EVENTS, _BatchWrites, _to_check
    from migration_assets.repos.stream import CommitEvent, decode_frame

    saved = pickle.loads(path.read_bytes())
    frames, keys = saved["frames"], saved["keys"]
    events = [decode_frame(f) for f in frames]
    commits = [e for e in events if isinstance(e, CommitEvent) and not e.too_big and e.repo in keys]
    items = [_to_check(e, keys[e.repo]) for e in commits]
    collections = CollectionFilter()
    checked = [commit_check.check_commit(item, collections) for item in items]
    problems = [c.problem for c in checked if c.problem]
    if problems:
        raise SystemExit(f"{len(problems)} commits failed their check, e.g. {problems[0]}")
    n = len(items)
    print(f"{len(frames)} frames, {n} commits checked; best of {rounds} rounds, CPU µs per commit:")

    def decode_all():
        for frame in frames:
            decode_frame(frame)

    def car_all():
        for item in items:
            read_blocks(item.blocks, max_size=commit_check.MAX_BLOCKS_BYTES)

    block_sets = [read_blocks(item.blocks, max_size=commit_check.MAX_BLOCKS_BYTES) for item in items]
    commit_blocks = [blocks[item.commit] for blocks, item in zip(block_sets, items)]
    parsed = [parse_signed_commit(block) for block in commit_blocks]

    def parse_all():
        for block in commit_blocks:
            parse_signed_commit(block)

    def verify_all():
        for block, item, (_, signed) in zip(commit_blocks, items, parsed):
            verify_commit(block, item.signing_key, signed=signed)

    def lookup_all():
        for blocks, item, (commit, _) in zip(block_sets, items, parsed):
            nodes = {}
            for _, op_path, _ in item.ops:
                lookup(blocks, bytes(commit.data), op_path, nodes)

    def staged_all():
        for blocks, item in zip(block_sets, items):
            for action, _, cid in item.ops:
                if action != "delete":
                    commit_check.record_json(blocks[cid])

    def check_all():
        for item in items:
            commit_check.check_commit(item, collections)

    def to_check_all():
        for event in commits:
            _to_check(event, keys[event.repo])

    def writes_all():
        writes = _BatchWrites(collections)
        for event, result in zip(commits, checked):
            writes.commit(event, result)

    size = BATCH_EVENTS // 2  # as CommitChecker sends a batch's commits to 2 workers
    parts = [items[i:i + size] for i in range(0, n, size)]
    results = [checked[i:i + size] for i in range(0, n, size)]
    sent, returned = [pickle.dumps(p, pickle.HIGHEST_PROTOCOL) for p in parts], [pickle.dumps(r) for r in results]

    def send_all():  # the follower's side of the worker round trip; a worker does the opposite
        for part in parts:
            pickle.dumps(part, pickle.HIGHEST_PROTOCOL)
        for data in returned:
            pickle.loads(data)

    def receive_all():
        for data in sent:
            pickle.loads(data)
        for result in results:
            pickle.dumps(result, pickle.HIGHEST_PROTOCOL)

    phases = {"frame decode (decode_frame)": (decode_all, len(frames)),
              "check: CAR slice -> blocks": (car_all, n), "check: parse_signed_commit": (parse_all, n),
              "check: verify_commit": (verify_all, n), "check: MST lookup of the ops": (lookup_all, n),
              "check: record_json (record JSON)": (staged_all, n), "check_commit (all)": (check_all, n),
              "follower: _to_check": (to_check_all, n), "follower: _BatchWrites.commit": (writes_all, n),
              "follower: pickling to/from workers": (send_all, n), "worker: unpickling/pickling": (receive_all, n)}
    for name, (fn, count) in phases.items():
        print(f"  {name:36s} {_best(rounds, fn) / count * 1e6:8.1f}")
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: (decode_all(), check_all(), to_check_all(), writes_all()))
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(30)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("path", type=Path)
    cap.add_argument("--accounts", type=int, default=50)
    cap.add_argument("--commits", type=int, default=5000)
    rep = sub.add_parser("replay")
    rep.add_argument("path", type=Path)
    rep.add_argument("--rounds", type=int, default=5)
    rep.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "capture":
        capture(args.path, args.accounts, args.commits)
    else:
        replay(args.path, args.rounds, args.profile)


if __name__ == "__main__":
    main()
