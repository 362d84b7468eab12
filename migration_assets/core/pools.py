"""The project's named pool limits (core/pools.yaml, shipped with the package), applied to an instance.

Dagster keeps named pool limits in the instance database, not in dagster.yaml (whose `concurrency.pools`
only has `default_limit`), so the demo and the CLI set them here; deployments run deploy/set-pools.sh,
which reads the same file from the installed package.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # the instance is only passed through: no Dagster import at run time
    import dagster as dg

POOLS_FILE = Path(__file__).with_name("pools.yaml")


def project_pool_limits() -> dict[str, int]:
    return {str(k): int(v) for k, v in (yaml.safe_load(POOLS_FILE.read_text()) or {}).items()}


def ensure_pool_limits(instance: "dg.DagsterInstance") -> dict[str, int]:
    """Give each project pool its limit where the instance has none yet (a limit an operator set in
    the UI or with `dagster instance concurrency set` is kept). Returns the limits set now."""
    storage = instance.event_log_storage
    configured = _configured(instance)
    missing = {pool: n for pool, n in project_pool_limits().items() if pool not in configured}
    for pool, limit in missing.items():
        try:
            storage.set_concurrency_slots(pool, limit)
        except Exception:
            # Dagster checks for the pool's row, then inserts it: another command started at the same
            # moment on a fresh instance inserted it in between (a unique violation). Its limit stands.
            if pool not in _configured(instance):
                raise
    return missing


def _configured(instance: "dg.DagsterInstance") -> set[str]:
    return {limit.name for limit in instance.event_log_storage.get_pool_limits() if not limit.from_default}

