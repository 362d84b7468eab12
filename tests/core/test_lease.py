"""The lease (core/lease.py) on a real PostgreSQL: disjoint concurrent claims, expiry takeover,
renewal, and fenced writes that change nothing once the lease was taken over."""

import threading
import uuid

import psycopg
import pytest

from migration_assets.core.lease import Heartbeat, Lease

ROWS = 1000


@pytest.fixture
def work(target) -> str:
    table = f"work_{uuid.uuid4().hex[:8]}"
    target.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, result text, claim_token uuid, lease_expires_at timestamptz)")
    target.execute(f"INSERT INTO {table} (id) SELECT generate_series(1, {ROWS})")
    return table


def connect(url: str) -> psycopg.Connection:
    """A claim must never wait for a lock: if one does, fail (lock_timeout) instead of hanging."""
    return psycopg.connect(url, options="-c lock_timeout=10s")


def expire(conn: psycopg.Connection, table: str, ids: list[int]) -> None:
    """Age leases in SQL, as a run that stalled past its ttl would leave them."""
    conn.execute(f"UPDATE {table} SET lease_expires_at = now() - interval '1 second' WHERE id = ANY(%s)", (ids,))


def test_concurrent_claims_are_disjoint_cover_every_row_and_skip_locked_rows(work, target, target_url):
    claimers, barrier = 4, threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(claimers)]
    errors: list[BaseException] = []
    # A result being written (a fence lock held in an open transaction) on a free row: claimers must
    # pass it over, not wait for it (lock_timeout turns a wait into an error).
    target.execute(f"UPDATE {work} SET claim_token = NULL WHERE id = 7")
    with connect(target_url) as holder:
        holder.execute(f"SELECT 1 FROM {work} WHERE id = 7 FOR UPDATE")

        def run(n: int) -> None:
            lease = Lease(work, "id", ttl_seconds=60)
            try:
                with connect(target_url) as conn:
                    barrier.wait()
                    while rows := lease.claim(conn, limit=25):
                        claimed[n].extend(row[0] for row in rows)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(claimers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
    assert all(claimed), "every claimer got rows: the claims really ran side by side"
    everything = [row for rows in claimed for row in rows]
    assert len(everything) == len(set(everything)), "a row was claimed twice"
    assert set(everything) == set(range(1, ROWS + 1)) - {7}
    with connect(target_url) as conn:  # the row passed over is claimable once its writer is done
        assert [row[0] for row in Lease(work, "id", 60).claim(conn, limit=10)] == [7]


def test_an_expired_lease_is_taken_over_and_the_old_holders_writes_change_nothing(work, target, target_url):
    first, second = Lease(work, "id", 60), Lease(work, "id", 60)
    with connect(target_url) as a, connect(target_url) as b:
        assert [r[0] for r in first.claim(a, "id <= %(n)s", {"n": 3}, limit=10)] == [1, 2, 3]
        assert second.claim(b, "id <= %(n)s", {"n": 3}, limit=10) == [], "a live lease is never taken"
        expire(target, work, [2])
        assert [r[0] for r in second.claim(b, "id <= %(n)s", {"n": 3}, limit=10)] == [2]

        assert first.renew(a) == 2 and first.lost == {2} and first.held == {1, 3}
        with a.transaction(), a.cursor() as cur:
            assert not first.finish(cur, 2, "result = %s", ("late",))
            assert not first.fence(cur, 2)
            assert first.finish(cur, 1, "result = %s", ("first",))
        with b.transaction(), b.cursor() as cur:
            assert second.finish(cur, 2, "result = %s", ("second",))
    rows = target.execute(f"SELECT id, result, claim_token FROM {work} WHERE id <= 3 ORDER BY id").fetchall()
    assert rows == [(1, "first", None), (2, "second", None), (3, None, first.token)]


def test_a_fenced_transaction_keeps_its_row_even_past_expiry(work, target, target_url):
    mine, other = Lease(work, "id", 60), Lease(work, "id", 60)
    with connect(target_url) as a, connect(target_url) as b:
        mine.claim(a, "id = 5", limit=1)
        expire(target, work, [5])  # the run stalled past its ttl, but nobody took the row yet
        with a.transaction(), a.cursor() as cur:
            assert mine.fence(cur, 5)
            assert other.claim(b, "id = 5", limit=1) == [], "a fenced row cannot be taken over mid-write"
            assert mine.finish(cur, 5, "result = %s", ("done",))
    assert target.execute(f"SELECT result FROM {work} WHERE id = 5").fetchone() == ("done",)


def test_renewal_keeps_a_lease_alive_and_the_heartbeat_notices_a_takeover(work, target, target_url):
    lease, rival = Lease(work, "id", ttl_seconds=60), Lease(work, "id", ttl_seconds=60)
    with connect(target_url) as conn:
        lease.claim(conn, "id <= 2", limit=2)
        target.execute(f"UPDATE {work} SET lease_expires_at = now() + interval '1 second' WHERE id <= 2")
        assert lease.renew(conn) == 2
    (live,) = target.execute(
        f"SELECT bool_and(lease_expires_at > now() + interval '50 seconds') FROM {work} WHERE id <= 2").fetchone()
    assert live, "renew pushes the expiry a whole ttl ahead"

    beat = Heartbeat(lease, lambda: connect(target_url), interval=0.05)
    with beat, connect(target_url) as conn:
        expire(target, work, [1])
        taken = rival.claim(conn, "id <= 2", limit=2)
        assert beat.lost.wait(30), "the heartbeat must notice the takeover"
    assert [r[0] for r in taken] == [1] and lease.lost == {1} and lease.held == {2}
