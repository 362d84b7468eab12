"""REPO_* settings: a bad value fails at start-up naming the variable; the resource shows what is in force."""

import json
import os
import subprocess
import sys

import pytest

from migration_assets.core.settings import SettingsError
from migration_assets.repos.settings import RepoSettings


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("REPO_VERIFY_SIGNATURES", "ture", "true, false, 1, 0, yes, no"),  # used to read as false: checks off
    ("REPO_CONCURRENCY", "eight", "integer"),
    ("REPO_BUCKETS", "0", "greater than or equal to 1"),
    ("REPO_SENSOR_TICK_SECONDS", "-1", "greater than 0"),
    ("REPO_FETCH_MIN_BYTES_PER_SECOND", "0", "greater than 0"),  # no rate: every download would be cut
    ("REPO_WHOLE_CAR_MEMORY_BYTES", "-1", "greater than or equal to 0"),
])
def test_a_bad_value_fails_naming_the_variable(monkeypatch, name, value, accepts):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"{name} \(got '{value}'\): .*{accepts}"):
        RepoSettings.load()


def test_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("REPO_DISCOVERY_HOSTS", " https://a.example/ ,,https://b.example//")
    monkeypatch.setenv("REPO_VERIFY_SIGNATURES", "No")
    monkeypatch.setenv("REPO_FETCH_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("REPO_FETCH_MIN_BYTES_PER_SECOND", "1000")
    monkeypatch.setenv("REPO_WHOLE_CAR_MEMORY_BYTES", "0")  # every export streams
    monkeypatch.setenv("REPO_CONCURRENCY", "")  # empty is unset: the default
    settings = RepoSettings.load()
    assert settings.discovery_hosts == ["https://a.example", "https://b.example"]
    assert (settings.verify_signatures, settings.fetch_timeout_seconds, settings.concurrency) == (False, 2.5, 8)
    assert (settings.fetch_min_bytes_per_second, settings.whole_car_memory_bytes) == (1000, 0)
    assert RepoSettings.from_env() == settings


def load_definitions(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Load the project's definitions in a fresh process, as a code server does, and print the
    repo_source resource's configured values (what the UI shows)."""
    script = ("from migration_assets.definitions import defs; import json; "
              "print(defs.resources['repo_source'].get_resource_definition().config_schema.default_value_as_json_str)")
    return subprocess.run([sys.executable, "-c", script], env=os.environ | env, capture_output=True, text=True,
                          timeout=300)


def test_definitions_refuse_to_load_with_a_bad_boolean():
    loaded = load_definitions({"REPO_VERIFY_SIGNATURES": "ture"})
    assert loaded.returncode != 0
    assert "REPO_VERIFY_SIGNATURES (got 'ture')" in loaded.stderr


def test_the_resource_shows_the_configuration_in_force():
    loaded = load_definitions({"REPO_CONCURRENCY": "3", "REPO_VERIFY_SIGNATURES": "false"})
    assert loaded.returncode == 0, loaded.stderr
    shown = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert (shown["concurrency"], shown["verify_signatures"], shown["max_car_bytes"]) == (3, False, 512 * 1024 * 1024)
