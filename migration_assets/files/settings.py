"""The file pipeline's settings, read from the environment (FILES_*), validated at the boundary."""

import os
from datetime import time
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator

from migration_assets.core.settings import data_dir

MIB = 1024 * 1024


def _env(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw.strip() == "" else raw.strip()


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name, "true" if default else "false").lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def parse_clock(value: str, name: str) -> time:
    try:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{name} must be HH:MM, got {value!r}") from None


class WindowSettings(BaseModel):
    """When copying may happen: nightly from `start` to `end` (crossing midnight when start > end),
    plus all of Saturday and Sunday, in `tz`. Disabled: always open."""

    enabled: bool = True
    tz: str = "America/New_York"
    start: time = time(22, 0)
    end: time = time(6, 0)
    weekends: bool = True

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"FILES_RUN_WINDOW_TZ: unknown time zone {value!r} (use an IANA name)") from None
        return value


class FilesSettings(BaseModel):
    source_root: Path = Field(description="FILES_SOURCE_ROOT: source_files.file_uri is relative to it")
    bucket: str = Field(description="FILES_S3_BUCKET")
    prefix: str = Field(default="", description="FILES_S3_PREFIX: key prefix, e.g. 'archive/'")
    range_size: int = Field(default=10_000, gt=0, description="FILES_RANGE_SIZE: file ids per range")
    concurrency: int = Field(default=8, gt=0, le=64, description="FILES_CONCURRENCY: uploads in flight per run")
    multipart_threshold: int = Field(default=100 * MIB, ge=5 * MIB,
                                     description="FILES_MULTIPART_THRESHOLD_MB: one PUT up to this size")
    part_size: int = Field(default=8 * MIB, ge=5 * MIB, description="FILES_PART_SIZE_MB (S3 minimum 5)")
    max_retries: int = Field(default=3, ge=0, description="FILES_MAX_RETRIES: retries of a FAIL file")
    retry_batch: int = Field(default=500, gt=0, description="FILES_RETRY_BATCH: files per retry run")
    heartbeat_seconds: float = Field(default=30.0, gt=0, description="FILES_HEARTBEAT_SECONDS")
    stale_minutes: float = Field(default=60.0, gt=0, description="FILES_STALE_MINUTES: heartbeat age to release")
    max_range_runs: int = Field(default=4, gt=0, description="FILES_MAX_RANGE_RUNS: ranges the sensor launches at once")
    check_mode: Literal["list", "head"] = Field(default="list", description="FILES_CHECK_MODE, see checks.py")
    window: WindowSettings = WindowSettings()

    @property
    def key_prefix(self) -> str:
        return self.prefix.strip("/") + "/" if self.prefix.strip("/") else ""

    @classmethod
    def from_env(cls) -> "FilesSettings":
        mib = lambda name, default: int(float(_env(name, str(default))) * MIB)  # noqa: E731
        return cls(
            source_root=Path(_env("FILES_SOURCE_ROOT", str(data_dir() / "files-source"))).resolve(),
            bucket=_env("FILES_S3_BUCKET", "migrated-files"),
            prefix=_env("FILES_S3_PREFIX", ""),
            range_size=int(_env("FILES_RANGE_SIZE", "10000")),
            concurrency=int(_env("FILES_CONCURRENCY", "8")),
            multipart_threshold=mib("FILES_MULTIPART_THRESHOLD_MB", 100),  # AWS: consider multipart from 100 MB
            part_size=mib("FILES_PART_SIZE_MB", 8),
            max_retries=int(_env("FILES_MAX_RETRIES", "3")),
            retry_batch=int(_env("FILES_RETRY_BATCH", "500")),
            heartbeat_seconds=float(_env("FILES_HEARTBEAT_SECONDS", "30")),
            stale_minutes=float(_env("FILES_STALE_MINUTES", "60")),
            max_range_runs=int(_env("FILES_MAX_RANGE_RUNS", "4")),
            check_mode=_env("FILES_CHECK_MODE", "list"),
            window=WindowSettings(
                enabled=_env_bool("FILES_RUN_WINDOW_ENABLED", True),
                tz=_env("FILES_RUN_WINDOW_TZ", "America/New_York"),
                start=parse_clock(_env("FILES_RUN_WINDOW_START", "22:00"), "FILES_RUN_WINDOW_START"),
                end=parse_clock(_env("FILES_RUN_WINDOW_END", "06:00"), "FILES_RUN_WINDOW_END"),
                weekends=_env_bool("FILES_RUN_WINDOW_WEEKENDS", True),
            ),
        )
