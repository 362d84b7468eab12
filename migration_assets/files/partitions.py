"""Dynamic range partitions of the file pipeline: one per migration_ranges row."""

import dagster as dg

from migration_assets.files.ranges import range_key

file_ranges = dg.DynamicPartitionsDefinition(name="files_ranges")


def register_ranges(instance: dg.DagsterInstance, ranges: list[tuple[int, int]]) -> list[str]:
    """Add the partitions of these [min_id, max_id) ranges (idempotent); return their keys in order."""
    keys = [range_key(lo, hi) for lo, hi in ranges]
    known = set(instance.get_dynamic_partitions(file_ranges.name))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(file_ranges.name, new)
    return keys
