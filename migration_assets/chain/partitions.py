"""Dynamic range partitions of the chain pipeline."""

import dagster as dg

from migration_assets.chain.ranges import covering_ranges, range_key
from migration_assets.chain.settings import NetworkConfig


def range_partitions(network: NetworkConfig) -> tuple[dg.DynamicPartitionsDefinition, dg.DynamicPartitionsDefinition]:
    """(block ranges, event ranges) of one network; each network's partitions live under its own names."""
    return (
        dg.DynamicPartitionsDefinition(name=network.prefixed("chain_block_ranges")),
        dg.DynamicPartitionsDefinition(name=network.prefixed("chain_event_ranges")),
    )


block_ranges, event_ranges = range_partitions(NetworkConfig())


def register_ranges(
    instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, start: int, end: int, size: int
) -> list[str]:
    """Add the partitions covering [start, end) (idempotent); return their keys in order."""
    keys = [range_key(s, e) for s, e in covering_ranges(start, end, size)]
    known = set(instance.get_dynamic_partitions(partitions.name))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(partitions.name, new)
    return keys
