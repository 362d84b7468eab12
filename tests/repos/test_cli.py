"""`migration-assets repos backfill` end to end: discovery and every due bucket, runs in the instance."""

import gc
import re

import dagster as dg

from migration_assets.cli import main
from tests.repos.conftest import handle
from tests.repos.helpers import ledger_row, stored_records

POSTS = "app.bsky.feed.post"


def test_backfill_command_prints_rates_and_outcomes(pds, target, dagster_home, instance, capsys):
    synced, gone = pds.create_account(handle()), "did:plc:" + "q" * 24
    pds.create_records(synced, POSTS, [{"$type": POSTS, "text": str(n), "createdAt": "2026-11-23T00:00:00Z"} for n in range(7)])

    code = main(["repos", "backfill", "--host", pds.pds.url, "--did", synced.did, "--did", gone])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"2 repos in [\d.]+ s: [\d.]+ users/min, [\d.]+ records/s", out), out
    assert "outcomes: deleted 1, synced 1" in out, out
    assert len(stored_records(target, synced.did)) == 7
    assert ledger_row(target, gone)["status"] == "deleted"
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"migration-assets/cli": "repos backfill"}))
    assert len(runs) >= 2, "the command's runs must show in the instance"


def test_backfill_command_names_the_next_step_when_repos_fail(pds, target, dagster_home, monkeypatch, capsys):
    account = pds.create_account(handle())
    monkeypatch.setenv("ATPROTO_ALLOW_PRIVATE_HOSTS", "false")
    code = main(["repos", "backfill", "--did", account.did])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "retry 1" in out and "next step:" in out, out


def test_backfill_command_needs_a_host_or_a_did(capsys):
    assert main(["repos", "backfill"]) == 2
    assert "--host" in capsys.readouterr().out


def test_the_command_freezes_what_its_imports_built_before_it_runs(capsys):
    # Else the collector's full passes rescan every imported object: a tenth of a backfill's CPU.
    gc.unfreeze()  # as in a fresh process
    main(["repos", "backfill"])
    assert gc.get_freeze_count() > 0
