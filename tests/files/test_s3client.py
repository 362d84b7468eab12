"""The copies' S3 client against the moto server: what each request carries on the wire."""

import ssl

import pytest
from dagster_aws.s3 import S3Resource

from migration_assets.files.s3client import USER_AGENT, FastPut, copy_client


def sent_headers(client) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []
    client.meta.events.register("before-send.s3", lambda request, **_: seen.append(
        (request.method + " " + request.url.split("?")[-1], dict(request.headers))))
    return seen


def test_puts_from_memory_go_without_expect_and_streams_and_parts_keep_it(moto_s3, bucket, tmp_path):
    client = copy_client(S3Resource(endpoint_url=moto_s3, max_attempts=1), concurrency=4)
    seen = sent_headers(client)
    (tmp_path / "f").write_bytes(b"z" * 1000)

    client.put_object(Bucket=bucket, Key="one", Body=b"x" * 1000, ChecksumAlgorithm="SHA256")
    with open(tmp_path / "f", "rb") as handle:
        client.put_object(Bucket=bucket, Key="streamed", Body=handle, ChecksumAlgorithm="SHA256")
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")
    client.upload_part(Bucket=bucket, Key="big", UploadId=upload["UploadId"], PartNumber=1, Body=b"y" * 1000)
    client.abort_multipart_upload(Bucket=bucket, Key="big", UploadId=upload["UploadId"])

    put, streamed, _, part, _ = seen
    assert "Expect" not in put[1] and put[1]["User-Agent"].startswith(USER_AGENT.encode())
    assert streamed[1]["Expect"] == part[1]["Expect"] == b"100-continue"
    assert client.get_object(Bucket=bucket, Key="one")["Body"].read() == b"x" * 1000
    assert client.get_object(Bucket=bucket, Key="streamed")["Body"].read() == b"z" * 1000


def test_bodies_are_not_hashed_again_for_the_signature_their_signed_checksum_guards_them(moto_s3, bucket):
    client = copy_client(S3Resource(endpoint_url=moto_s3, max_attempts=1), concurrency=1)
    seen = sent_headers(client)

    client.put_object(Bucket=bucket, Key="one", Body=b"x" * 1000, ChecksumAlgorithm="SHA256")

    (_, headers), = seen
    assert headers["X-Amz-Content-SHA256"] == b"UNSIGNED-PAYLOAD"
    signed = headers["Authorization"].decode().split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "x-amz-checksum-sha256" in signed


def test_settings_of_the_resource_carry_over(moto_s3):
    client = copy_client(S3Resource(endpoint_url=moto_s3, region_name="eu-west-1", max_attempts=7), concurrency=32)
    assert client.meta.region_name == "eu-west-1" and client.meta.endpoint_url == moto_s3
    assert client.meta.config.retries["total_max_attempts"] == 8  # as dagster-aws: retries after the first


@pytest.mark.parametrize("concurrency, pool", [(4, 10), (32, 32)])
def test_the_connection_pool_holds_every_upload_in_flight_and_never_fewer_than_botocores_ten(moto_s3, concurrency, pool):
    client = copy_client(S3Resource(endpoint_url=moto_s3), concurrency=concurrency)
    assert client.meta.config.max_pool_connections == pool


def test_listing_and_head_times_parse_to_the_same_instant(moto_s3, bucket):
    client = copy_client(S3Resource(endpoint_url=moto_s3), concurrency=2)
    client.put_object(Bucket=bucket, Key="t", Body=b"1")
    listed = client.list_objects_v2(Bucket=bucket)["Contents"][0]["LastModified"]
    headed = client.head_object(Bucket=bucket, Key="t")["LastModified"]
    assert listed.utcoffset().total_seconds() == 0 and abs((listed - headed).total_seconds()) < 1


def test_lean_puts_take_the_clients_url_and_signing_region_and_stand_aside_for_an_unsigned_session(moto_s3, bucket):
    signed = FastPut(copy_client(S3Resource(endpoint_url=moto_s3, region_name="eu-west-1"), concurrency=2), bucket)
    unsigned = FastPut(copy_client(S3Resource(endpoint_url=moto_s3, use_unsigned_session=True), concurrency=2), bucket)

    assert signed.available and signed.url("a b/ü+x~.txt") == f"{moto_s3}/{bucket}/a%20b/%C3%BC%2Bx~.txt"
    assert (signed._region, signed._service) == ("eu-west-1", "s3")
    assert not unsigned.available
    assert "Contents" not in signed._client.list_objects_v2(Bucket=bucket)  # the probe PUT was never sent


@pytest.mark.parametrize("verify, checked", [(None, True), (False, False)])
def test_lean_puts_over_https_verify_certificates_as_the_client_does(bucket, verify, checked):
    client = copy_client(S3Resource(endpoint_url="https://s3.example.test", verify=verify), concurrency=1)
    connection = FastPut(client, bucket)._connect()

    assert connection.host == "s3.example.test" and connection.port == 443
    assert connection._context.check_hostname is checked
    assert (connection._context.verify_mode == ssl.CERT_REQUIRED) is checked


def answered(raw: bytes):
    """An _HTTPConnection whose socket holds `raw` as the server's answer."""
    import socket

    from migration_assets.files.s3client import _HTTPConnection

    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    theirs.close()
    connection = _HTTPConnection("127.0.0.1")
    connection.sock = ours
    return connection


@pytest.mark.parametrize("raw, status, kept", [
    (b"HTTP/1.1 200 OK\r\nETag: \"e1\"\r\nx-amz-checksum-sha256: c2\r\nContent-Length: 0\r\n\r\n", 200, True),
    (b"HTTP/1.1 200\r\nEtag:\"e1\"\r\ncontent-length: 0\r\n\r\n", 200, True),  # no reason phrase, no space
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\nConnection: close\r\n\r\n<Err>", 400, False),
    (b"HTTP/1.0 200 OK\r\nETag: \"e1\"\r\nContent-Length: 0\r\n\r\n", 200, False),
])
def test_lean_answers_are_read_whole_and_the_connection_closed_when_they_say_so(raw, status, kept):
    from migration_assets.files.s3client import _read_response

    connection = answered(raw + b"next answer")
    got, headers = _read_response(connection)
    assert got == status
    if status == 200:
        assert headers["etag"] == '"e1"'
    assert (connection.sock is not None) == kept
    if kept:  # the body was read to its end, no further
        assert connection.reader().read() == b"next answer"


@pytest.mark.parametrize("raw", [
    b"",  # closed while idle
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nETag: \"e1\"\r\n\r\n",  # no length: the body would run to the connection's close
    b"HTTP/1.1 200 OK\r\n" + b"X-Flood: y\r\n" * 200 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"y" * 10_000 + b"\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",  # headers cut short
])
def test_lean_answers_it_cannot_read_leave_the_put_to_the_client(raw):
    from migration_assets.files.s3client import _read_response

    with pytest.raises(ValueError):
        _read_response(answered(raw))
