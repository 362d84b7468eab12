"""REPO_*: repo backfill settings from the environment (the stable interface; see README)."""

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import CommaList, EnvBool, EnvSettings


class RepoSettings(EnvSettings):
    """How repos are discovered, fetched and synced. A bad value fails at start-up naming the variable."""

    model_config = SettingsConfigDict(env_prefix="REPO_", env_ignore_empty=True, extra="ignore")

    buckets: int = Field(default=256, ge=1, description="hash buckets of the DIDs = partitions of atproto/repos")
    discovery_hosts: CommaList = Field(
        default_factory=list, description="comma-separated PDS or relay URLs to list repos from (listRepos)")
    verify_signatures: EnvBool = Field(default=True, description="check each commit's signature against the DID key")
    concurrency: int = Field(default=8, ge=1, description="repo downloads at once per run")
    max_car_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="a larger repo export fails that repo")
    fetch_timeout_seconds: float = Field(default=120.0, gt=0, description="deadline for one whole repo download")
    lease_seconds: int = Field(
        default=300, ge=5, description="a run renews its claims every third of this; claims not renewed for this "
        "long are taken over by another run")
    claim_batch: int = Field(default=500, ge=1, description="repos a run claims at a time (more as it finishes them)")
    sync_interval_seconds: int = Field(default=60, ge=1, description="repo_sync sensor interval")
    sensor_tick_seconds: float = Field(
        default=30.0, gt=0, description="time a repo_sync tick spends paging listRepos; the next tick goes on from there")

    @field_validator("discovery_hosts")
    @classmethod
    def _without_trailing_slash(cls, hosts: list[str]) -> list[str]:
        return [host.rstrip("/") for host in hosts]

    @property
    def sync_threads(self) -> int:
        """Threads of a run: `concurrency` downloading, as many again resolving or storing."""
        return 2 * self.concurrency

    @property
    def connections(self) -> int:
        """Database connections a run may use at once: every sync thread storing, the rate limiter's,
        and the claim loop's and lease heartbeat's."""
        return self.sync_threads + 4

    @classmethod
    def from_env(cls) -> "RepoSettings":
        return cls.load()
