"""REPO_*: repo backfill settings from the environment (the stable interface; see README)."""

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from migration_assets.atproto.syntax import is_valid_nsid
from migration_assets.core.settings import CommaList, EnvBool, EnvSettings
from migration_assets.repos.collections import CollectionFilter, RecordScope
from migration_assets.repos.snapshot import WHOLE_CAR_BYTES


class RepoSettings(EnvSettings):
    """How repos are discovered, fetched and synced. A bad value fails at start-up naming the variable."""

    model_config = SettingsConfigDict(env_prefix="REPO_", env_ignore_empty=True, extra="ignore")

    buckets: int = Field(default=256, ge=1, description="hash buckets of the DIDs = partitions of atproto/repos")
    discovery_hosts: CommaList = Field(
        default_factory=list, description="comma-separated PDS or relay URLs to list repos from (listRepos)")
    verify_signatures: EnvBool = Field(default=True, description="check each commit's signature against the DID key")
    concurrency: int = Field(default=8, ge=1, description="repo downloads at once per run")
    host_concurrency: int = Field(
        default=4, ge=1, description="repo downloads at once per run from any one host (at most REPO_CONCURRENCY): "
        "a slow host keeps this many, the other hosts the rest; raise it to REPO_CONCURRENCY when one host "
        "(a single PDS) serves every repo")
    max_car_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="a larger repo export fails that repo")
    fetch_timeout_seconds: float = Field(
        default=120.0, gt=0, description="deadline for one whole repo download, plus 1 s per "
        "REPO_FETCH_MIN_BYTES_PER_SECOND bytes it has moved (up to REPO_MAX_CAR_BYTES of them)")
    fetch_min_bytes_per_second: float = Field(
        default=64 * 1024, gt=0, description="a repo download slower than this (a host dripping bytes) is cut at "
        "its deadline; faster, a big repo gets the time its size needs")
    whole_car_memory_bytes: int = Field(
        default=WHOLE_CAR_BYTES, ge=0, description="repo exports a run holds whole at once, in bytes, for the "
        "compiled parse (one export at most half of it; peak memory about 5x this); an export that does not fit "
        "streams through the Python parse, memory flat, at about 4x the CPU")
    lease_seconds: int = Field(
        default=300, ge=5, description="a run renews its claims, and a follow run its host, every third of this; "
        "claims not renewed for this long are taken over by another run, and a follow run that stopped renewing "
        "is marked failed by the repo_follow sensor and replaced")
    claim_batch: int = Field(default=500, ge=1, description="repos a run claims at a time (more as it finishes them)")
    sync_interval_seconds: int = Field(default=60, ge=1, description="repo_sync sensor interval")
    sensor_tick_seconds: float = Field(
        default=30.0, gt=0, description="time a repo_sync tick spends paging listRepos; the next tick goes on from there")
    runs_per_bucket: int = Field(
        default=2, ge=1, description="most runs the repo_sync sensor starts at once on one bucket; a bucket with more "
        "due repos than REPO_CLAIM_BATCH x 4 per run gets another run (their leases share the bucket's repos)")
    follow_hosts: CommaList = Field(
        default_factory=list, description="comma-separated PDS or relay URLs whose event stream (subscribeRepos) "
        "the repo_follow sensor keeps followed; unset: REPO_DISCOVERY_HOSTS")
    follow_run_seconds: float = Field(
        default=3600.0, gt=0, description="how long one atproto/repo_stream run follows its host before it ends "
        "(the repo_follow sensor starts the next)")
    follow_check_processes: int = Field(
        default=1, ge=0, description="worker processes that check a followed stream's commits (signatures, MST, "
        "records) while the previous batch is written; 0: check in the follower's own process")
    collections: CommaList = Field(
        default_factory=list, description="comma-separated NSIDs of the collections to store, `*` wildcards "
        "(`app.bsky.feed.*`); unset: all. Widening it backfills the newly included collections")
    signal_collection: str | None = Field(
        default=None, description="track only repos with at least one record in this collection (NSID); "
        "the others are kept in the ledger with no records")

    @field_validator("collections")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        return list(CollectionFilter.parse(patterns).patterns)

    @field_validator("signal_collection")
    @classmethod
    def _valid_signal(cls, nsid: str | None) -> str | None:
        if nsid is not None and not is_valid_nsid(nsid.strip()):
            raise ValueError("must be one collection NSID, e.g. app.bsky.actor.profile (no wildcards)")
        return nsid.strip() if nsid else None

    @property
    def scope(self) -> RecordScope:
        """The collection filter and signal collection that stored records are made under."""
        return RecordScope(CollectionFilter(tuple(self.collections)), self.signal_collection)

    @property
    def followed_hosts(self) -> list[str]:
        """REPO_FOLLOW_HOSTS, or REPO_DISCOVERY_HOSTS when it is unset."""
        return self.follow_hosts or self.discovery_hosts

    @field_validator("discovery_hosts", "follow_hosts")
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
