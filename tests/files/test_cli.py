"""`migration-assets files ...` end to end, and a run killed with SIGKILL mid-range then resumed."""

import os
import signal
import subprocess
import sys
import threading
import time

from tests.files.helpers import assert_bytes_equal, expire_claim, seed
from tests.files.s3_proxy import s3_proxy


def recorded(target) -> int:
    return target.execute("SELECT count(*) FROM migration_files").fetchone()[0]


def test_seed_then_migrate_prints_the_summary(files_env, dagster_home, target, s3, bucket, source_root, capsys):
    from migration_assets.files import cli as files_cli
    import argparse
    parser = argparse.ArgumentParser()
    files_cli.add_commands(parser.add_subparsers(dest="pipeline"))
    run = lambda *argv: parser.parse_args(list(argv)).handler(parser.parse_args(list(argv)))  # noqa: E731

    assert run("files", "seed", "--count", "120") == 0
    code = run("files", "migrate")

    out = capsys.readouterr().out
    assert code == 0, out
    assert "seeded 120 files" in out and "2/2 ranges migrated and verified" in out
    assert assert_bytes_equal(target, s3, bucket, source_root) == 120


def test_run_killed_mid_range_then_resumed_copies_no_file_twice(
    files_env, dagster_home, target, s3, bucket, source_root, moto_s3, monkeypatch
):
    """The first 100 PUTs pass, the next ones are held; once some copies are recorded the run is
    killed, and the held PUTs reach S3 unrecorded. The rerun releases the dead run's claim (aged in
    SQL) and copies the rest, each file once."""
    monkeypatch.setenv("FILES_RANGE_SIZE", "1000")  # one range
    seed(target, source_root, 400, sizes=(16_000,))
    gate, puts, lock = threading.Event(), [], threading.Lock()

    def hold_after_100_puts(method: str, path: str) -> None:
        if method == "PUT":
            with lock:
                puts.append(path)
                held = len(puts) > 100
            if held:
                gate.wait(60)

    with s3_proxy(moto_s3) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url, "FILES_RANGE_SIZE": "1000", "FILES_CONCURRENCY": "2"}
        command = [sys.executable, "-c", "import sys; from migration_assets.files.cli import add_commands; "
                   "import argparse; p = argparse.ArgumentParser(); add_commands(p.add_subparsers()); "
                   "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))", "files", "migrate"]
        proxy.before = hold_after_100_puts
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (recorded(target) and len(puts) > 100) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until some copies are recorded and some held
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 0 < recorded(target) <= 100, "the kill must land mid-range"
        state = target.execute("SELECT status FROM migration_ranges").fetchone()[0]
        assert state == "PROCESSING", process.stdout.read().decode()[-3000:]
        proxy.before = None
        gate.set()  # the held PUTs reach S3 after their client died: copies nobody recorded
        while sum(proxy.uploads.values()) < len(puts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(proxy.uploads.values()) == len(puts) > 100
        expire_claim(target, 0, 1000)  # the dead run's claim, as the next run finds it after the stale limit

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "1 stale released" in rerun.stdout
        assert target.execute("SELECT count(*) FROM migration_files WHERE status = 'SUCCESS'").fetchone()[0] == 400
        assert len(proxy.uploads) == 400 and set(proxy.uploads.values()) == {1}, proxy.uploads.most_common(3)
    assert assert_bytes_equal(target, s3, bucket, source_root) == 400
