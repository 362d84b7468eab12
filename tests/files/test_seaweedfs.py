"""Smoke test of the pipeline against SeaweedFS, a production S3-API server (moto stays the server of
the tests that need its fault injection): single PUTs (from memory and streamed) and a multipart
upload through the project's own upload path, the listing of the range's checks, and a BadDigest."""

import base64
import hashlib
from collections.abc import Iterator

import pytest

from migration_assets.devstack.servers import start_seaweedfs
from migration_assets.files import store
from migration_assets.files.checks import range_checks
from migration_assets.files.worker import migrate_claimed_range
from tests.files.conftest import make_job, serve_s3
from tests.files.helpers import assert_bytes_equal
from tests.files.s3_proxy import s3_proxy

MIB = 1024 * 1024


def claim_first_range(job) -> store.Claim:
    with job.pool.connection() as conn:
        return store.claim_range(conn, "test-worker", 0, 100, job.settings.stale_minutes)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory) -> Iterator[str]:
    """Overrides conftest's moto server for this module: `s3`, `bucket` and `files_env` use SeaweedFS."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    yield from serve_s3(start_seaweedfs(folder / "data", log_path=folder / "weed.log"))


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def add_file(target, root, relative: str, data: bytes) -> int:
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes(data)
    return target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, %s) RETURNING file_id",
                          (relative, relative.rsplit("/", 1)[-1])).fetchone()[0]


def test_single_puts_and_multipart_are_stored_with_their_checksums_and_pass_the_listing_check(
    files_env, target, target_url, s3, bucket, source_root
):
    settings = files_env.model_copy(update={"multipart_threshold_mb": 16})  # 9 MiB: one streamed PUT
    files = {"small/a.txt": b"seaweed " * 400, "streamed/b.bin": b"s" * (9 * MIB + 7),
             "multi/c.bin": bytes(range(256)) * (17 * MIB // 256) + b"tail"}  # four 5 MiB parts
    for relative, data in files.items():
        add_file(target, source_root, relative, data)
    target.execute("INSERT INTO migration_ranges (min_id, max_id) VALUES (0, 100)")
    target.commit()
    job = make_job(settings, target_url)

    progress = migrate_claimed_range(job, claim_first_range(job))

    assert (progress.copied, progress.failed) == (3, 0), progress.failures
    for relative in ("small/a.txt", "streamed/b.bin"):
        head = s3.head_object(Bucket=bucket, Key=f"archive/{relative}", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == b64_sha256(files[relative])  # a single PUT: the file's SHA-256
    multi = s3.head_object(Bucket=bucket, Key="archive/multi/c.bin")
    assert multi["Metadata"]["sha256"] == hashlib.sha256(files["multi/c.bin"]).hexdigest()
    recorded = target.execute("SELECT s3_checksum FROM migration_files WHERE old_uri = 'multi/c.bin'").fetchone()[0]
    assert recorded.endswith("-4")
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="archive/")["Contents"]}
    assert listed == {f"archive/{relative}" for relative in files}
    outcomes = range_checks(job.pool, job.target, settings, 0, 100)
    assert all(o.passed for o in outcomes), [o.summary for o in outcomes]
    assert assert_bytes_equal(target, s3, bucket, source_root) == 3


def test_a_body_corrupted_on_the_way_is_refused_with_bad_digest_and_fails_that_file(
    files_env, target, target_url, s3, bucket, source_root, moto_s3
):
    good = add_file(target, source_root, "good.txt", b"arrives intact")
    bad = add_file(target, source_root, "bad.txt", b"one byte flips on the way")
    target.execute("INSERT INTO migration_ranges (min_id, max_id) VALUES (0, 100)")
    target.commit()
    with s3_proxy(moto_s3) as proxy:
        proxy.corrupt_keys = {f"{bucket}/archive/bad.txt"}  # after signing, as a faulty network would
        job = make_job(files_env, target_url, endpoint=proxy.url)

        progress = migrate_claimed_range(job, claim_first_range(job))

    assert (progress.copied, progress.failed) == (1, 1)
    status, error = target.execute("SELECT status, error FROM migration_files WHERE file_id = %s", (bad,)).fetchone()
    assert status == "FAIL" and "BadDigest" in error and f"file_id {bad} (bad.txt)" in error, error
    assert "retry" in error
    assert target.execute("SELECT status FROM migration_files WHERE file_id = %s", (good,)).fetchone()[0] == "SUCCESS"
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == {"archive/good.txt"}
    # the lean PUT was refused, then the client's own PUT (whose error is the file's)
    assert proxy.attempts[f"{bucket}/archive/bad.txt"] == 2 and proxy.attempts[f"{bucket}/archive/good.txt"] == 1


def test_small_files_go_by_the_lean_put_larger_ones_by_the_client_all_with_their_checksums(
    files_env, target, target_url, s3, bucket, source_root
):
    settings = files_env.model_copy(update={"multipart_threshold_mb": 16})
    files = {"a.txt": b"lean " * 300, "dir/with space+plus~.txt": b"quoted key", "big.bin": b"b" * (9 * MIB)}
    for relative, data in files.items():
        add_file(target, source_root, relative, data)
    target.execute("INSERT INTO migration_ranges (min_id, max_id) VALUES (0, 100)")
    target.commit()
    job = make_job(settings, target_url)
    through_client: list[str] = []
    job.target.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: through_client.append(request.url.rsplit("/", 1)[-1]))

    progress = migrate_claimed_range(job, claim_first_range(job))

    assert (progress.copied, progress.failed) == (3, 0), progress.failures
    assert through_client == ["big.bin"]  # streamed from disk: botocore; the two in memory went the lean way
    for relative, data in files.items():
        head = s3.head_object(Bucket=bucket, Key=f"archive/{relative}", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == b64_sha256(data) and head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    recorded = dict(target.execute("SELECT old_uri, s3_checksum FROM migration_files").fetchall())
    assert recorded == {relative: b64_sha256(data) for relative, data in files.items()}
    assert assert_bytes_equal(target, s3, bucket, source_root) == 3


def test_a_lean_put_meeting_a_5xx_or_a_dropped_connection_is_sent_again_by_the_client(
    files_env, target, target_url, s3, bucket, source_root, moto_s3
):
    add_file(target, source_root, "five-hundred.txt", b"first answer is a 500")
    add_file(target, source_root, "reset.txt", b"first connection dies")
    target.execute("INSERT INTO migration_ranges (min_id, max_id) VALUES (0, 100)")
    target.commit()
    with s3_proxy(moto_s3) as proxy:
        proxy.fail_times[f"{bucket}/archive/five-hundred.txt"] = 1
        proxy.cut_times[f"{bucket}/archive/reset.txt"] = 1
        job = make_job(files_env, target_url, endpoint=proxy.url)  # the client itself has one attempt

        progress = migrate_claimed_range(job, claim_first_range(job))

    assert (progress.copied, progress.failed) == (2, 0), progress.failures
    assert proxy.attempts[f"{bucket}/archive/five-hundred.txt"] == proxy.attempts[f"{bucket}/archive/reset.txt"] == 2
    assert assert_bytes_equal(target, s3, bucket, source_root) == 2
