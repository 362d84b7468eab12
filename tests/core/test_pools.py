"""The project's pool limits applied to an instance (core/pools.py), by two commands started at once."""

import threading

import psycopg

from migration_assets.core.pools import ensure_pool_limits, project_pool_limits

WAIT = 60  # seconds: a guard against a hang, never a measurement


def test_two_commands_started_at_once_on_a_fresh_instance_both_apply_the_pools(fresh_instance):
    """Dagster reads a pool's row, then inserts it. The test holds inserts back until both commands have
    read that the pools are missing, as two commands started at the same moment do; before, the second
    failed with a unique violation and its command died before it started."""
    url = fresh_instance.run_storage.postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    fresh_instance.event_log_storage.get_pool_limits()  # the storage's tables exist before the race
    errors: list[BaseException] = []

    def command() -> None:
        try:
            ensure_pool_limits(fresh_instance)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        holder.execute("LOCK TABLE concurrency_limits IN SHARE MODE")  # reads go on, inserts wait
        commands = [threading.Thread(target=command) for _ in range(2)]
        for thread in commands:
            thread.start()
        waiting = 0
        for _ in range(WAIT * 20):
            waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE 'INSERT INTO concurrency_limits%%'").fetchone()[0]
            if waiting == 2 or not any(thread.is_alive() for thread in commands):
                break
            threading.Event().wait(0.05)
        assert waiting == 2, "both commands should be waiting to insert the first pool"
    for thread in commands:
        thread.join(WAIT)
    assert not errors, errors
    limits = {limit.name: limit.limit for limit in fresh_instance.event_log_storage.get_pool_limits()}
    assert {pool: limits.get(pool) for pool in project_pool_limits()} == project_pool_limits()
