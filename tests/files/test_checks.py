"""The range checksum check's listing against the moto server: slices listed concurrently."""

from dagster_aws.s3 import S3Resource

from migration_assets.files import checks
from migration_assets.files.mover import S3Target
from migration_assets.files.s3client import copy_client
from migration_assets.files.store import CopiedFile


def test_sliced_listing_finds_every_object_among_others_under_the_same_prefix(moto_s3, bucket, monkeypatch):
    monkeypatch.setattr(checks, "LIST_PAGE", 3)  # 10 objects: 4 slices
    target = S3Target(copy_client(S3Resource(endpoint_url=moto_s3), 4), bucket, "p/")
    files = []
    for i in range(10):
        key = f"p/d/f{i:02d}.bin"
        etag = target.client.put_object(Bucket=bucket, Key=key, Body=b"x" * (i + 1), Metadata={"sha256": "0" * 64})["ETag"]
        target.client.put_object(Bucket=bucket, Key=f"p/d/f{i:02d}.other", Body=b"not ours")  # interleaved
        files.append(CopiedFile(i, target.uri(key), i + 1, "0" * 64, None, etag))

    listed = checks._listing(target, files, concurrency=4)

    assert listed == {f"p/d/f{i:02d}.bin": (i + 1, files[i].s3_etag) for i in range(10)}
    outcome = checks.checksum_check(target, files[:7], concurrency=4)  # a range that is part of the prefix
    assert outcome.passed, outcome.summary
    assert outcome.metadata["objects_headed"] == 1  # only the sample, no object missed by the listing
