"""`migration-assets blobs migrate` in-process and as a process killed with SIGKILL mid-blob."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg

from migration_assets.blobs import cli as blobs_cli
from tests.blobs.pds_proxy import PdsProxy


def run_cli(argv: list[str]) -> int:
    return blobs_cli.main(argv)


def migrate_args(did: str, old: str, new: str) -> list[str]:
    return ["blobs", "migrate", "--did", did, "--old-pds", old, "--new-pds", new]


def test_cli_migrates_and_prints_the_summary(dagster_home, migrated, atproto_network, target, monkeypatch, capsys):
    account = migrated([1000, 2000, 3000])
    old, new = atproto_network.pdses[0].url, atproto_network.pdses[1].url
    monkeypatch.setenv("ATPROTO_OLD_PASSWORD", account.old.password)
    monkeypatch.setenv("ATPROTO_NEW_PASSWORD", account.new.password)

    code = run_cli(migrate_args(account.did, old, new))

    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{account.did}: pending_prefs; blobs 3/3, 6000 bytes transferred in all, 0 failed" in out
    runs = dg.DagsterInstance.get().get_runs(dg.RunsFilter(tags={"migration-assets/cli": "blobs migrate"}))
    assert account.did in {run.tags["dagster/partition"] for run in runs}
    assert account.old.password not in out and account.new.password not in out


def test_cli_needs_the_passwords_from_the_environment(dagster_home, target, monkeypatch, capsys):
    monkeypatch.delenv("ATPROTO_OLD_PASSWORD", raising=False)
    monkeypatch.setenv("ATPROTO_NEW_PASSWORD", "x")
    code = run_cli(migrate_args("did:plc:" + "a" * 24, "https://a.example", "https://b.example"))
    assert code == 2
    assert "set ATPROTO_OLD_PASSWORD" in capsys.readouterr().out


def test_cli_refuses_a_bad_did(dagster_home, target, monkeypatch, capsys):
    monkeypatch.setenv("ATPROTO_OLD_PASSWORD", "x")
    monkeypatch.setenv("ATPROTO_NEW_PASSWORD", "y")
    assert run_cli(migrate_args("alice.test", "https://a.example", "https://b.example")) == 2
    assert "--did must be a did:plc or did:web" in capsys.readouterr().out


def test_killed_mid_blob_then_rerun_sends_each_blob_once(
    dagster_home, migrated, atproto_network, target, tmp_path, seeders
):
    account = migrated([20_000 + i for i in range(16)])
    old_proxy, new_proxy = PdsProxy(atproto_network.pdses[0].url), PdsProxy(atproto_network.pdses[1].url)
    old_proxy.blob_delay = 0.4  # every download stalls half way: the kill lands inside one
    env = {**os.environ, "MIGRATION_DATA_DIR": str(tmp_path / "data"),
           "ATPROTO_OLD_PASSWORD": account.old.password, "ATPROTO_NEW_PASSWORD": account.new.password}
    command = [sys.executable, "-m", "migration_assets.blobs.cli",
               *migrate_args(account.did, old_proxy.url, new_proxy.url)]
    staging = tmp_path / "data" / "tmp" / "atproto-blobs" / account.did / "blobs"
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        # Killed once a download has stalled half way and its first half is staged on disk (the proxy
        # stalls as it sends; the client may not have written the half yet: the kill waits for it).
        while not (sum(new_proxy.uploads.values()) >= 5 and old_proxy.stalling.is_set()
                   and staging.is_dir() and any(staging.iterdir())):
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the migration did not get going"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        sent_before = sum(new_proxy.uploads.values())
        assert len(list(staging.iterdir())) == 1  # the blob it was downloading

        old_proxy.blob_delay = 0
        # The killed run's lease has not lapsed yet: a rerun now leaves the account and its files alone.
        held = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert held.returncode == 1, held.stdout + held.stderr
        assert "nothing done:" in held.stdout and "is being moved by run" in held.stdout
        assert "if it was killed, run this again once its lease has lapsed" in held.stdout
        assert len(list(staging.iterdir())) == 1 and sum(new_proxy.uploads.values()) == sent_before

        target.execute("UPDATE blob_migrations SET lease_expires_at = now() - interval '1 second' WHERE did = %s",
                       (account.did,))  # the lease lapses (its heartbeat died with the process)
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        old_proxy.stop()
        new_proxy.stop()

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert 5 <= sent_before < 16
    assert sorted(new_proxy.uploads.values()) == [1] * 16  # every blob, none twice
    assert seeders[1].list_missing_blobs(seeders[1].login(account.new)) == []
    assert not list(staging.iterdir())
    migrations = target.execute(
        "SELECT count(*), min(status) FROM blob_migrations WHERE did = %s", (account.did,)
    ).fetchone()
    assert migrations == (1, "pending_prefs")  # the killed request was resumed, not duplicated
