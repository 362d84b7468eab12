"""The code location loads as Dagster loads it, with every asset, check and sensor in place."""

import os
import subprocess
import sys

from migration_assets.definitions import defs


def test_dagster_validates_the_code_location(tmp_path):
    # An empty DAGSTER_HOME: validation must not depend on a running instance.
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "migration_assets.definitions"],
        capture_output=True, text=True, env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_definitions_hold_the_chain_assets_and_checks():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"chain/block_metadata", "chain/block_events"} <= keys
    check_names = {key.name for key in graph.asset_check_keys}
    assert {"block_rows_match_source", "event_rows_match_source", "event_sequence_rules"} <= check_names
