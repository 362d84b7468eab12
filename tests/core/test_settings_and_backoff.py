"""The one settings mechanism and the one backoff: strict parsing, errors naming the variable, the
README's settings table made from the models."""

import random

import pytest

from migration_assets.core.backoff import Backoff
from migration_assets.core.settings import (
    PROJECT_ROOT, CoreSettings, EnvBool, EnvSettings, SettingsConfigDict, SettingsError,
)
from migration_assets.core.settings_table import readme_table, render, settings_models


class _Example(EnvSettings):
    model_config = SettingsConfigDict(env_prefix="EXAMPLE_", env_ignore_empty=True, extra="ignore")
    flag: EnvBool = True
    count: int = 3


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("YES", True),
                                           ("false", False), ("0", False), ("no", False)])
def test_booleans_accept_only_the_six_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("EXAMPLE_FLAG", raw)
    assert _Example.load().flag is expected


@pytest.mark.parametrize("raw", ["ture", "on", "off", "y", "2", "enabled"])
def test_any_other_boolean_fails_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("EXAMPLE_FLAG", raw)
    with pytest.raises(SettingsError, match=rf"EXAMPLE_FLAG \(got '{raw}'\).*true, false, 1, 0, yes, no"):
        _Example.load()


def test_an_empty_value_means_the_default_and_a_bad_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("EXAMPLE_COUNT", "")
    assert _Example.load().count == 3
    monkeypatch.setenv("EXAMPLE_COUNT", "three")
    with pytest.raises(SettingsError, match="EXAMPLE_COUNT"):
        _Example.load()


def test_a_bad_secret_is_named_but_never_shown(monkeypatch):
    class _Secretive(EnvSettings):
        model_config = SettingsConfigDict(env_prefix="EXAMPLE_", env_ignore_empty=True, extra="ignore")
        secret_key: int = 0

    monkeypatch.setenv("EXAMPLE_SECRET_KEY", "hunter2")
    with pytest.raises(SettingsError) as error:
        _Secretive.load()
    assert "EXAMPLE_SECRET_KEY" in str(error.value) and "hunter2" not in str(error.value)


def test_the_database_url_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "postgresql://u@h/db")
    assert CoreSettings.load().database_url == "postgresql://u@h/db"


def test_readme_table_is_the_one_the_models_make():
    """Regenerate with `python -m migration_assets.core.settings_table --write README.md`."""
    assert readme_table((PROJECT_ROOT / "README.md").read_text()) == render()


def test_every_setting_is_described():
    undescribed = [name for model in settings_models() for name, _, text in model.describe() if not text]
    assert undescribed == []


def test_backoff_grows_to_its_cap_with_jitter_inside_the_ceiling():
    backoff = Backoff(base=2, cap=60)
    assert [backoff.ceiling(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    rng = random.Random(7)
    delays = [backoff.delay(5, rng) for _ in range(200)]
    assert all(0 <= d <= 32 for d in delays) and max(delays) > 16 and min(delays) < 16


def test_backoff_floor_keeps_a_minimum_and_huge_failure_counts_stay_finite():
    backoff = Backoff(base=60, cap=3600, floor=0.5)
    rng = random.Random(1)
    assert all(1800 <= backoff.delay(10_000, rng) <= 3600 for _ in range(100))
    with pytest.raises(ValueError):
        Backoff(base=10, cap=5)
