"""The core against real PostgreSQL and a moto S3 server: copies, failures, retries, claims, cleanup."""

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time


from migration_assets.core.postgres import close_pools
from migration_assets.files import store, worker
from migration_assets.files.seed import seed_files
from migration_assets.files.settings import FilesSettings
from migration_assets.files.store import ClaimRefused
from migration_assets.core.lease import Heartbeat
from migration_assets.files.worker import migrate_claimed_range, retry_failed
from tests.files.conftest import make_job
from tests.files.helpers import assert_bytes_equal, expire_claim, seed, statuses
from tests.files.s3_proxy import s3_proxy


def claim(job, lo=0, hi=100, worker="w1"):
    with job.pool.connection() as conn:
        return store.claim_range(conn, worker, lo, hi, job.settings.stale_minutes)


def range_status(target, lo=0):
    return target.execute("SELECT status, claim_token FROM migration_ranges WHERE min_id = %s", (lo,)).fetchone()


def test_range_copies_every_file_with_its_checksum_and_a_rerun_copies_nothing(files_env, target, target_url, s3, bucket, source_root):
    ids = seed(target, source_root, 30)
    big = source_root / "big" / "video.bin"
    big.parent.mkdir()
    big.write_bytes(b"x" * (6 * 1024 * 1024 + 123))  # multipart: two 5 MiB parts
    target.execute("INSERT INTO source_files (file_uri, file_name) VALUES ('big/video.bin', 'video.bin')")
    job = make_job(files_env, target_url)

    progress = migrate_claimed_range(job, claim(job))

    assert (progress.copied, progress.failed, progress.stopped) == (31, 0, None)
    assert set(statuses(target).values()) == {"SUCCESS"} and len(statuses(target)) == 31
    assert assert_bytes_equal(target, s3, bucket, source_root) == 31
    assert range_status(target) == ("COMPLETE", None)
    head = s3.head_object(Bucket=bucket, Key="archive/big/video.bin", ChecksumMode="ENABLED")
    sha, s3_checksum = target.execute("SELECT sha256, s3_checksum FROM migration_files WHERE file_name = 'video.bin'").fetchone()
    assert head["Metadata"]["sha256"] == sha and s3_checksum.endswith("-2")
    assert s3_checksum.split("-")[0] == head["ChecksumSHA256"].split("-")[0]
    assert target.execute("SELECT new_uri FROM migration_files WHERE file_id = %s", (ids[0],)).fetchone()[0].startswith(f"s3://{bucket}/archive/batch-")

    rerun = migrate_claimed_range(job, claim(job))
    assert (rerun.copied, rerun.skipped) == (0, 31)


def test_file_changed_since_listing_or_while_uploading_fails_without_a_record_of_wrong_bytes(
    files_env, target, target_url, s3, bucket, source_root, moto_s3
):
    ids = seed(target, source_root, 5)
    changed = source_root / target.execute("SELECT file_uri FROM source_files WHERE file_id = %s", (ids[1],)).fetchone()[0]
    changed.write_bytes(changed.read_bytes()[::-1] + b"!")
    big = source_root / "big.bin"
    big.write_bytes(b"a" * (6 * 1024 * 1024))
    (big_id,) = target.execute("INSERT INTO source_files (file_uri, file_name) VALUES ('big.bin', 'big.bin') RETURNING file_id").fetchone()

    def change_big_when_upload_starts(method: str, path: str) -> None:
        if method == "POST" and "big.bin?uploads" in path:
            big.write_bytes(b"b" * (6 * 1024 * 1024))

    with s3_proxy(moto_s3) as proxy:
        proxy.before = change_big_when_upload_starts
        job = make_job(files_env, target_url, endpoint=proxy.url)
        progress = migrate_claimed_range(job, claim(job))

    assert progress.failed == 2
    errors = dict(target.execute("SELECT file_id, error FROM migration_files WHERE status = 'FAIL'"))
    assert "changed since it was listed" in errors[ids[1]] and "source_files" in errors[ids[1]]
    assert "changed while uploading" in errors[big_id]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "archive/big.bin" not in keys and not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert assert_bytes_equal(target, s3, bucket, source_root) == 4


def test_single_puts_above_the_memory_limit_stream_and_a_file_changed_meanwhile_is_not_recorded(
    files_env, target, target_url, s3, bucket, source_root, moto_s3, monkeypatch
):
    """9 MiB files under a 16 MiB multipart threshold: one PUT each, streamed from disk. moto stores
    any bytes under any announced checksum, so the pipeline itself must notice what it sent."""
    monkeypatch.setenv("FILES_MULTIPART_THRESHOLD_MB", "16")
    settings = FilesSettings.from_env()
    size = 9 * 1024 * 1024 + 5
    names = ("kept", "changed", "shrunk", "cut")
    for name in names:
        (source_root / f"{name}.bin").write_bytes(os.urandom(size))
        target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, %s)", (f"{name}.bin", f"{name}.bin"))
    store.expand_ranges(target, 100)
    target.commit()

    def change_as_upload_starts(method: str, path: str) -> None:
        if method == "PUT" and path.endswith("/changed.bin"):
            (source_root / "changed.bin").write_bytes(os.urandom(size))  # same size, other bytes
        if method == "PUT" and path.endswith("/shrunk.bin"):
            os.truncate(source_root / "shrunk.bin", size // 2)

    with s3_proxy(moto_s3) as proxy:
        proxy.before = change_as_upload_starts
        proxy.cut_keys = {f"{bucket}/archive/cut.bin"}  # the connection dies mid-body
        job = make_job(settings, target_url, endpoint=proxy.url)
        progress = migrate_claimed_range(job, claim(job))
        proxy.before = None
        proxy.cut_keys.clear()
        retried = retry_failed(job)

    assert (progress.copied, progress.failed) == (1, 3)
    name_of = dict(target.execute("SELECT file_id, file_name FROM source_files"))
    errors = {name_of[file_id]: error for file_id, error in progress.failures}
    assert "changed while uploading" in errors["changed.bin"] and "changed while uploading" in errors["shrunk.bin"]
    assert "S3 upload" in errors["cut.bin"] and "changed" not in errors["cut.bin"]  # half sent proves nothing
    assert (retried.listed, retried.copied, retried.failed) == (3, 3, 0)  # the files as they are now
    assert assert_bytes_equal(target, s3, bucket, source_root) == 4
    for name in names:
        head = s3.head_object(Bucket=bucket, Key=f"archive/{name}.bin", ChecksumMode="ENABLED")
        digest = hashlib.sha256((source_root / f"{name}.bin").read_bytes()).digest()
        assert head["ChecksumSHA256"] == base64.b64encode(digest).decode()  # one PUT: the file's own SHA-256
    # the changed file's wrong bytes were stored (and deleted again); the shrunk one's never arrived whole
    assert proxy.uploads == {f"{bucket}/archive/kept.bin": 1, f"{bucket}/archive/changed.bin": 2,
                             f"{bucket}/archive/shrunk.bin": 1, f"{bucket}/archive/cut.bin": 1}
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_missing_file_stays_fail_with_its_error_after_its_retries(files_env, target, target_url, source_root):
    ids = seed(target, source_root, 3)
    missing = target.execute("SELECT file_uri FROM source_files WHERE file_id = %s", (ids[2],)).fetchone()[0]
    (source_root / missing).unlink()
    job = make_job(files_env, target_url)
    migrate_claimed_range(job, claim(job))

    attempts = [retry_failed(job).listed for _ in range(4)]

    assert attempts == [1, 1, 1, 0]  # three retries, then it stays FAIL
    status, retries, error = target.execute(
        "SELECT status, retry_count, error FROM migration_files WHERE file_id = %s", (ids[2],)).fetchone()
    assert (status, retries) == ("FAIL", 3)
    assert "source file missing" in error and missing in error


def test_failed_puts_recover_through_retries_with_their_new_uri(files_env, target, target_url, s3, bucket, source_root, moto_s3):
    ids = seed(target, source_root, 12)
    uris = dict(target.execute("SELECT file_id, file_uri FROM source_files"))
    broken = {f"{bucket}/archive/{uris[i]}" for i in ids[:3]}
    with s3_proxy(moto_s3) as proxy:
        proxy.failing_keys = set(broken)
        job = make_job(files_env, target_url, endpoint=proxy.url)
        first = migrate_claimed_range(job, claim(job))
        assert first.failed == 3 and "InternalError" in first.failures[0][1]
        assert range_status(target) == ("COMPLETE", None)  # failed files are the retry schedule's now
        proxy.failing_keys.clear()
        retried = retry_failed(job)

    assert (retried.listed, retried.copied, retried.failed) == (3, 3, 0)
    rows = target.execute("SELECT status, retry_count, new_uri FROM migration_files WHERE file_id = ANY(%s)", (ids[:3],)).fetchall()
    assert all(r[0] == "SUCCESS" and r[1] == 1 and r[2].startswith("s3://") for r in rows)
    assert assert_bytes_equal(target, s3, bucket, source_root) == 12
    assert all(proxy.uploads[k] == 1 for k in broken)


def test_a_retry_worker_killed_mid_batch_leaves_no_file_retrying(files_env, target, target_url, source_root):
    ids = seed(target, source_root, 3)
    target.execute("INSERT INTO migration_files (file_id, old_uri, status, error) SELECT file_id, file_uri, 'FAIL', 'x' FROM source_files")
    code = (
        "import os, signal, psycopg\n"
        "from migration_assets.files import store\n"
        f"conn = psycopg.connect({target_url!r})\n"
        "with conn.transaction():\n"
        "    assert len(store.claim_retries(conn, 3, 500)) == 3\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert killed.returncode == -9, killed.stderr
    assert target.execute("SELECT status, retry_count FROM migration_files").fetchall() == [("FAIL", 0)] * len(ids)


def test_two_workers_never_claim_the_same_range(files_env, target, target_url, source_root):
    seed(target, source_root, 450)  # ranges [0, 100) ... [400, 500)
    job = make_job(files_env, target_url)
    gate = threading.Barrier(6)
    claims, refusals = [], []

    def take_next(name: str) -> None:
        with job.pool.connection() as conn:
            gate.wait()
            while claim := store.claim_next(conn, name):
                claims.append(claim)

    def take_same(name: str) -> None:
        gate.wait()
        try:
            claims.append(claim(job, 400, 500, name))
        except ClaimRefused as refused:
            refusals.append(str(refused))

    threads = [threading.Thread(target=take_next, args=(f"w{i}",)) for i in range(4)]
    threads += [threading.Thread(target=take_same, args=(f"s{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    ranges = [(c.min_id, c.max_id) for c in claims]
    assert sorted(ranges) == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500)]
    assert len(refusals) >= 1 and all("PROCESSING" in r for r in refusals)  # at most one took [400, 500)


def test_cleanup_releases_a_stale_range_and_never_a_live_one(files_env, target, target_url, source_root, monkeypatch):
    seed(target, source_root, 150)
    job = make_job(files_env, target_url)
    live, dead = claim(job, 0, 100, "live"), claim(job, 100, 200, "dead")
    expire_claim(target, 0, 100)
    expire_claim(target, 100, 200)
    renewed, renew = threading.Event(), live.lease.renew

    def renew_seen(conn):
        held = renew(conn)
        if held:
            renewed.set()
        return held

    monkeypatch.setattr(live.lease, "renew", renew_seen)  # the real renewal, observed
    with Heartbeat(live.lease, job.pool.connection, interval=0.05):
        assert renewed.wait(30), "the live worker's heartbeat never renewed its lease"
        with job.pool.connection() as conn:
            released = store.release_stale(conn)

    assert released == [(100, 200)]
    assert range_status(target, 0)[0] == "PROCESSING" and range_status(target, 100) == ("PENDING", None)
    with job.pool.connection() as conn:
        assert not store.heartbeat(conn, dead)  # the dead worker, if it woke, would know it lost its claim


def test_expansion_adds_aligned_ranges_and_reopens_a_completed_range_that_grew(files_env, target, target_url, source_root):
    seed(target, source_root, 150)
    assert store.all_ranges(target) == [(0, 100, "PENDING"), (100, 200, "PENDING")]
    job = make_job(files_env, target_url)
    migrate_claimed_range(job, claim(job, 100, 200))
    assert store.all_ranges(target) == [(0, 100, "PENDING"), (100, 200, "COMPLETE")]

    seed_files(target, source_root, 100)  # ids 151-250
    added, reopened = store.expand_ranges(target, 100)

    assert (added, reopened) == ([(200, 300)], [(100, 200)])
    assert store.all_ranges(target) == [(0, 100, "PENDING"), (100, 200, "PENDING"), (200, 300, "PENDING")]


def test_a_completed_range_reopens_for_a_file_listed_below_the_ids_it_saw(files_env, target, target_url, source_root):
    """An id taken earlier and committed later (or given explicitly): before, only ids above the highest
    one a completed range saw reopened it, and this file was never copied."""
    ids = seed(target, source_root, 10)
    job = make_job(files_env, target_url)
    migrate_claimed_range(job, claim(job))
    target.execute("DELETE FROM migration_files WHERE file_id = %s", (ids[3],))
    target.execute("DELETE FROM source_files WHERE file_id = %s", (ids[3],))  # as if not committed yet
    target.commit()
    migrate_claimed_range(job, claim(job))  # the range completes having seen ids up to ids[-1]
    assert store.all_ranges(target) == [(0, 100, "COMPLETE")]
    (source,) = [p for p in source_root.rglob("*") if p.is_file()][:1]
    target.execute("INSERT INTO source_files (file_id, file_uri, file_name) VALUES (%s, %s, 'late')",
                   (ids[3], source.relative_to(source_root).as_posix()))
    target.commit()

    assert store.expand_ranges(target, 100) == ([], [(0, 100)])
    migrate_claimed_range(job, claim(job))  # its bytes are an object already there: found, not sent again
    assert statuses(target)[ids[3]] == "SUCCESS" and store.all_ranges(target) == [(0, 100, "COMPLETE")]


def test_listed_digests_and_sizes_are_read_as_inventories_write_them(files_env, target, target_url, s3, bucket, source_root):
    """Upper-case hex (PowerShell's Get-FileHash), a padded empty CHAR(64), -1 for "size unknown": each file
    copies. Before, each failed as "changed since it was listed", every retry reading it again. A digest
    that is not one fails its file, saying so."""
    ids = seed(target, source_root, 4)
    uri = {i: target.execute("SELECT file_uri FROM source_files WHERE file_id = %s", (i,)).fetchone()[0] for i in ids}
    digest = {i: hashlib.sha256((source_root / uri[i]).read_bytes()).hexdigest() for i in ids}
    target.execute("UPDATE source_files SET sha256 = %s WHERE file_id = %s", (digest[ids[0]].upper(), ids[0]))
    target.execute("UPDATE source_files SET sha256 = %s, size = -1 WHERE file_id = %s", (" " * 64, ids[1]))
    target.execute("UPDATE source_files SET sha256 = %s WHERE file_id = %s", (digest[ids[2]], ids[2]))
    target.execute("UPDATE source_files SET sha256 = %s WHERE file_id = %s", ("n/a", ids[3]))
    target.commit()
    job = make_job(files_env, target_url)

    progress = migrate_claimed_range(job, claim(job))

    assert (progress.copied, progress.failed) == (3, 1)
    assert statuses(target) == {ids[0]: "SUCCESS", ids[1]: "SUCCESS", ids[2]: "SUCCESS", ids[3]: "FAIL"}
    (error,) = target.execute("SELECT error FROM migration_files WHERE file_id = %s", (ids[3],)).fetchone()
    assert "source_files.sha256 of file_id" in error and "'n/a', not a SHA-256 digest in hex" in error
    assert assert_bytes_equal(target, s3, bucket, source_root) == 3


def test_a_backslash_is_a_separator_unless_the_name_holds_one_and_both_existing_is_refused(
    files_env, target, target_url, s3, bucket, source_root
):
    """`win\\a.txt` (a Windows inventory) is `win/a.txt`; `posix\\b.txt` is a POSIX file of that very name;
    `both\\c.txt` names a file that exists both ways. Before, the last was copied from `both/c.txt` and
    recorded SUCCESS, the real file never copied; the second failed as missing."""
    for relative, data in {"win/a.txt": b"a", "posix\\b.txt": b"b", "both/c.txt": b"slash", "both\\c.txt": b"back"}.items():
        (source_root / relative).parent.mkdir(parents=True, exist_ok=True)
        (source_root / relative).write_bytes(data)
    for uri in ("win\\a.txt", "posix\\b.txt", "both\\c.txt"):
        target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, 'f')", (uri,))
    store.expand_ranges(target, 100)
    target.commit()
    job = make_job(files_env, target_url)

    migrate_claimed_range(job, claim(job))

    outcome = dict(target.execute("SELECT s.file_uri, m.status FROM migration_files m JOIN source_files s USING (file_id)"))
    assert outcome == {"win\\a.txt": "SUCCESS", "posix\\b.txt": "SUCCESS", "both\\c.txt": "FAIL"}
    assert s3.get_object(Bucket=bucket, Key="archive/win/a.txt")["Body"].read() == b"a"
    assert s3.get_object(Bucket=bucket, Key="archive/posix\\b.txt")["Body"].read() == b"b"
    (error,) = target.execute("SELECT error FROM migration_files WHERE status = 'FAIL'").fetchone()
    assert "names both both\\c.txt (a backslash in its name) and both/c.txt" in error


def test_a_retry_batch_outlasting_the_servers_idle_in_transaction_limit_is_recorded(
    files_env, target, target_url, source_root, monkeypatch
):
    """One upload longer than idle_in_transaction_session_timeout (1 s here; managed servers set minutes):
    before, the server killed the batch's transaction, nothing was recorded, and every run took the same
    files again."""
    ids = seed(target, source_root, 3)
    target.execute("INSERT INTO migration_files (file_id, old_uri, status, retry_count, error) "
                   "SELECT file_id, file_uri, 'FAIL', 0, 'earlier' FROM source_files")
    target.execute(f'ALTER DATABASE "{target.info.dbname}" SET idle_in_transaction_session_timeout = \'1s\'')
    close_pools()  # new connections take the setting
    copy = worker.copy_file

    def slow(target_, root, source, settings, probe):
        if source.file_id == ids[-1]:
            time.sleep(2.5)  # a big file: nothing written to the database meanwhile
        return copy(target_, root, source, settings, probe)

    monkeypatch.setattr(worker, "copy_file", slow)
    progress = retry_failed(make_job(files_env, target_url))

    assert progress.copied == 3 and set(statuses(target).values()) == {"SUCCESS"}
