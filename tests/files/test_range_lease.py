"""A range worker whose lease was taken over (it stalled past FILES_STALE_MINUTES and another worker
claimed the range) records nothing more, stops, and leaves the range to the new holder."""

from migration_assets.files import store
from migration_assets.files.store import ClaimRefused
from migration_assets.files.worker import migrate_claimed_range
from tests.files.conftest import make_job
from tests.files.helpers import seed


def recorded(target) -> int:
    return target.execute("SELECT count(*) FROM migration_files").fetchone()[0]


def take_over(job, target) -> store.Claim:
    """The stalled worker's lease runs out (aged in SQL) and another worker claims the range. A
    refusal means a results write held the row at that moment: once it ended, claim again."""
    target.execute("UPDATE migration_ranges SET lease_expires_at = now() - interval '1 second'")
    for _ in range(10):
        try:
            with job.pool.connection() as conn:
                return store.claim_range(conn, "thief", 0, 100, 60)
        except ClaimRefused:
            continue
    raise AssertionError("the expired range could not be claimed")


def test_a_worker_whose_range_was_taken_over_records_nothing_more_and_stops(files_env, target, target_url, source_root):
    seed(target, source_root, 60)
    looks, taken = iter(range(10_000)), {}

    def stop_reason() -> None:  # asked before each file: the takeover happens before the 21st
        if next(looks) == 20:
            taken["claim"] = take_over(job, target)
            taken["recorded"] = recorded(target)

    job = make_job(files_env, target_url, window_stop=stop_reason)
    with job.pool.connection() as conn:
        claim = store.claim_range(conn, "stalled", 0, 100, 60)

    progress = migrate_claimed_range(job, claim)

    assert progress.stopped and "lost the claim on range [0, 100)" in progress.stopped
    assert recorded(target) == taken["recorded"] < 60, "the worker recorded results after losing its lease"
    assert target.execute("SELECT status, claimed_by, claim_token FROM migration_ranges").fetchone() == (
        "PROCESSING", "thief", taken["claim"].token), "the old holder released or completed the new holder's range"
