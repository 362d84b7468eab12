"""Range partition keys: "{start:012d}-{end:012d}" meaning [start, end). Zero padding makes them sort."""

import re

_KEY = re.compile(r"^(\d{12})-(\d{12})$")


def range_key(start: int, end: int) -> str:
    if not 0 <= start < end:
        raise ValueError(f"invalid range [{start}, {end})")
    return f"{start:012d}-{end:012d}"


def parse_range_key(key: str) -> tuple[int, int]:
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"partition key {key!r} is not of the form '000000000000-000000010000'")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise ValueError(f"partition key {key!r} has start >= end")
    return start, end


def covering_ranges(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """The size-aligned ranges covering [start, end): the first starts at or below `start`, the last
    ends at or above `end`."""
    if size <= 0:
        raise ValueError(f"range size must be positive, got {size}")
    if not 0 <= start < end:
        raise ValueError(f"invalid range [{start}, {end})")
    first = start - start % size
    return [(s, s + size) for s in range(first, end, size)]


def complete_ranges(next_start: int, tip: int, size: int) -> list[tuple[int, int]]:
    """Aligned ranges from `next_start` whose every height is at or below `tip`."""
    return [(s, s + size) for s in range(next_start, tip + 1 - size + 1, size)]
