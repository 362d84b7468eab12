"""Dynamic range partitions of the chain pipeline."""

import dagster as dg

from migration_assets.chain.ranges import covering_ranges, range_key

block_ranges = dg.DynamicPartitionsDefinition(name="chain_block_ranges")
event_ranges = dg.DynamicPartitionsDefinition(name="chain_event_ranges")


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
