"""Check outcomes, free of Dagster: the pure core computes them, the asset reports them."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["ERROR", "WARN"]


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    summary: str
    severity: Severity = "ERROR"
    metadata: dict[str, Any] = field(default_factory=dict)


def listing(values: Sequence[Any], limit: int = 20) -> str:
    """A short, readable list for a failure message: the first `limit` values, then how many more."""
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")
