"""The AT Protocol side of repo backfill as a Dagster resource: identity, XRPC clients, rate limits."""

import threading

import dagster as dg
from pydantic import Field

from migration_assets.atproto.identity import IdentityResolver
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


class RepoSourceResource(dg.ConfigurableResource):
    """Where repos come from. Unset fields fall back to the environment (ATPROTO_PLC_URL,
    ATPROTO_ALLOW_PRIVATE_HOSTS, REPO_* variables; see README)."""

    plc_url: str | None = Field(default=None, description="PLC directory (default ATPROTO_PLC_URL)")
    allow_private_hosts: bool | None = Field(default=None, description="default ATPROTO_ALLOW_PRIVATE_HOSTS")
    verify_signatures: bool | None = Field(default=None, description="default REPO_VERIFY_SIGNATURES (on)")
    concurrency: int | None = Field(default=None, description="repos fetched at once (REPO_CONCURRENCY)")

    @property
    def settings(self) -> RepoSettings:
        settings = RepoSettings.from_env()
        overrides = {"verify_signatures": self.verify_signatures, "concurrency": self.concurrency}
        return settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})

    def resolver(self, limiter: HostRateLimiter | None = None) -> IdentityResolver:
        return IdentityResolver(self.plc_url, allow_private_hosts=self.allow_private_hosts, limiter=limiter)

    def clients(self, database_url: str) -> HostClients:
        limiter = HostRateLimiter(database_url)
        return HostClients(limiter, timeout=30.0, allow_private_hosts=self.allow_private_hosts)

    def syncer(self, pool, clients: HostClients) -> RepoSyncer:
        return RepoSyncer(pool, self.resolver(clients.limiter), clients, self.settings)
