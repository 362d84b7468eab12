"""The project's one backoff: exponential with full jitter and a cap (AWS's "full jitter").

Every retry loop and every "try again later" time uses this: HTTP retries, blob transfers, repo and
file retries, DynamoDB throttling. Whole Dagster steps are retried with Dagster's own `RetryPolicy`
(see `core.dagster_glue.step_retry_policy`), which has the same shape.
"""

import random
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone


@dataclass(frozen=True)
class Backoff:
    """Waits after failures: the n-th failure in a row (n >= 1) waits a random time in
    [floor * ceiling, ceiling], ceiling = min(cap, base * 2^(n-1)). `floor` 0 is full jitter; a
    floor keeps a minimum wait where one matters (a retry an hour from now must not come in 1 s)."""

    base: float
    cap: float
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or not 0 <= self.floor <= 1:
            raise ValueError(f"bad backoff {self}: need 0 < base <= cap and 0 <= floor <= 1")

    def ceiling(self, failures: int) -> float:
        exponent = min(max(0, failures - 1), 62)  # 2**62 is past any cap; avoids huge floats
        return min(self.cap, self.base * 2**exponent)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(failures)
        return (rng or random).uniform(self.floor * ceiling, ceiling)

    def retry_at(self, failures: int, now: datetime | None = None) -> datetime:
        """When the next try is due after `failures` failures in a row."""
        return (now or datetime.now(timezone.utc)) + timedelta(seconds=self.delay(failures))

    def sleep(self, failures: int, stop: threading.Event | None = None) -> bool:
        """Wait out the delay; False when `stop` was set meanwhile (the caller should give up)."""
        seconds = self.delay(failures)
        if stop is None:
            threading.Event().wait(seconds)
            return True
        return not stop.wait(seconds)
