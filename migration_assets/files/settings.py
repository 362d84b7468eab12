"""The file pipeline's settings (FILES_*), read from the environment once and validated there: a bad
value fails naming its variable and what it accepts."""

from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import EnvBool, EnvSettings, data_dir
from migration_assets.files.bandwidth import Bandwidth
from migration_assets.files.report import DEFAULT_REPORT_PREFIX

MIB = 1024 * 1024


def parse_clock(value: Any) -> Any:
    """"HH:MM" (24-hour) as a time of day."""
    if isinstance(value, time):
        return value
    try:
        hours, minutes = str(value).strip().split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"must be HH:MM, got {value!r}") from None


def known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name, e.g. America/New_York)") from None
    return value


ClockTime = Annotated[time, BeforeValidator(parse_clock)]
TimeZoneName = Annotated[str, AfterValidator(known_zone)]


class WindowSettings(BaseModel):
    """When copying may happen: nightly from `start` to `end` (crossing midnight when start > end),
    plus all of Saturday and Sunday, in `tz`. Disabled: always open."""

    enabled: bool = True
    tz: TimeZoneName = "America/New_York"
    start: ClockTime = time(22, 0)
    end: ClockTime = time(6, 0)
    weekends: bool = True


class FilesSettings(EnvSettings):
    """FILES_*: where files come from and go, how they are copied, and when."""

    model_config = SettingsConfigDict(env_prefix="FILES_", env_ignore_empty=True, extra="ignore", populate_by_name=True)

    source_root: Annotated[Path, AfterValidator(Path.resolve)] = Field(
        default_factory=lambda: data_dir() / "files-source",
        description="folder source_files.file_uri is relative to (default: files-source in MIGRATION_DATA_DIR)")
    bucket: str = Field(default="migrated-files", validation_alias="FILES_S3_BUCKET", description="destination S3 bucket")
    prefix: str = Field(default="", validation_alias="FILES_S3_PREFIX", description="key prefix in the bucket, e.g. 'archive/'")
    range_size: int = Field(default=10_000, gt=0, description="file ids per range")
    concurrency: int = Field(default=8, gt=0, le=64, description="uploads in flight per run")
    multipart_threshold_mb: float = Field(
        default=100, ge=5, description="MB: a file up to this size goes in one PUT (AWS: multipart from 100 MB)")
    part_size_mb: float = Field(default=8, ge=5, description="MB per multipart part (S3's minimum: 5)")
    max_retries: int = Field(default=3, ge=0, description="retries of a FAIL file")
    retry_batch: int = Field(default=500, gt=0, description="files per retry run")
    heartbeat_seconds: float = Field(default=30.0, gt=0, description="how often a run renews its range's heartbeat")
    stale_minutes: float = Field(default=60.0, gt=0, description="heartbeat age after which a range is released")
    max_range_runs: int = Field(default=4, gt=0, description="ranges the sensor launches at once")
    check_mode: Literal["list", "head"] = Field(
        default="list", description="how checks read the bucket: one listing, or one HEAD per file (checks.py)")
    run_window_enabled: EnvBool = Field(default=True, description="copy only inside the run window")
    run_window_tz: TimeZoneName = Field(default="America/New_York", description="time zone of the run window")
    run_window_start: ClockTime = Field(default=time(22, 0), description="HH:MM the nightly window opens")
    run_window_end: ClockTime = Field(default=time(6, 0), description="HH:MM the nightly window closes")
    run_window_weekends: EnvBool = Field(default=True, description="the window is open all of Saturday and Sunday")
    bandwidth: Bandwidth = Field(
        default=None, description="upload limit for the whole machine in rclone's --bwlimit syntax: a rate (10M, "
        "bytes/s, binary units, off) or a timetable like '08:00,512k 18:00,off' read in FILES_RUN_WINDOW_TZ (unset: none)")
    report_prefix: str = Field(
        default=DEFAULT_REPORT_PREFIX, description="folder under FILES_S3_PREFIX where each run's failure report "
        "CSV goes ({run_id}.csv)")

    @property
    def multipart_threshold(self) -> int:
        return int(self.multipart_threshold_mb * MIB)

    @property
    def part_size(self) -> int:
        return int(self.part_size_mb * MIB)

    @property
    def key_prefix(self) -> str:
        return self.prefix.strip("/") + "/" if self.prefix.strip("/") else ""

    @property
    def window(self) -> WindowSettings:
        return WindowSettings(
            enabled=self.run_window_enabled, tz=self.run_window_tz, start=self.run_window_start,
            end=self.run_window_end, weekends=self.run_window_weekends,
        )

    @classmethod
    def from_env(cls, **overrides: Any) -> "FilesSettings":
        """The environment's settings (with `overrides` by field name, validated alike)."""
        return cls.load(**overrides)
