"""Settings read from the environment: the project's stable configuration interface (see README).

One mechanism for every pipeline: each has one `EnvSettings` model (pydantic-settings) whose fields
are its environment variables. `load()` parses it once per process; a bad value fails there, naming
the variable and what it accepts, so a typo never silently becomes a default.
"""

import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict  # noqa: F401 (re-exported)

# The package itself (data files that ship with it: SQL migrations, pools.yaml, dynalite.js).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The checkout, for what only a checkout has (workspace.yaml, node_modules, README): the demo
# and the tests. Never used by code that runs from an installed package.
PROJECT_ROOT = PACKAGE_ROOT.parent

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def parse_bool(value: Any) -> Any:
    """true/false/1/0/yes/no (any case) and nothing else: `ture` is an error, not a silent false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be one of true, false, 1, 0, yes, no")


EnvBool = Annotated[bool, BeforeValidator(parse_bool)]


def parse_list(value: Any) -> Any:
    """A comma-separated environment value as a list (blank items dropped)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(parse_list)]


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


class EnvSettings(BaseSettings):
    """Base of every pipeline's settings. Subclasses set `env_prefix` in their model_config; a field
    `x` of prefix `P_` is read from `P_X`. Empty values count as unset (the default applies)."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", case_sensitive=False)

    @classmethod
    def env_name(cls, field: str) -> str:
        info = cls.model_fields[field]
        alias = info.validation_alias or info.alias
        if isinstance(alias, str):
            return alias.upper()
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def load(cls: type["S"], **overrides: Any) -> "S":
        """Parse the environment (overrides win); a bad value raises SettingsError naming the variable."""
        try:
            return cls(**overrides)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                field = str(item["loc"][0]) if item["loc"] else "?"
                name = cls.env_name(field) if field in cls.model_fields else field
                raw = os.environ.get(name)
                shown = "" if raw is None or _is_secret(name) else f" (got {raw!r})"
                problems.append(f"{name}{shown}: {item['msg']}")
            raise SettingsError("invalid configuration: " + "; ".join(problems)) from None

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default as written in the environment, description) of every field: the README's
        table is made from this. A computed default (from another setting) is shown as empty."""
        rows = []
        for field, info in cls.model_fields.items():
            default = "" if info.is_required() or info.default_factory else _as_env_text(info.default)
            rows.append((cls.env_name(field), default, info.description or ""))
        return rows


def _as_env_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "strftime"):
        return value.strftime("%H:%M")
    return str(value)


S = TypeVar("S", bound=EnvSettings)


def _is_secret(name: str) -> bool:
    return any(word in name for word in ("PASSWORD", "SECRET", "KEY", "TOKEN", "DATABASE_URL"))


class CoreSettings(EnvSettings):
    """Shared by every pipeline: where the target database and the embedded state live."""

    model_config = SettingsConfigDict(env_prefix="MIGRATION_", env_ignore_empty=True, extra="ignore")

    database_url: str | None = Field(
        default=None, description="target PostgreSQL URL; unset: the embedded server (secret: never shown)")
    data_dir: Path = Field(
        default=Path(".migration-data"), description="folder for embedded state (PostgreSQL data, demo Dagster home)")


@cache
def _cached(cls: type[S]) -> S:
    return cls.load()


def settings_of(cls: type[S]) -> S:
    """The process's parsed settings of `cls` (parsed once). Tests that change the environment call
    `reload_settings()`."""
    return _cached(cls)


def reload_settings() -> None:
    _cached.cache_clear()


def data_dir() -> Path:
    """Project-local folder for embedded state (PostgreSQL data, Dagster home of the demo). Read each
    time: the demo and the tests point it elsewhere at run time."""
    return CoreSettings.load().data_dir.resolve()


def _env_int(name: str, default: int) -> int:
    """Transitional: modules not yet moved to a settings model (to be removed)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
