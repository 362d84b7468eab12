"""The AT Protocol side of repo backfill as a Dagster resource: identity, XRPC clients, rate limits."""

import threading

import dagster as dg
from psycopg_pool import ConnectionPool
from pydantic import Field

from migration_assets.atproto.identity import IdentityResolver, StoredDocuments
from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.atproto.xrpc import XrpcClient
from migration_assets.repos.backfill import RepoSyncer
from migration_assets.repos.settings import RepoSettings


class HostClients:
    """One XRPC client per PDS host, all behind the same shared rate limiter."""

    def __init__(self, limiter: HostRateLimiter | None, timeout: float, allow_private_hosts: bool | None) -> None:
        self._clients: dict[str, XrpcClient] = {}
        self._lock = threading.Lock()
        self.limiter, self._timeout, self._allow_private = limiter, timeout, allow_private_hosts

    def __call__(self, base_url: str) -> XrpcClient:
        key = base_url.rstrip("/")
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = XrpcClient(key, limiter=self.limiter, timeout=self._timeout,
                                    allow_private_hosts=self._allow_private)
                self._clients[key] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


# The environment as this process started with it: the resource's defaults, so the UI shows the
# configuration a run will use (a bad REPO_* value fails here, when the definitions load).
_ENV = RepoSettings.load()


class RepoSourceResource(dg.ConfigurableResource):
    """Where repos come from and how they are fetched. Defaults come from the environment (REPO_*;
    plc_url and allow_private_hosts from ATPROTO_PLC_URL and ATPROTO_ALLOW_PRIVATE_HOSTS when unset)."""

    plc_url: str | None = Field(default=None, description="PLC directory (default ATPROTO_PLC_URL)")
    allow_private_hosts: bool | None = Field(default=None, description="default ATPROTO_ALLOW_PRIVATE_HOSTS")
    verify_signatures: bool = Field(default=_ENV.verify_signatures, description="REPO_VERIFY_SIGNATURES")
    concurrency: int = Field(default=_ENV.concurrency, ge=1, description="repo downloads at once (REPO_CONCURRENCY)")
    host_concurrency: int = Field(default=_ENV.host_concurrency, ge=1,
                                  description="repo downloads at once from one host (REPO_HOST_CONCURRENCY)")
    max_car_bytes: int = Field(default=_ENV.max_car_bytes, gt=0, description="REPO_MAX_CAR_BYTES")
    fetch_timeout_seconds: float = Field(default=_ENV.fetch_timeout_seconds, gt=0,
                                         description="REPO_FETCH_TIMEOUT_SECONDS")
    fetch_min_bytes_per_second: float = Field(default=_ENV.fetch_min_bytes_per_second, gt=0,
                                              description="REPO_FETCH_MIN_BYTES_PER_SECOND")
    whole_car_memory_bytes: int = Field(default=_ENV.whole_car_memory_bytes, ge=0,
                                        description="REPO_WHOLE_CAR_MEMORY_BYTES")

    @property
    def settings(self) -> RepoSettings:
        """The environment's REPO_* settings with this resource's fields in their place."""
        return RepoSettings.load(verify_signatures=self.verify_signatures, concurrency=self.concurrency,
                                 host_concurrency=self.host_concurrency,
                                 max_car_bytes=self.max_car_bytes, fetch_timeout_seconds=self.fetch_timeout_seconds,
                                 fetch_min_bytes_per_second=self.fetch_min_bytes_per_second,
                                 whole_car_memory_bytes=self.whole_car_memory_bytes)

    def resolver(self, limiter: HostRateLimiter | None = None, pool: ConnectionPool | None = None) -> IdentityResolver:
        """With `pool`: documents are shared with every other process through the target database."""
        return IdentityResolver(self.plc_url, allow_private_hosts=self.allow_private_hosts, limiter=limiter,
                                store=StoredDocuments(pool) if pool is not None else None)

    def clients(self, database_url: str) -> HostClients:
        limiter = HostRateLimiter(database_url)
        return HostClients(limiter, timeout=30.0, allow_private_hosts=self.allow_private_hosts)

    def syncer(self, pool: ConnectionPool, clients: HostClients) -> RepoSyncer:
        return RepoSyncer(pool, self.resolver(clients.limiter, pool), clients, self.settings)
