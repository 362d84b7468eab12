"""The file pipeline's bookkeeping at scale: a `source_files` of 1,000,000 rows (made in the server
with generate_series) in an embedded PostgreSQL; the time and this process's peak RSS of each step
the pipeline takes over it, files not copied (bench/file_migration.py measures copying).

Steps: range expansion (from nothing, again with nothing new, and reopening COMPLETE ranges that
gained a file), claiming every range in turn and listing one range's files (what a copy run holds),
the retry backlog: 100,000 FAIL files (a quarter of them out of retries, at the lowest ids, so
each batch claim passes over them), claimed FILES_RETRY_BATCH at a time until none is left, plus the
failure report's queries; then the same number of rows with sparse ids (10 clusters 10^11 apart),
expanded, and a late file in a gap. Peak RSS is Linux's VmHWM, reset before each step (/proc/self/clear_refs).

    python bench/file_scale.py                 # 1,000,000 rows
    python bench/file_scale.py --rows 100000   # smoke run
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from bench.common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result
except ImportError:  # run as a script: bench/ is on sys.path
    from common import embedded_postgres, load_average, log, machine_info, peak_rss_mb, write_result

NAME = "file_scale"
RANGE_SIZE = 10_000
RETRY_BATCH = 500
MAX_RETRIES = 3
SPARSE_CLUSTERS = 10           # then: the same rows as 10 shares of consecutive ids ...
SPARSE_GAP = 100_000_000_000   # ... 10^11 ids apart (as inventories imported with id offsets)


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def step(name: str, figures: dict, action: Callable[[], Any]) -> Any:
    reset_peak_rss()
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    figures[name] = {"seconds": round(seconds, 3), "peak_rss_mb": peak_rss_mb()}
    log(f"{name}: {figures[name]}")
    return result


def fill_source_files(conn, rows: int) -> None:
    conn.execute(
        "INSERT INTO source_files (file_uri, file_name, size) "
        "SELECT format('batch-%%s/file-%%s.bin', g / 1000, g), format('file-%%s.bin', g), 8192 "
        "FROM generate_series(1, %s) AS g", (rows,))
    conn.execute("ANALYZE source_files")


def fill_failures(conn, rows: int) -> tuple[int, int]:
    """Every 10th file FAIL (those in the lowest quarter of ids out of retries), the others SUCCESS;
    returns (FAIL with retries left, FAIL out of retries)."""
    conn.execute(
        "INSERT INTO migration_files (file_id, old_uri, status, retry_count, error) "
        "SELECT file_id, file_uri, CASE WHEN file_id %% 10 = 0 THEN 'FAIL' ELSE 'SUCCESS' END, "
        "  CASE WHEN file_id %% 10 = 0 AND file_id <= %s THEN %s ELSE 0 END, "
        "  CASE WHEN file_id %% 10 = 0 THEN 'source file missing' END FROM source_files", (rows // 4, MAX_RETRIES))
    conn.execute("ANALYZE migration_files")
    return conn.execute(
        "SELECT count(*) FILTER (WHERE retry_count < %(r)s), count(*) FILTER (WHERE retry_count >= %(r)s) "
        "FROM migration_files WHERE status = 'FAIL'", {"r": MAX_RETRIES}).fetchone()


def claim_every_range(pool) -> dict:
    from migration_assets.files import store

    seconds = []
    with pool.connection() as conn:
        while True:
            started = time.perf_counter()
            claim = store.claim_next(conn, "bench", 60.0)
            seconds.append(time.perf_counter() - started)
            if claim is None:
                break
            (last,) = conn.execute("SELECT max(file_id) FROM source_files WHERE file_id >= %s AND file_id < %s",
                                   (claim.min_id, claim.max_id)).fetchone()
            store.complete(conn, claim, last)  # as a run does: the highest id it saw
    return {"claims": len(seconds) - 1, "max_claim_ms": round(max(seconds) * 1000, 2),
            "mean_claim_ms": round(sum(seconds) / len(seconds) * 1000, 2)}


def drain_retries(pool) -> dict:
    """Claim batches until none is left; each batch's files then succeed (as a retry that worked)."""
    from migration_assets.files import store

    seconds, files = [], 0
    with pool.connection() as conn:
        while True:
            with conn.transaction():
                started = time.perf_counter()
                batch = store.claim_retries(conn, MAX_RETRIES, RETRY_BATCH)
                seconds.append(time.perf_counter() - started)
                conn.execute("UPDATE migration_files SET status = 'SUCCESS' WHERE file_id = ANY(%s)",
                             ([f.file_id for f in batch],))
            files += len(batch)
            if not batch:
                break
    return {"batches": len(seconds) - 1, "files": files, "max_batch_claim_ms": round(max(seconds) * 1000, 2),
            "mean_batch_claim_ms": round(sum(seconds) / len(seconds) * 1000, 2)}


def measure(target_url: str, rows: int) -> dict:
    import psycopg

    from migration_assets.core.postgres import shared_pool
    from migration_assets.files import report_store, store

    pool = shared_pool(target_url)  # applies the schema
    figures: dict[str, Any] = {}
    with psycopg.connect(target_url, autocommit=True) as conn:
        step("fill_source_files", figures, lambda: fill_source_files(conn, rows))
    with pool.connection() as conn:
        added, _ = step("expand_ranges", figures, lambda: store.expand_ranges(conn, RANGE_SIZE))
        figures["expand_ranges"]["ranges_added"] = len(added)
        again, _ = step("expand_ranges_nothing_new", figures, lambda: store.expand_ranges(conn, RANGE_SIZE))
        figures["expand_ranges_nothing_new"]["ranges_added"] = len(again)
    claims = step("claim_every_range", figures, lambda: claim_every_range(pool))
    figures["claim_every_range"].update(claims)
    with pool.connection() as conn:
        conn.execute("INSERT INTO source_files (file_uri, file_name) VALUES ('late.bin', 'late.bin')")
        conn.commit()
        _, reopened = step("expand_ranges_reopen", figures, lambda: store.expand_ranges(conn, RANGE_SIZE))
        figures["expand_ranges_reopen"]["ranges_reopened"] = len(reopened)
        files = step("range_files_one_range", figures, lambda: store.range_files(conn, 0, RANGE_SIZE))
        figures["range_files_one_range"]["files"] = len(files)
        del files
        retryable, out_of_retries = step("fill_migration_files", figures, lambda: fill_failures(conn, rows))
        conn.commit()
        figures["fill_migration_files"].update(fail_with_retries_left=retryable, fail_out_of_retries=out_of_retries)
        report = step("failed_in_ranges_one_range", figures,
                      lambda: report_store.failed_in_ranges(conn, [(0, RANGE_SIZE)], MAX_RETRIES))
        figures["failed_in_ranges_one_range"]["rows"] = len(report)
    drained = step("drain_retries", figures, lambda: drain_retries(pool))
    figures["drain_retries"].update(drained)
    with pool.connection() as conn:
        conn.execute("TRUNCATE migration_files, migration_ranges, source_files")
        conn.execute(
            "INSERT INTO source_files (file_id, file_uri, file_name) "
            "SELECT (g / %(per)s) * %(gap)s + g %% %(per)s, format('share-%%s/f-%%s', g / %(per)s, g), 'f' "
            "FROM generate_series(0, %(rows)s - 1) AS g", {"per": rows // SPARSE_CLUSTERS, "gap": SPARSE_GAP, "rows": rows})
        conn.commit()
        added, _ = step("expand_ranges_sparse_ids", figures, lambda: store.expand_ranges(conn, RANGE_SIZE))
        figures["expand_ranges_sparse_ids"].update(
            ranges_added=len(added), id_span=conn.execute("SELECT max(file_id) - min(file_id) FROM source_files").fetchone()[0])
        conn.execute("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, 'late', 'late')", (SPARSE_GAP // 2,))
        conn.commit()
        added, _ = step("expand_ranges_sparse_late_file_in_a_gap", figures, lambda: store.expand_ranges(conn, RANGE_SIZE))
        figures["expand_ranges_sparse_late_file_in_a_gap"]["ranges_added"] = added
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="source_files rows (default 1,000,000)")
    args = parser.parse_args(argv)
    with embedded_postgres() as (target_url, _dagster_url):
        figures = measure(target_url, args.rows)
    write_result(NAME, {
        "bench": NAME, "machine": machine_info(), "load_average": load_average(),
        "sizes": {"source_files_rows": args.rows, "range_size": RANGE_SIZE, "retry_batch": RETRY_BATCH,
                  "max_retries": MAX_RETRIES},
        "figures": "seconds and this process's peak RSS (VmHWM, reset before each step) per step; the "
                   "PostgreSQL server's own memory is not included",
        "steps": figures,
        "process_peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
