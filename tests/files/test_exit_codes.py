"""`migration-assets files migrate` tells the truth: exit 0 only when every file of its ranges is
copied and verified, the copied / unchanged / failed counts, and the first failures by file."""

import argparse

import pytest

from migration_assets.core.instance import project_instance
from migration_assets.files import assets
from migration_assets.files import cli as files_cli


@pytest.fixture
def run(files_env, dagster_home, capsys):
    parser = argparse.ArgumentParser()
    files_cli.add_commands(parser.add_subparsers(dest="pipeline"))

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        args = parser.parse_args(list(argv))
        code = args.handler(args)
        return code, capsys.readouterr().out
    return run


def last_result_metadata() -> str:
    event = project_instance().get_latest_materialization_event(assets.COPIED_FILES)
    return event.asset_materialization.metadata["result"].value


def add_source(target, uri: str, name: str) -> int:
    return target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, %s) RETURNING file_id",
                          (uri, name)).fetchone()[0]


def test_all_copied_and_verified_exits_0_with_the_counts(run, target, source_root):
    assert run("files", "seed", "--count", "120")[0] == 0  # ids 1-120: ranges [0, 100) and [100, 200)
    code, out = run("files", "migrate")
    assert code == 0, out
    assert "files: 120 copied, 0 unchanged, 0 failed\n" in out and "2/2 ranges migrated and verified" in out
    assert "first failures" not in out

    (source_root / "late.txt").write_bytes(b"listed after the first run")
    add_source(target, "late.txt", "late.txt")  # reopens [100, 200)
    target.commit()
    code, out = run("files", "migrate")
    assert code == 0, out
    assert "files: 1 copied, 21 unchanged, 0 failed\n" in out and "1/1 ranges migrated and verified" in out
    assert last_result_metadata() == "1 copied, 21 unchanged, 0 failed: verified (every file SUCCESS, every object as recorded)"
    assert last_result_metadata() in out


def test_a_failed_file_exits_non_zero_and_names_the_file_uri_and_reason(run, target, source_root, tmp_path):
    (source_root / "good.txt").write_bytes(b"fine")
    add_source(target, "good.txt", "good.txt")
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes(b"not under the root")
    refused = add_source(target, str(outside), "elsewhere.txt")  # absolute, not under FILES_SOURCE_ROOT
    missing = add_source(target, "gone/missing.txt", "missing.txt")
    target.commit()

    code, out = run("files", "migrate")

    assert code != 0, out
    assert "files: 1 copied, 0 unchanged, 2 failed (2 awaiting a retry)\n" in out
    assert "0/1 ranges migrated and verified" in out and "migrated and verified\n" not in out.split("0/1")[0]
    first = out.split("first failures:\n")[1].splitlines()
    assert first[0].startswith(f"  file {refused} {str(outside)!r} (FAIL): ") and "is not under the root" in first[0]
    assert first[1].startswith(f"  file {missing} 'gone/missing.txt' (FAIL): source file missing")
    assert last_result_metadata() == "1 copied, 0 unchanged, 2 failed (2 awaiting a retry): NOT verified"
    assert last_result_metadata() in out

    code, out = run("files", "retry")  # still failing: still non-zero
    assert code != 0 and "retried 2 files: 0 copied, 0 unchanged, 2 failed" in out, out
