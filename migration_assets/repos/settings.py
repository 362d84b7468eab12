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
    lease_seconds: int = Field(default=300, ge=5, description="REPO_LEASE_SECONDS: a run renews its claims every third "
                               "of this; claims not renewed for this long are taken over by another run")
    claim_batch: int = Field(default=500, ge=1, description="REPO_CLAIM_BATCH: repos a run claims at a time")

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
        hosts = [h.strip().rstrip("/") for h in os.environ.get("REPO_DISCOVERY_HOSTS", "").split(",") if h.strip()]
        return cls(
            buckets=_env_int("REPO_BUCKETS", 256),
            discovery_hosts=hosts,
            verify_signatures=_env_flag("REPO_VERIFY_SIGNATURES", True),
            concurrency=_env_int("REPO_CONCURRENCY", 8),
            max_car_bytes=_env_int("REPO_MAX_CAR_BYTES", 512 * 1024 * 1024),
            fetch_timeout_seconds=float(_env_int("REPO_FETCH_TIMEOUT_SECONDS", 120)),
            lease_seconds=_env_int("REPO_LEASE_SECONDS", 300),
            claim_batch=_env_int("REPO_CLAIM_BATCH", 500),
        )
