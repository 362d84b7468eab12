"""The S3 client the copies use: dagster-aws's S3Resource settings, with botocore tuned for many small PUTs.
Pure core: it reads the resource's fields (`S3ClientConfig`), so it needs no Dagster import.

Measured on 3,000 x 8 KB files into a local S3-API server (8 uploads in flight): botocore's defaults
cost ~2.4 ms of client CPU per PutObject; a third of that was rebuilding the User-Agent string twice
per request (character by character) and validating parameters we build ourselves. And botocore
sends every PutObject with `Expect: 100-continue`, a round trip (and a server write) per file that
only pays off when a large body would be refused. With the changes below: ~1.6 ms client CPU
per file, 10-20% less server CPU per file, 10-30% more files per second. Over plain http (a local
S3-API server) botocore also hashed each body for the signature, one more SHA-256 pass over every
file, where the body's ChecksumSHA256 header (signed, and checked by S3) already guards it.

Even so, a small PutObject cost ~0.9 ms of client CPU in botocore, against rclone's ~0.45 ms per file.
FastPut (below) sends the single PUTs of files read into memory at ~0.1 ms (~0.2 ms while it signed
them with botocore's S3SigV4Auth; SigV4Signer signs the same headers byte for byte); anything but a
plain success goes again through the client (bench/s3_put_cpu.py).
"""

import base64
import hashlib
import hmac
import http.client
import io
import queue
import socket
import ssl
import threading
import time
import weakref
from functools import partial
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import boto3
import botocore
import botocore.session
from botocore import UNSIGNED
from botocore.auth import SIGNED_HEADERS_BLACKLIST, UNSIGNED_PAYLOAD
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import BotoCoreError
from botocore.httpsession import get_cert_path
from botocore.utils import parse_timestamp

# A fixed User-Agent (botocore's legacy form): built once, not per request.
USER_AGENT = f"Boto3/{boto3.__version__} Botocore/{botocore.__version__} migration-assets-files"


def _no_expect_on_puts_from_memory(model: Any, params: dict, **_: Any) -> None:
    """A PUT of bytes read into memory (at most mover.IN_MEMORY_MAX): sending the body at once costs less
    than a 100-continue round trip per file. Bodies streamed from disk and multipart parts keep it.
    (botocore has wrapped bytes in a BytesIO by now.)"""
    if model.name == "PutObject" and isinstance(params.get("body"), io.BytesIO):
        params["headers"].pop("Expect", None)


def _timestamp(value: str) -> datetime:
    """ISO 8601 as S3 lists it ("2026-01-02T03:04:05.000Z") by the standard library; anything else
    (HTTP dates in headers) by botocore. dateutil's general parser was a third of the client CPU of
    a range's check, which lists every object."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)


class S3ClientConfig(Protocol):
    """Where and how to connect: the fields of dagster-aws's S3Resource (files/resources.py), which
    is what the assets pass."""

    region_name: str | None
    endpoint_url: str | None
    use_ssl: bool
    verify: bool | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    profile_name: str | None
    use_unsigned_session: bool
    max_attempts: int


_sessions: dict[str | None, boto3.session.Session] = {}
_sessions_lock = threading.Lock()  # a session is not thread-safe; the clients it makes are


def _session(profile: str | None) -> boto3.session.Session:
    """One session per profile and process: it loads the S3 model once (~0.1 s), not per run."""
    if profile not in _sessions:
        core = botocore.session.Session(profile=profile)
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
        _sessions[profile] = boto3.session.Session(botocore_session=core)
    return _sessions[profile]


def copy_client(resource: S3ClientConfig, concurrency: int) -> Any:
    """An S3 client from the resource's settings (endpoint, region, credentials, profile, retries),
    one shared by all upload threads, with a connection pool as large as the uploads in flight."""
    config = Config(
        retries={"max_attempts": resource.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, concurrency),
        parameter_validation=False,  # mover.py builds every request itself
        # Every body goes with its ChecksumSHA256 in a signed header, which S3 verifies: no second
        # SHA-256 of the body for the signature over http (botocore's default over https already).
        s3={"payload_signing_enabled": False},
        user_agent=USER_AGENT,
    )
    with _sessions_lock:
        client = _session(resource.profile_name).client(
            "s3", region_name=resource.region_name, endpoint_url=resource.endpoint_url, use_ssl=resource.use_ssl,
            verify=resource.verify, aws_access_key_id=resource.aws_access_key_id,
            aws_secret_access_key=resource.aws_secret_access_key, aws_session_token=resource.aws_session_token,
            config=config,
        )
    if resource.use_unsigned_session:
        client.meta.events.register("choose-signer.s3.*", lambda **_: UNSIGNED)
    client.meta.events.register_last("before-call.s3", _no_expect_on_puts_from_memory)
    return client


_PROBE_KEY = "migration-assets-fast-put-probe"


class _NoBody:
    def stream(self, **_: Any) -> Any:
        return iter(())


class FastPut:
    """PutObject of a body held in memory at a ninth of botocore's client CPU (bench/s3_put_cpu.py, 8 KB:
    ~0.1 against ~0.9 ms per PUT): signed by SigV4Signer (the headers botocore's S3SigV4Auth would
    send, at half of FastPut's CPU per PUT when it signed with it) and sent in one write on a
    kept-alive http.client connection, without botocore's per-request machinery (events, serializer,
    endpoint rules, parser, retry handler: ~0.4 ms) or urllib3's pool (~0.2 ms).

    What to send where comes from the client itself: at construction it builds one PutObject of a
    probe key and the request is taken before it is sent (nothing goes over the network); its URL
    (endpoint, addressing style) and its signature's scope (region, service) are the fast PUTs'. The
    credentials are the client's, refreshed as botocore refreshes them, never copied elsewhere; TLS
    verification and the timeout are the client's too (`verify`, AWS_CA_BUNDLE, read_timeout).

    Only a plain success is handled here: `put` answers None for anything else (a connection error,
    a 5xx, a BadDigest, any non-200) and the caller sends the file again through the client, whose
    retry policy, error parsing and ClientError apply as they always did. `available` is False, and
    every PUT goes through the client, when it does not sign with SigV4 (an unsigned session, no
    credentials, another signer), or sends through a proxy or with a client certificate."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # kept-alive connections, one per upload in flight
        weakref.finalize(self, _close_all, self._idle)  # closed with the FastPut (a run's S3Target)
        url, scope = _probe_put(client, bucket)
        session = client._endpoint.http_session  # the client's own: its proxies and TLS settings
        self.available = (url is not None and scope is not None and session._proxy_config.proxy_url_for(url) is None
                          and not client.meta.config.client_cert)
        self._region, self._service = scope or ("", "")
        self._signer = SigV4Signer(self._region, self._service)
        # As botocore's S3SigV4Auth decides for these requests (no checksum context, no Content-MD5): the
        # payload is signed unless the client's s3.payload_signing_enabled says no, over http and https
        s3_config = getattr(client.meta.config, "s3", None) or {}
        explicit = s3_config.get("payload_signing_enabled")
        self._sign_payload = True if explicit is None else bool(explicit)
        self._base = self._path = ""
        if self.available:
            parts = urlsplit(url)
            self._path = parts.path[: -len(_PROBE_KEY)]  # "/bucket/" (path style) or "/" (virtual host)
            self._base = f"{parts.scheme}://{parts.netloc}{self._path}"
            default_port = {"http": 80, "https": 443}[parts.scheme]
            # signed and sent as given: the signer would otherwise parse the URL twice per request for it
            self._host = parts.hostname if parts.port in (None, default_port) else f"{parts.hostname}:{parts.port}"
            timeout = client.meta.config.read_timeout
            self._connect = (partial(_HTTPConnection, parts.netloc, timeout=timeout) if parts.scheme == "http"
                             else partial(_HTTPSConnection, parts.netloc, timeout=timeout,
                                          context=_ssl_context(session._verify)))

    def url(self, key: str) -> str:
        return self._base + quote(key, safe="/~")  # as botocore encodes a {Key+} label (put sends the same)

    def put(self, key: str, body: bytes, sha: bytes, metadata: dict[str, str]) -> dict | None:
        """PUT `body` with its SHA-256 `sha` (ChecksumSHA256, signed) and `metadata`; {"ETag", "ChecksumSHA256"}
        on success, None when the client should send it instead."""
        path, headers = self.request(key, len(body), sha, metadata)
        connection = self._take()
        try:
            # The request in one write (http.client's request() makes two: 15% of the client's CPU per
            # PUT and 7% of the server's). Every part is ours or the signer's: a percent-encoded path,
            # header values without line breaks.
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            connection.send(f"PUT {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body)  # connects
            status, response_headers = _read_response(connection)
        except (OSError, http.client.HTTPException, ValueError):  # refused, reset, timed out, closed while idle,
            connection.close()                                   # an answer we don't read: the client's turn
            return None
        self._idle.put(connection)
        if status != 200:
            if 300 <= status < 400:  # the bucket lives elsewhere: the client follows redirects
                self.available = False
            return None
        return {"ETag": response_headers.get("etag"), "ChecksumSHA256": response_headers.get("x-amz-checksum-sha256")}

    def request(self, key: str, size: int, sha: bytes, metadata: dict[str, str],
                amz_date: str | None = None) -> tuple[str, dict[str, str]]:
        """(path, signed headers in the order sent) of the PUT of `key`: `size` bytes whose SHA-256 is `sha`."""
        headers = {"Host": self._host, "User-Agent": USER_AGENT, "x-amz-checksum-sha256": base64.b64encode(sha).decode(),
                   "x-amz-sdk-checksum-algorithm": "SHA256",  # as botocore sends it (moto stores the checksum only then)
                   "Content-Length": str(size), **{f"x-amz-meta-{name}": value for name, value in metadata.items()}}
        path = self._path + quote(key, safe="/~")  # as url() and botocore
        # the body's SHA-256, which the caller has, is the payload hash when the client's settings sign payloads
        self._signer.sign("PUT", path, headers, sha.hex() if self._sign_payload else UNSIGNED_PAYLOAD,
                          self._client._get_credentials().get_frozen_credentials(), amz_date)
        return path, headers

    def _take(self) -> http.client.HTTPConnection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._connect()


_UNSIGNED_HEADERS = frozenset(SIGNED_HEADERS_BLACKLIST)  # user-agent, expect, ...: never signed


class SigV4Signer:
    """AWS Signature Version 4 of a request without a query string, as botocore's S3SigV4Auth signs it
    (headers, their order on the wire and the Authorization header byte for byte: tests/files/
    test_sigv4.py compares them), at a fifth of its CPU: no AWSRequest, no header map, no URL parsing,
    and the signing key (four HMACs) derived once per secret key and day, not per request. S3 does not
    normalise paths, so the canonical path is the percent-encoded path as sent."""

    def __init__(self, region: str, service: str) -> None:
        self._region, self._service = region, service
        self._key: tuple[str, str, bytes] = ("", "", b"")  # (secret key, yyyymmdd, signing key), swapped whole

    def sign(self, method: str, path: str, headers: dict[str, str], payload_hash: str, credentials: Any,
             amz_date: str | None = None) -> dict[str, str]:
        """Add X-Amz-Date, X-Amz-Security-Token (with a session token), X-Amz-Content-SHA256 (`payload_hash`:
        the body's hex SHA-256, or UNSIGNED-PAYLOAD) and Authorization to `headers`, which must hold
        Host; `amz_date` ("20260102T030405Z") defaults to now. Returns `headers`."""
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers["X-Amz-Date"] = amz_date
        if credentials.token:
            headers["X-Amz-Security-Token"] = credentials.token
        headers["X-Amz-Content-SHA256"] = payload_hash
        canonical: dict[str, str] = {}
        for name, value in headers.items():
            lower = name.lower()
            if lower in _UNSIGNED_HEADERS:
                continue
            value = " ".join(value.split())  # trimmed, inner runs of white space as one space
            canonical[lower] = f"{canonical[lower]},{value}" if lower in canonical else value
        names = sorted(canonical)
        signed = ";".join(names)
        lines = "".join([f"{name}:{canonical[name]}\n" for name in names])
        request = f"{method}\n{path}\n\n{lines}\n{signed}\n{payload_hash}"
        day = amz_date[:8]
        scope = f"{day}/{self._region}/{self._service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(credentials.secret_key, day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached_secret, cached_day, key = self._key
        if cached_secret != secret or cached_day != day:  # a new day, or refreshed credentials
            key = f"AWS4{secret}".encode()
            for part in (day, self._region, self._service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = (secret, day, key)
        return key


_MAX_HEADER_LINE = 8192
_MAX_HEADERS = 100
_MAX_BODY = 1 << 20  # a PUT's answer is empty, or an error document of a few hundred bytes


def _read_response(connection: "_HTTPConnection") -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names) of the answer to the request just sent, its body read and
    dropped; the connection closed when the answer says so. http.client's HTTPResponse parses headers
    through the email package: a fifth of the client's CPU per PUT. This reads only what a PUT's answer
    holds: a Content-Length body (anything else, e.g. chunked, raises ValueError: the client's turn)."""
    reader = connection.reader()
    status_line = reader.readline(_MAX_HEADER_LINE + 1).decode("latin-1").split()
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {' '.join(status_line)[:100]!r}")  # b"": closed while idle
    version, status = status_line[:2]
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        if (line := reader.readline(_MAX_HEADER_LINE + 1)) in (b"\r\n", b"\n"):
            break
        if not line or len(line) > _MAX_HEADER_LINE:
            raise ValueError("the answer's headers are cut short or too long")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise ValueError(f"the answer has more than {_MAX_HEADERS} header lines")
    if "transfer-encoding" in headers or not headers.get("content-length", "").isdigit():
        raise ValueError("an answer without a Content-Length (chunked, or read to the connection's close)")
    length = int(headers["content-length"])
    if not 0 <= length <= _MAX_BODY or len(reader.read(length)) != length:
        raise ValueError("the answer's body is cut short or too long")
    if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
        connection.close()  # the next send connects again
    return int(status), headers


class _HTTPConnection(http.client.HTTPConnection):
    """Without Nagle's delay, as urllib3 connects: a request's bytes go out at once. Answers are read
    through one buffered reader per socket (http.client makes one per response)."""

    _reader: tuple[Any, Any] = (None, None)  # (socket, its reader)

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def reader(self) -> Any:
        if self._reader[0] is not self.sock:
            self._reader = (self.sock, self.sock.makefile("rb"))
        return self._reader[1]

    def close(self) -> None:
        reader = self._reader[1]
        self._reader = (None, None)
        if reader is not None:
            reader.close()
        super().close()


class _HTTPSConnection(http.client.HTTPSConnection):
    _reader = _HTTPConnection._reader
    connect = _HTTPConnection.connect  # after the TLS handshake, on the wrapped socket
    reader, close = _HTTPConnection.reader, _HTTPConnection.close


def _close_all(idle: queue.SimpleQueue) -> None:
    while True:
        try:
            idle.get_nowait().close()
        except queue.Empty:
            return


def _ssl_context(verify: bool | str | None) -> ssl.SSLContext:
    """TLS as the client verifies: not at all (verify=False), against a CA bundle (a path, e.g.
    AWS_CA_BUNDLE), or against botocore's default bundle."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=get_cert_path(True if verify is None else verify))


def _probe_put(client: Any, bucket: str) -> tuple[str | None, tuple[str, str] | None]:
    """(URL, (signing region, service)) of a PutObject of the probe key as the client builds and signs
    it, taken at before-send and answered locally (botocore sends nothing when a handler answers);
    (None, None) when the client cannot build it or does not sign it with SigV4."""
    seen: dict[str, Any] = {}

    def capture(request: Any, **_: Any) -> AWSResponse:
        seen.update(url=request.url, authorization=request.headers.get("Authorization"))
        return AWSResponse(request.url, 200, {}, _NoBody())

    event, handler_id = "before-send.s3.PutObject", f"fast-put-probe-{id(seen)}"
    client.meta.events.register_first(event, capture, unique_id=handler_id)
    try:
        client.put_object(Bucket=bucket, Key=_PROBE_KEY, Body=b"")
    except BotoCoreError:  # e.g. no credentials: every PUT goes through the client, which says so per file
        return None, None
    finally:
        client.meta.events.unregister(event, unique_id=handler_id)
    url = urlsplit(seen.get("url", ""))
    authorization = seen.get("authorization") or b""
    authorization = authorization.decode() if isinstance(authorization, bytes) else authorization
    if url.query or not url.path.endswith("/" + _PROBE_KEY) or not authorization.startswith("AWS4-HMAC-SHA256 "):
        return None, None
    # Credential=<access key>/<date>/<region>/<service>/aws4_request
    scope = authorization.split("Credential=", 1)[1].split(",", 1)[0].split("/")
    return f"{url.scheme}://{url.netloc}{url.path}", (scope[-3], scope[-2])
