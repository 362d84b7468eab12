"""Which collections to store (REPO_COLLECTIONS) and which repos to track (REPO_SIGNAL_COLLECTION).

One matcher for the backfill and the event stream alike. A pattern is a full NSID, or NSID segments
followed by `.*` (every collection under them, e.g. `app.bsky.feed.*`), or `*` alone (everything).
"""

import re
from dataclasses import dataclass

from migration_assets.atproto.syntax import is_valid_nsid

_SEGMENT = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


class CollectionPatternError(ValueError):
    pass


def _check_pattern(pattern: str) -> None:
    if pattern == "*":
        return
    if pattern.endswith(".*"):
        segments = pattern[:-2].split(".")
        if segments and all(_SEGMENT.fullmatch(s) for s in segments):
            return
    elif is_valid_nsid(pattern):
        return
    raise CollectionPatternError(
        f"{pattern!r} is not an NSID or an NSID prefix ending in '.*' (e.g. app.bsky.feed.post, app.bsky.feed.*)")


@dataclass(frozen=True)
class CollectionFilter:
    """A set of NSID patterns; no patterns means every collection."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | list[str] | None) -> "CollectionFilter":
        """From REPO_COLLECTIONS's comma-separated text (or its items). Raises CollectionPatternError."""
        items = text.split(",") if isinstance(text, str) else (text or [])
        patterns = sorted({item.strip() for item in items if item.strip()})
        for pattern in patterns:
            _check_pattern(pattern)
        return cls(() if "*" in patterns else tuple(patterns))

    @property
    def everything(self) -> bool:
        return not self.patterns

    @property
    def key(self) -> str:
        """Stable text of the filter (sorted, deduplicated), recorded with what was stored under it."""
        return ",".join(self.patterns) or "*"

    def matches(self, nsid: str) -> bool:
        return self.everything or any(
            nsid.startswith(p[:-1]) if p.endswith(".*") else nsid == p for p in self.patterns)


@dataclass(frozen=True)
class RecordScope:
    """What a repo's stored records were made under: the collection filter and the signal collection.
    A repo stored under another scope than the current one is synced again (see `repos_out_of_scope`)."""

    collections: CollectionFilter = CollectionFilter()
    signal: str | None = None

    @property
    def key(self) -> str:
        return self.collections.key + (f";signal={self.signal}" if self.signal else "")
