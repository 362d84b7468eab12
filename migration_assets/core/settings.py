"""Settings read from the environment: the project's stable configuration interface (see README)."""

import os
from pathlib import Path

from pydantic import BaseModel, Field


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


# The checkout (the project is installed editable): workspace.yaml, dagster.yaml, node_modules.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """Project-local folder for embedded state (PostgreSQL data, Dagster home of the demo)."""
    return Path(os.environ.get("MIGRATION_DATA_DIR", ".migration-data")).resolve()


class ChainSettings(BaseModel):
    block_table: str = Field(description="DynamoDB block table (CHAIN_BLOCK_TABLE)")
    block_tag: int = 1
    block_range_size: int = 10_000
    load_chunk_heights: int = Field(default=1000, description="heights per load transaction")
    event_table: str = Field(description="DynamoDB event table of event_tag (CHAIN_EVENT_TABLE)")
    event_tag: int = 0
    event_range_size: int = 100_000
    load_chunk_events: int = Field(default=20_000, description="events per load transaction")
    sync_interval_seconds: int = 60

    @classmethod
    def from_env(cls) -> "ChainSettings":
        return cls(
            block_table=os.environ.get("CHAIN_BLOCK_TABLE", "chain_blocks"),
            block_tag=_env_int("CHAIN_BLOCK_TAG", 1),
            block_range_size=_env_int("CHAIN_BLOCK_RANGE_SIZE", 10_000),
            load_chunk_heights=_env_int("CHAIN_LOAD_CHUNK_HEIGHTS", 1000),
            event_table=os.environ.get("CHAIN_EVENT_TABLE", "chain_events"),
            event_tag=_env_int("CHAIN_EVENT_TAG", 0),
            event_range_size=_env_int("CHAIN_EVENT_RANGE_SIZE", 100_000),
            load_chunk_events=_env_int("CHAIN_LOAD_CHUNK_EVENTS", 20_000),
            sync_interval_seconds=_env_int("CHAIN_SYNC_INTERVAL_SECONDS", 60),
        )
