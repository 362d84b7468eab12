"""The chain pipeline's settings (CHAIN_*): the DynamoDB source and how it is cut into partitions."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import EnvSettings


class ChainSettings(EnvSettings):
    """CHAIN_*: the DynamoDB source and how it is cut into partitions."""

    model_config = SettingsConfigDict(env_prefix="CHAIN_", env_ignore_empty=True, extra="ignore")

    block_table: str = Field(default="chain_blocks", description="DynamoDB block table")
    block_tag: int = Field(default=1, ge=0, description="block tag to migrate")
    block_range_size: int = Field(default=10_000, gt=0, description="heights per block partition")
    load_chunk_heights: int = Field(default=1000, gt=0, description="heights per load transaction")
    event_table: str = Field(default="chain_events", description="DynamoDB event table of the event tag")
    event_tag: int = Field(default=0, ge=0, description="event tag to migrate (0: legacy layout)")
    event_range_size: int = Field(default=100_000, gt=0, description="event ids per event partition")
    load_chunk_events: int = Field(default=20_000, gt=0, description="events per load transaction")
    read_concurrency: int = Field(default=16, gt=0, description="DynamoDB requests in flight per run")
    read_processes: int = Field(
        default=2, gt=0,
        description="worker processes reading blocks and events (botocore spends ~1 ms of CPU per request, "
        "so at low latency one process's threads are CPU-bound); 1 reads in threads only",
    )
    scan_segments: int = Field(default=16, gt=0, description="TotalSegments of the bulk parallel Scan")
    scan_processes: int = Field(default=2, gt=0, description="worker processes running the Scan's segments")
    scan_max_read_units: float | None = Field(
        default=None, gt=0, description="read units per second of all Scan segments together; unset: no limit")
    sync_interval_seconds: int = Field(default=60, gt=0, description="chain_sync sensor interval")

    @classmethod
    def from_env(cls) -> "ChainSettings":
        return cls.load()
