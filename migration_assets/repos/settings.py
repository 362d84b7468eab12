"""Repo backfill settings from the environment (the stable interface; see README)."""

import os

from pydantic import BaseModel, Field

from migration_assets.core.settings import _env_int


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in {"1", "true", "yes", "on"}


class RepoSettings(BaseModel):
    buckets: int = Field(default=256, ge=1, description="hash buckets = partitions (REPO_BUCKETS)")
    discovery_hosts: list[str] = Field(default_factory=list, description="REPO_DISCOVERY_HOSTS")
    verify_signatures: bool = True
    concurrency: int = Field(default=8, ge=1, description="repos fetched at once per run")
    max_car_bytes: int = Field(default=512 * 1024 * 1024, description="a larger repo export fails")
    fetch_timeout_seconds: float = 120.0
    stale_claim_minutes: int = Field(default=30, description="an in-progress claim older than this is taken over")

    @property
    def sync_threads(self) -> int:
        """Threads of a run: `concurrency` downloading, as many again resolving or storing."""
        return 2 * self.concurrency

    @property
    def connections(self) -> int:
        """Database connections a run may use at once: every sync thread storing, plus the rate limiter's."""
        return self.sync_threads + 2

    @classmethod
    def from_env(cls) -> "RepoSettings":
        hosts = [h.strip().rstrip("/") for h in os.environ.get("REPO_DISCOVERY_HOSTS", "").split(",") if h.strip()]
        return cls(
            buckets=_env_int("REPO_BUCKETS", 256),
            discovery_hosts=hosts,
            verify_signatures=_env_flag("REPO_VERIFY_SIGNATURES", True),
            concurrency=_env_int("REPO_CONCURRENCY", 8),
            max_car_bytes=_env_int("REPO_MAX_CAR_BYTES", 512 * 1024 * 1024),
            fetch_timeout_seconds=float(_env_int("REPO_FETCH_TIMEOUT_SECONDS", 120)),
            stale_claim_minutes=_env_int("REPO_STALE_CLAIM_MINUTES", 30),
        )
