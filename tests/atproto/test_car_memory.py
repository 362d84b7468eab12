"""Memory of a repo read: blocks the MST does not reach must not stay in memory, however many there are.
Measured as peak RSS (VmHWM) of a fresh process, so nothing else the test run holds counts."""

import json
import subprocess
import sys

from migration_assets.core.settings import PROJECT_ROOT

JUNK = 200 * 1024 * 1024
LIMIT_KIB = 30 * 1024


def test_200_mib_of_unreferenced_node_shaped_blocks_grow_peak_rss_by_at_most_30_mib(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.atproto.car_memory_worker", str(tmp_path / "padded.car"), str(JUNK)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["records"] == result["expected"] > 0  # the repo itself was read whole
    assert result["growth_kib"] <= LIMIT_KIB, f"peak RSS grew {result['growth_kib'] // 1024} MiB reading the CAR"
