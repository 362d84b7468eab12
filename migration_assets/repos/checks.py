"""Checks of a bucket's repos and records, computed in the target database."""

import psycopg

from migration_assets.core.checks import CheckOutcome, listing

CHECKS = {
    "records_match_mst": "each synced repo's stored records = its MST leaf count at its rev",
    "deleted_repos_have_no_records": "repos marked deleted keep no records",
    "no_repo_stuck_in_progress": "no repo claimed by a run that stopped renewing its lease (expired claim)",
}
WARN_CHECKS = frozenset({"no_repo_stuck_in_progress"})


def records_match_mst(conn: psycopg.Connection, buckets: list[int]) -> CheckOutcome:
    rows = conn.execute(
        """SELECT r.did, r.records_count, count(x.rkey)
           FROM repos r LEFT JOIN records x ON x.did = r.did
           WHERE r.bucket = ANY(%s) AND r.status = 'synced'
           GROUP BY r.did, r.records_count HAVING count(x.rkey) <> r.records_count ORDER BY r.did""",
        (buckets,),
    ).fetchall()
    synced = conn.execute(
        "SELECT count(*) FROM repos WHERE bucket = ANY(%s) AND status = 'synced'", (buckets,)
    ).fetchone()[0]
    if rows:
        summary = (f"{len(rows)} synced repos differ from their MST: "
                   + listing([f"{did} stored {n} of {expected}" for did, expected, n in rows])
                   + "; re-run the bucket to resync them")
    else:
        summary = f"all {synced} synced repos hold exactly their MST's records"
    return CheckOutcome("records_match_mst", not rows, summary, metadata={"synced_repos": synced, "mismatched": len(rows)})


def deleted_repos_have_no_records(conn: psycopg.Connection, buckets: list[int]) -> CheckOutcome:
    rows = conn.execute(
        """SELECT r.did, count(*) FROM repos r JOIN records x ON x.did = r.did
           WHERE r.bucket = ANY(%s) AND r.status = 'deleted' GROUP BY r.did ORDER BY r.did""",
        (buckets,),
    ).fetchall()
    summary = ("deleted repos still hold records: " + listing([f"{did} ({n})" for did, n in rows])
               if rows else "no deleted repo holds records")
    return CheckOutcome("deleted_repos_have_no_records", not rows, summary, metadata={"repos_with_leftovers": len(rows)})


def no_repo_stuck_in_progress(conn: psycopg.Connection, buckets: list[int]) -> CheckOutcome:
    rows = conn.execute(
        """SELECT did FROM repos WHERE bucket = ANY(%s) AND status = 'in_progress'
           AND lease_expires_at < now() ORDER BY did""",
        (buckets,),
    ).fetchall()
    summary = (f"{len(rows)} repos whose run stopped renewing its lease (REPO_LEASE_SECONDS): "
               + listing([did for (did,) in rows]) + "; the next run of the bucket takes them over"
               if rows else "no stale claims")
    return CheckOutcome("no_repo_stuck_in_progress", not rows, summary, severity="WARN", metadata={"stuck": len(rows)})


def run_checks(conn: psycopg.Connection, buckets: list[int]) -> list[CheckOutcome]:
    return [
        records_match_mst(conn, buckets),
        deleted_repos_have_no_records(conn, buckets),
        no_repo_stuck_in_progress(conn, buckets),
    ]
