"""`migration-assets files ...` end to end, and a run killed with SIGKILL mid-range then resumed."""

import os
import signal
import subprocess
import sys
import time


from tests.files.helpers import assert_bytes_equal, seed
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
    monkeypatch.setenv("FILES_RANGE_SIZE", "1000")  # one range
    seed(target, source_root, 400, sizes=(16_000,))
    with s3_proxy(moto_s3) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url, "FILES_RANGE_SIZE": "1000", "FILES_CONCURRENCY": "2",
               "FILES_STALE_MINUTES": "0.02"}  # 1.2 s: the rerun's cleanup releases the dead run's range
        command = [sys.executable, "-c", "import sys; from migration_assets.files.cli import add_commands; "
                   "import argparse; p = argparse.ArgumentParser(); add_commands(p.add_subparsers()); "
                   "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))", "files", "migrate"]
        proxy.before = lambda method, path: time.sleep(0.01) if method == "PUT" else None  # >= 2 s in all: the kill lands mid-range
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while recorded(target) == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert 0 < recorded(target) < 400, "the kill must land mid-range"
        state = target.execute("SELECT status FROM migration_ranges").fetchone()[0]
        assert state == "PROCESSING", process.stdout.read().decode()[-3000:]
        time.sleep(1.5)
        proxy.before = None

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "1 stale released" in rerun.stdout
        assert target.execute("SELECT count(*) FROM migration_files WHERE status = 'SUCCESS'").fetchone()[0] == 400
        assert len(proxy.uploads) == 400 and set(proxy.uploads.values()) == {1}, proxy.uploads.most_common(3)
    assert assert_bytes_equal(target, s3, bucket, source_root) == 400
