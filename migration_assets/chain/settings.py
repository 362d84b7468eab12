"""The chain pipeline's settings (CHAIN_*): the DynamoDB source and how it is cut into partitions."""

import re

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import CommaList, EnvSettings

_NETWORK = re.compile(r"[a-z0-9]+-[a-z0-9_-]+")
CHAIN_MIGRATIONS = "chain_"  # the migrations of the chain tables: what a network's schema holds


class ChainSettings(EnvSettings):
    """CHAIN_*: the DynamoDB source and how it is cut into partitions."""

    model_config = SettingsConfigDict(env_prefix="CHAIN_", env_ignore_empty=True, extra="ignore")

    block_table: str = Field(default="chain_blocks", description="DynamoDB block table")
    block_tag: int = Field(default=1, ge=0, description="block tag to migrate")
    block_range_size: int = Field(default=10_000, gt=0, description="heights per block partition")
    load_chunk_heights: int = Field(default=1000, gt=0, description="heights per load transaction")
    event_table: str = Field(default="chain_events", description="DynamoDB event table of the event tag")
    event_tag: int = Field(default=0, ge=0, description="event tag to migrate (0: legacy layout)")
    event_height_index: str | None = Field(
        default=None,
        description="the event table's GSI to find a height's events by (chainstorage's event_table_height_index "
        "or versioned_event_table_block_index); unset: found by its hash key, `height` or `block_id`",
    )
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
    networks: CommaList = Field(
        default=[],
        description="chains migrated side by side, as `{blockchain}-{network}` (e.g. ethereum-mainnet,base-mainnet): "
        "each gets its own assets (keys prefixed `{blockchain}_{network}`), partitions, checks, sync sensor, "
        "DynamoDB tables named as chainstorage names them, and PostgreSQL schema `chain_{blockchain}_{network}`; "
        "unset: one chain, its tables from CHAIN_BLOCK_TABLE and CHAIN_EVENT_TABLE",
    )
    table_prefix: str = Field(
        default="example_chainstorage",
        description="prefix of the DynamoDB tables of CHAIN_NETWORKS: `{prefix}_blocks_{blockchain}_{network}`, "
        "`{prefix}_block_events_...` (event tag 0), `{prefix}_versioned_block_events_...` (tag >= 1)",
    )

    @field_validator("networks")
    @classmethod
    def _network_names(cls, names: list[str]) -> list[str]:
        wrong = [name for name in names if not _NETWORK.fullmatch(name)]
        if wrong:
            raise ValueError(f"{wrong} are not `{{blockchain}}-{{network}}` in lower case, e.g. ethereum-mainnet")
        if len(set(names)) != len(names):
            raise ValueError(f"{names} names a network twice")
        return names

    @classmethod
    def from_env(cls) -> "ChainSettings":
        return cls.load()


class NetworkConfig(BaseModel, frozen=True):
    """One chain of a deployment. Without blockchain and network it is the chain configured the old
    way: asset keys, partitions and sensor without a prefix, tables from the CHAIN_* settings, rows in
    the default schema."""

    blockchain: str | None = None
    network: str | None = None
    block_table: str | None = Field(default=None, description="set explicitly, else chainstorage's name")
    event_table: str | None = Field(default=None, description="set explicitly, else chainstorage's name")

    @field_validator("blockchain", "network")
    @classmethod
    def _lower_case_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9_]+", value):
            raise ValueError(f"{value!r}: blockchain and network names are lower case letters, digits and _")
        return value

    @classmethod
    def parse(cls, name: str, **tables: str) -> "NetworkConfig":
        """From `{blockchain}-{network}`, as CHAIN_NETWORKS lists it."""
        blockchain, _, network = name.partition("-")
        return cls(blockchain=blockchain, network=network.replace("-", "_"), **tables)

    @property
    def name(self) -> str | None:
        return f"{self.blockchain}_{self.network}" if self.blockchain else None

    @property
    def key_prefix(self) -> list[str]:
        return [self.name] if self.name else []

    def prefixed(self, name: str) -> str:
        """A Dagster name (partitions, sensor) of this network's."""
        return f"{self.name}_{name}" if self.name else name

    @property
    def schema(self) -> str | None:
        """The PostgreSQL schema of this network's rows; None: the default one."""
        return f"chain_{self.name}" if self.name else None

    def tables(self, settings: ChainSettings) -> tuple[str, str]:
        """(block table, event table of settings.event_tag), named as chainstorage names them."""
        if self.name is None:
            return self.block_table or settings.block_table, self.event_table or settings.event_table
        events = "block_events" if settings.event_tag == 0 else "versioned_block_events"
        return (
            self.block_table or f"{settings.table_prefix}_blocks_{self.name}",
            self.event_table or f"{settings.table_prefix}_{events}_{self.name}",
        )


def configured_networks(settings: ChainSettings) -> list[NetworkConfig]:
    """The networks of CHAIN_NETWORKS, or the one configured the old way."""
    return [NetworkConfig.parse(name) for name in settings.networks] or [NetworkConfig()]
