"""Range partition keys of the file pipeline: the chain pipeline's "{start:012d}-{end:012d}" format,
meaning file ids [start, end), so both pipelines' partitions read and sort the same way."""

from migration_assets.chain.ranges import parse_range_key, range_key

__all__ = ["aligned_ranges", "parse_range_key", "range_key"]


def aligned_ranges(first_id: int, last_id: int, size: int) -> list[tuple[int, int]]:
    """The size-aligned [start, end) ranges covering ids first_id..last_id (inclusive)."""
    if size <= 0:
        raise ValueError(f"FILES_RANGE_SIZE must be positive, got {size}")
    if first_id > last_id:
        return []
    start = first_id - first_id % size
    return [(s, s + size) for s in range(start, last_id + 1, size)]
