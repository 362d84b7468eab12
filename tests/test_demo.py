"""README's demo command brings up the UI with every pipeline's assets, on embedded PostgreSQL, its own
local DynamoDB-API server and AT Protocol network; SIGTERM stops everything it started: the demo
exits 0, and the `dagster dev` process group (webserver, daemon, code server), the local servers and
the embedded PostgreSQL are gone."""

import json
import os
from pathlib import Path

from migration_assets.devstack.demo import SERVERS_FILE
from tests.e2e.stack import asset_nodes, port_closed, start_stack, stop_stack, wait_until


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every process on the machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry.name)] = (os.getpgid(int(entry.name)), cmdline)
            except (OSError, ProcessLookupError):
                pass  # exited meanwhile
    return found


def descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if parent is not None:
            children.setdefault(parent, set()).add(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "postgres" / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_demo_serves_every_pipeline_and_stops_cleanly(tmp_path):
    stack = start_stack(tmp_path, heights=25_000, args=["--repo-accounts", "2", "--blob-accounts", "1"])
    try:
        partitions = {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in asset_nodes(stack)}
        assert partitions["chain/block_metadata"] == [
            "000000000000-000000010000", "000000010000-000000020000", "000000020000-000000030000"
        ]
        assert partitions["chain/block_events"] == ["000000000000-000000100000"]
        assert len(partitions["atproto/repos"]) == 256
        assert {"atproto/repo_ledger", "atproto/blobs", "status/migration_status"} <= set(partitions)
        atproto = stack.atproto()
        assert len(atproto["repo_dids"]) == 2 and len(atproto["blob_migration_dids"]) == 1
        assert len(partitions["files/copied_files"]) == 4  # ids 1-300 in ranges of 100 aligned at 0
        servers = json.loads((stack.data_dir / SERVERS_FILE).read_text())
        assert {"dynalite", "SeaweedFS S3", "atproto-network", "dagster dev"} <= set(servers), servers

        # What must be gone afterwards, seen running first (so the checks below can fail).
        running = processes()
        started = descendants(stack.process.pid)
        [dagster_dev] = [pid for pid in started if " dagster dev " in running[pid][1] + " "
                         and running[pid][0] == pid]  # its own session: the group leader
        group = {pid for pid, (pgid, _) in running.items() if pgid == dagster_dev}
        [daemon] = [pid for pid in group if "dagster-daemon run" in running[pid][1]
                    or "dagster._daemon" in running[pid][1]]
        postgres = postmaster_pid(stack.data_dir)
        assert postgres is not None and alive(postgres)
    finally:
        stop_stack(stack)
    assert stack.process.returncode == 0, stack.log_tail()
    servers = [*servers.values(), atproto["plc"], *atproto["pdses"]]
    wait_until(lambda: all(port_closed(url) for url in servers), 30, "the demo's servers to stop", stack)
    wait_until(lambda: not any(alive(pid) for pid in group), 30, "the dagster dev process group to exit", stack)
    assert not alive(daemon)
    pgdata = str(stack.data_dir / "postgres")
    wait_until(lambda: not alive(postgres) and not [p for p, (_, cmd) in processes().items() if pgdata in cmd],
               30, "the embedded PostgreSQL to stop", stack)
    assert not [pid for pid in started if alive(pid)], "processes the demo started are still running"
