"""FastPut's own SigV4 signer against botocore's S3SigV4Auth: the same request, signed at the same instant,
must come out with the same headers, in the same order, byte for byte (no server needed; the real-server
tests in test_seaweedfs.py send them to a server that checks signatures)."""

import datetime
import hashlib
import itertools
from unittest import mock

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from migration_assets.files.s3client import USER_AGENT, FastPut, SigV4Signer

KEYS = [
    "plain.txt", "a b/ü+x~.txt", "dir/sub/file=1&2;3,4.bin", "emoji/😀 snow☃ 中文", "tilde~plus+eq=", "  lead and trail  ",
    "percent%20literal", "star*paren()!'$@:", "q?hash#frag", "a//double//slash", "/leading", "dots/./and/../x",
    "tab\tand\u00a0nbsp", "x" * 900,
]
METADATA = [
    {},
    {"sha256": hashlib.sha256(b"m").hexdigest()},
    {"sha256": "ab" * 32, "Note": "  spaced   out\tvalue  ", "empty": ""},
    {"MixedCase": "one", "mixedcase": "two"},  # two headers that differ only in case: signed as one, comma-joined
]
ENDPOINTS = [  # (endpoint, addressing style)
    ("http://127.0.0.1:8333", None),
    ("http://localhost:9000", "path"),
    ("http://s3.local.test", "virtual"),
    ("https://s3.example.test", None),
    ("https://s3.example.test:8443", "virtual"),
    (None, None),  # AWS itself: https://<bucket>.s3.<region>.amazonaws.com
]
CREDENTIALS = [("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None),
               ("ASIATESTKEY", "secret/with+symbols=", "FQoGZXIvYXdzEJr//////////wEaDO+token=")]
PAYLOAD_SIGNING = [False, None, True]  # the pipeline's client: False; botocore's default: None
INSTANTS = [datetime.datetime(2026, 1, 2, 3, 4, 5), datetime.datetime(2026, 1, 2, 23, 59, 59),
            datetime.datetime(2026, 1, 3, 0, 0, 0)]  # a new day: a new signing key


def fast_put(endpoint, style, credentials, payload_signing, region="eu-west-1", bucket="bucket-1"):
    access, secret, token = credentials
    s3 = {"payload_signing_enabled": payload_signing} if payload_signing is not None else {}
    if style:
        s3["addressing_style"] = style
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access, aws_secret_access_key=secret,
        aws_session_token=token, config=Config(s3=s3 or None, user_agent=USER_AGENT))
    fast = FastPut(client, bucket)
    assert fast.available
    return fast


def botocore_signed(fast, key, body, sha, metadata, instant):
    """The request as FastPut built it before it had its own signer, signed by botocore."""
    headers = {"Host": fast._host, "User-Agent": USER_AGENT,
               "x-amz-checksum-sha256": __import__("base64").b64encode(sha).decode(),
               "x-amz-sdk-checksum-algorithm": "SHA256", "Content-Length": str(len(body)),
               **{f"x-amz-meta-{name}": value for name, value in metadata.items()}}
    request = AWSRequest("PUT", fast.url(key), headers=headers, data=body)
    request.context["client_config"] = fast._client.meta.config
    credentials = fast._client._get_credentials().get_frozen_credentials()
    with mock.patch("botocore.auth.get_current_datetime", return_value=instant):
        S3SigV4Auth(credentials, fast._service, fast._region).add_auth(request)
    return list(request.headers.items())


@pytest.mark.parametrize("endpoint, style", ENDPOINTS)
@pytest.mark.parametrize("credentials", CREDENTIALS, ids=["static", "session-token"])
@pytest.mark.parametrize("payload_signing", PAYLOAD_SIGNING, ids=["unsigned-payload", "default", "signed-payload"])
def test_lean_signatures_are_botocores_byte_for_byte(endpoint, style, credentials, payload_signing):
    fast = fast_put(endpoint, style, credentials, payload_signing)
    for n, (key, metadata, instant) in enumerate(itertools.product(KEYS, METADATA, INSTANTS)):
        body = f"body {n}".encode() * n
        sha = hashlib.sha256(body).digest()
        path, ours = fast.request(key, len(body), sha, metadata, amz_date=instant.strftime("%Y%m%dT%H%M%SZ"))
        theirs = botocore_signed(fast, key, body, sha, metadata, instant)
        assert list(ours.items()) == theirs, (key, metadata, instant)
        assert fast.url(key).endswith(path) and f"{fast._base[:-len(fast._path)]}{path}" == fast.url(key)
    signed = dict(theirs)
    assert ("X-Amz-Security-Token" in signed) == bool(credentials[2])
    # botocore signs the payload (the body's SHA-256: here, the caller's) unless the client's settings say no
    assert (signed["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD") == (payload_signing is False)


def test_the_signing_key_follows_refreshed_credentials_and_the_day():
    fast = fast_put("http://127.0.0.1:8333", None, CREDENTIALS[0], False, region="us-east-1")
    body = b"x" * 10
    sha = hashlib.sha256(body).digest()
    for access, secret, token in [CREDENTIALS[0], CREDENTIALS[1], ("AKIDNEW", "rotated", None), CREDENTIALS[0]]:
        fast._client._get_credentials = lambda: Credentials(access, secret, token)  # as a refresh swaps them
        for instant in INSTANTS:
            _, ours = fast.request("k", len(body), sha, {"sha256": sha.hex()}, amz_date=instant.strftime("%Y%m%dT%H%M%SZ"))
            assert list(ours.items()) == botocore_signed(fast, "k", body, sha, {"sha256": sha.hex()}, instant)


def test_without_a_date_the_signer_signs_now():
    signer = SigV4Signer("us-east-1", "s3")
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = signer.sign("PUT", "/b/k", {"Host": "h"}, "UNSIGNED-PAYLOAD", Credentials("a", "s"))
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    assert before <= headers["X-Amz-Date"] <= after
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential=a/{headers['X-Amz-Date'][:8]}/us-east-1/s3/")
