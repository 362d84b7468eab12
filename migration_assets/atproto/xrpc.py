"""XRPC client on httpx: typed errors, sessions, a private-host guard, 429 handling and retries.

Every request takes a token from the shared HostRateLimiter first and feeds the response headers back to
it. A 429 is waited out (RateLimit-Reset is a unix time, Retry-After seconds) while the total wait stays
within `max_rate_limit_wait`, else RateLimited(retry_at) is raised for the caller to reschedule; 429s
never use up retry attempts; every pause a host asks for is bounded (ATPROTO_MAX_PAUSE_SECONDS).
Transport errors and 500/502/503/504 are retried with backoff, then raise TransportFailure.
Each attempt keeps to a whole-request deadline (atproto.deadline: headers and body, however a host
drips them; ATPROTO_REQUEST_DEADLINE_SECONDS unless the caller gives its own), and a JSON reply is read
up to MAX_JSON_BYTES, no further.

Private-host guard: the connection layer (a httpcore network backend) resolves each hop's name once,
refuses any non-public answer, and connects to exactly the checked address (TLS still verifies the name),
so a DNS answer that changes between check and connect (rebinding) cannot reach an internal address.
Passwords and tokens live only in memory: never in exceptions, logs or reprs; a login is never sent
over plain http (unless private hosts are allowed) nor redirected to another origin.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import httpcore
import httpx

from migration_assets.atproto.deadline import Deadline, DeadlineBackend, Resolver, current, within
from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.ratelimit import LimiterWaitExceeded, pause_end
from migration_assets.atproto.settings import AtprotoSettings
from migration_assets.core.backoff import Backoff

if TYPE_CHECKING:
    from migration_assets.atproto.ratelimit import HostRateLimiter

log = logging.getLogger(__name__)

ALLOW_PRIVATE_ENV = AtprotoSettings.env_name("allow_private_hosts")
_RETRY_STATUSES = {500, 502, 503, 504}
CREATE_SESSION = "com.atproto.server.createSession"
_ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error body we read (a stream's body may be huge)
# A JSON reply larger than this is refused unread: a listing page of 1,000 items is ~200 KB, and a host
# sending gigabytes (or a gzip bomb, counted as decoded) would otherwise be held whole in memory.
MAX_JSON_BYTES = 16 * 1024 * 1024


# --- errors -----------------------------------------------------------------------------------------


class XrpcError(AtprotoError):
    """An XRPC call failed; `error` is the server's error name (e.g. "RepoNotFound") when it sent one."""

    def __init__(self, message: str = "", *, host: str = "", nsid: str = "", status: int | None = None,
                 error: str | None = None) -> None:
        self.host, self.nsid, self.status, self.error, self.message = host, nsid, status, error, message
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.nsid} on {self.host}" if self.nsid else self.host
        parts = [f"HTTP {self.status}" if self.status is not None else "", self.error or ""]
        head = " ".join(p for p in parts if p)
        return f"{where}: {head}: {self.message}" if head else f"{where}: {self.message}"

    def _kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "nsid": self.nsid, "status": self.status, "error": self.error}

    def __reduce__(self):  # keyword-only constructor: pickle through a helper
        return (_rebuild_error, (type(self), self.message, self._kwargs()))


def _rebuild_error(cls: type[XrpcError], message: str, kwargs: dict[str, Any]) -> XrpcError:
    return cls(message, **kwargs)


class RepoNotFound(XrpcError):
    pass


class RepoDeactivated(XrpcError):
    pass


class RepoTakendown(XrpcError):
    pass


class RepoSuspended(XrpcError):
    pass


class BlobNotFound(XrpcError):
    pass


class AuthRequired(XrpcError):
    pass


class RateLimited(XrpcError):
    """The host is rate limited until `retry_at` (unix time), longer than the client would wait. Not a
    failure of the work: reschedule it for after `retry_at`."""

    def __init__(self, message: str = "", *, retry_at: float = 0.0, **kwargs: Any) -> None:
        self.retry_at = retry_at
        super().__init__(message, **kwargs)

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), "retry_at": self.retry_at}


class TransportFailure(XrpcError):
    """Connect/read errors, timeouts, or 5xx replies that outlasted the retries."""


class PrivateHostRefused(XrpcError):
    """The address resolves to a private, loopback, link-local or reserved IP (SSRF guard)."""


class UnsafeLogin(XrpcError):
    """A login that would expose the password: over plain http://, or redirected to another origin."""


_ERROR_CLASSES: dict[str, type[XrpcError]] = {
    "RepoNotFound": RepoNotFound,
    "RepoDeactivated": RepoDeactivated,
    "RepoTakendown": RepoTakendown,
    "RepoSuspended": RepoSuspended,
    "BlobNotFound": BlobNotFound,
    "AuthRequired": AuthRequired,
    "AuthenticationRequired": AuthRequired,
    "AuthMissing": AuthRequired,
    "InvalidToken": AuthRequired,
    "ExpiredToken": AuthRequired,
    "AccountTakedown": RepoTakendown,
    "AccountDeactivated": RepoDeactivated,
    "RateLimitExceeded": RateLimited,
}


def error_class(status: int, error: str | None, message: str) -> type[XrpcError]:
    """The typed error for a reply: by error name, then by the reference PDS's wording and the status."""
    if error in _ERROR_CLASSES:
        return _ERROR_CLASSES[error]
    if "blob not found" in message.lower():
        return BlobNotFound
    if status == 401:
        return AuthRequired
    if status == 429:
        return RateLimited
    if status in _RETRY_STATUSES:
        return TransportFailure
    return XrpcError


# --- private-host guard -----------------------------------------------------------------------------


def is_forbidden_address(address: str) -> bool:
    """True for anything but a public unicast address (private, loopback, link-local, reserved, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
            or ip.is_multicast or ip.is_unspecified)


class PinnedBackend(DeadlineBackend):
    """Connects only to addresses that passed the guard: one resolution per connection, checked, then
    used. TLS is started by httpcore with the URL's name (SNI and certificate check), the Host header is
    the URL's; only the TCP destination is pinned."""

    def __init__(self, allow_private: bool, resolve: Resolver | None = None) -> None:
        super().__init__(resolve)
        self.allow_private = allow_private

    def allowed(self, host: str, port: int, addresses: list[str]) -> list[str]:
        """`addresses`; PrivateHostRefused if any of them is not public (unless private hosts are allowed)."""
        forbidden = [] if self.allow_private else sorted({a for a in addresses if is_forbidden_address(a)})
        if forbidden or not addresses:
            raise PrivateHostRefused(
                f"{host} resolves to non-public address {', '.join(forbidden) or '(none)'}; "
                f"set {ALLOW_PRIVATE_ENV}=true only for trusted local networks",
                host=f"{host}:{port}",
            )
        return addresses


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The one TLS context (certifi's CAs, verifying) of every HTTP client: building one loads the CA
    bundle, ~20 ms of CPU, and a run makes a client per host, of which the network has thousands.
    An SSLContext may serve any number of connections and threads."""
    return httpx.create_ssl_context()


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport on one of our network backends (DeadlineBackend, or PinnedBackend for hosts
    from the network), with the shared TLS context."""

    def __init__(self, backend: DeadlineBackend) -> None:
        super().__init__(verify=shared_ssl_context(), trust_env=False)
        # httpx has no public hook for the network backend: the pool is rebuilt around ours.
        self._pool = httpcore.ConnectionPool(ssl_context=shared_ssl_context(), network_backend=backend,
                                             max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


def host_key(url: httpx.URL | str) -> str:
    """"host:port" of a URL: the rate limiter's key."""
    url = httpx.URL(url)
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{port}"


def guarded_http_client(*, timeout: float, allow_private: bool, user_agent: str, max_redirects: int = 5,
                        resolve: Resolver | None = None) -> httpx.Client:
    """An httpx client that follows redirects; every connection, on every hop, goes to an address that
    passed the private-host guard (PinnedBackend)."""

    def http_only(request: httpx.Request) -> None:
        if request.url.scheme not in ("http", "https"):
            raise PrivateHostRefused(f"refusing {request.url.scheme}: URL", host=request.url.host)

    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=True,
        max_redirects=max_redirects,
        headers={"User-Agent": user_agent},
        event_hooks={"request": [http_only]},
        transport=DeadlineTransport(PinnedBackend(allow_private, resolve)),
        trust_env=False,  # no proxy from the environment: the guard must see the real destination
    )


# --- the client -------------------------------------------------------------------------------------


class _Session:
    """Tokens and the password for re-login. repr shows none of them."""

    def __init__(self, identifier: str, password: str) -> None:
        self.identifier = identifier
        self.password = password
        self.access_jwt: str | None = None
        self.refresh_jwt: str | None = None
        self.did: str | None = None
        self.handle: str | None = None

    def __repr__(self) -> str:
        return f"_Session(did={self.did!r})"


Body = dict | bytes | Iterable[bytes] | BinaryIO | None


class XrpcClient:
    """One PDS (or relay). Thread-safe: share one per host between worker threads."""

    def __init__(self, base_url: str, *, limiter: HostRateLimiter | None = None, timeout: float = 30.0,
                 max_rate_limit_wait: float = 300.0, allow_private_hosts: bool | None = None,
                 user_agent: str = "migration-assets", retries: int = 3, backoff: float = 0.5,
                 settings: AtprotoSettings | None = None, resolve: Resolver | None = None,
                 deadline_seconds: float | None = None) -> None:
        url = httpx.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"XRPC base URL must be http(s)://host[:port], got {base_url!r}")
        self.base_url = str(url)
        self.host = host_key(url)
        self.limiter = limiter
        self.settings = settings or AtprotoSettings.load()
        self.max_rate_limit_wait = max_rate_limit_wait
        self.deadline_seconds = deadline_seconds or self.settings.request_deadline_seconds
        self.retries = retries
        self.backoff = Backoff(base=backoff, cap=max(30.0, backoff), floor=0.5)
        self.allow_private = (self.settings.allow_private_hosts if allow_private_hosts is None
                              else allow_private_hosts)
        self._http = guarded_http_client(timeout=timeout, allow_private=self.allow_private, user_agent=user_agent,
                                         resolve=resolve)
        self._session: _Session | None = None
        self._session_lock = threading.Lock()

    def __repr__(self) -> str:
        who = self._session.did if self._session else None
        return f"XrpcClient({self.base_url!r}, session_did={who!r})"

    def __enter__(self) -> XrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def session_did(self) -> str | None:
        """The DID of the logged-in account, or None."""
        return self._session.did if self._session else None

    # --- public calls ---

    def deadline(self, nsid: str, what: str = "", seconds: float | None = None,
                 min_bytes_per_second: float | None = None, max_bytes: int | None = None) -> Deadline:
        """A deadline for one call's attempts (each starts it again): this client's unless `seconds`."""
        return Deadline(seconds or self.deadline_seconds, what or f"{nsid} on {self.host}", min_bytes_per_second,
                        max_bytes)

    def query(self, nsid: str, params: dict | None = None, *, auth: bool = False,
              deadline: Deadline | None = None) -> dict:
        """GET /xrpc/{nsid}; the JSON reply."""
        with within(deadline or self.deadline(nsid)):
            return self._json(nsid, *self._call("GET", nsid, params=params, auth=auth))

    def procedure(self, nsid: str, body: Body = None, *, params: dict | None = None,
                  content_type: str | None = None, headers: dict | None = None, auth: bool = False,
                  deadline: Deadline | None = None) -> dict:
        """POST /xrpc/{nsid} with a JSON (dict) or raw body; the JSON reply ({} when there is none).
        A one-shot body (iterator, unseekable file) is sent once: it is not retried."""
        extra = dict(headers or {})
        if content_type:
            extra["Content-Type"] = content_type
        elif body is not None and not isinstance(body, dict) and "content-type" not in {k.lower() for k in extra}:
            extra["Content-Type"] = "application/octet-stream"
        with within(deadline or self.deadline(nsid)):
            return self._json(nsid, *self._call("POST", nsid, params=params, body=body, headers=extra, auth=auth))

    @contextmanager
    def stream(self, nsid: str, params: dict | None = None, *, auth: bool = False,
               deadline: Deadline | None = None) -> Iterator[httpx.Response]:
        """GET with a streamed body (getRepo CAR, getBlob), read inside the block under `deadline` (this
        client's by default). Read errors while streaming, the deadline's too, raise TransportFailure."""
        with within(deadline or self.deadline(nsid)):
            response, _ = self._call("GET", nsid, params=params, auth=auth, read=False)
            try:
                yield response
            except httpx.TransportError as exc:
                raise self._transport_failure(nsid, exc) from None
            except httpx.DecodingError as exc:
                raise self._undecodable(nsid, response, exc) from None
            finally:
                response.close()

    def login(self, identifier: str, password: str) -> None:
        """createSession; later `auth=True` calls carry the access token. Refused over plain http://
        unless private hosts are allowed (the password would cross the network in the clear)."""
        if httpx.URL(self.base_url).scheme != "https" and not self.allow_private:
            raise UnsafeLogin(f"refusing to send a password to {self.base_url} over plain http; use https "
                              f"(or set {ALLOW_PRIVATE_ENV}=true for a local network)", host=self.host,
                              nsid=CREATE_SESSION)
        session = _Session(identifier, password)
        with within(self.deadline(CREATE_SESSION)):
            self._create_session(session)
        self._session = session

    def refresh_session(self) -> None:
        """refreshSession now (normally automatic on ExpiredToken); logs in again if the refresh fails."""
        if self._session is None:
            raise AuthRequired("call login() before refresh_session()", host=self.host)
        with within(self.deadline("com.atproto.server.refreshSession")):
            self._renew_session(self._session.access_jwt)

    # --- sessions ---

    def _create_session(self, session: _Session) -> None:
        body = {"identifier": session.identifier, "password": session.password}
        reply = self._json(CREATE_SESSION, *self._call("POST", CREATE_SESSION, body=body, headers={}, auth=False))
        self._store_tokens(session, reply, CREATE_SESSION)

    def _store_tokens(self, session: _Session, reply: dict, nsid: str) -> None:
        access, refresh = reply.get("accessJwt"), reply.get("refreshJwt")
        if not isinstance(access, str) or not isinstance(refresh, str):
            raise XrpcError("reply has no accessJwt/refreshJwt", host=self.host, nsid=nsid)
        session.access_jwt, session.refresh_jwt = access, refresh
        session.did = reply.get("did", session.did)
        session.handle = reply.get("handle", session.handle)

    def _renew_session(self, stale_access: str | None) -> None:
        """After ExpiredToken: refreshSession once; if that fails, log in again with the password."""
        with self._session_lock:
            session = self._session
            if session is None or session.access_jwt != stale_access:
                return  # another thread renewed it already
            try:
                reply = self._json(
                    "com.atproto.server.refreshSession",
                    *self._call("POST", "com.atproto.server.refreshSession", headers={}, bearer=session.refresh_jwt),
                )
                self._store_tokens(session, reply, "com.atproto.server.refreshSession")
            except (RateLimited, TransportFailure, PrivateHostRefused):
                raise  # the host is unreachable or busy: logging in again would not help
            except XrpcError as exc:
                log.info("refreshSession on %s failed (%s); logging in again", self.host, exc.error or exc.status)
                self._create_session(session)

    def _auth_header(self, nsid: str) -> str:
        session = self._session
        if session is None or session.access_jwt is None:
            raise AuthRequired("call login() before authenticated calls", host=self.host, nsid=nsid)
        return session.access_jwt

    # --- the request loop ---

    def _call(self, method: str, nsid: str, *, params: dict | None = None, body: Body = None,
              headers: dict | None = None, auth: bool = False, bearer: str | None = None,
              read: bool = True) -> tuple[httpx.Response, bytes]:
        """Send with auth renewal on ExpiredToken (once); return a 2xx response and its body (`read`: up to
        MAX_JSON_BYTES, read within the attempt, so a reply cut short is tried again), or the response
        with its body unread and b"" (a stream, read inside the caller's `within(deadline)` block); or
        raise a typed error."""
        token = bearer if bearer is not None else (self._auth_header(nsid) if auth else None)
        try:
            return self._send(method, nsid, params, body, headers or {}, token, read)
        except AuthRequired as exc:
            if not auth or exc.error != "ExpiredToken":
                raise
        self._renew_session(token)
        return self._send(method, nsid, params, _rewound(body), headers or {}, self._auth_header(nsid), read)

    def _send(self, method: str, nsid: str, params: dict | None, body: Body, headers: dict,
              token: str | None, read: bool) -> tuple[httpx.Response, bytes]:
        """One logical call: rate-limit waits (uncounted), then up to 1 + retries attempts, each with the
        whole deadline."""
        replayable = _replayable(body)
        attempt = 0
        rate_waited = 0.0
        while True:
            self._acquire(nsid, rate_waited)
            if (deadline := current()) is not None:
                deadline.restart()
            try:
                response = self._send_once(self._build(method, nsid, params, body, headers, token),
                                           same_origin_only=nsid == CREATE_SESSION)
                answer = self._answer(nsid, response) if read and response.is_success else b""
            except httpx.TooManyRedirects:
                raise XrpcError("too many redirects", host=self.host, nsid=nsid) from None
            except httpx.TransportError as exc:
                if attempt >= self.retries or not replayable:
                    raise self._transport_failure(nsid, exc) from None
                attempt += 1
                self._sleep_backoff(attempt, nsid, type(exc).__name__)
                body = _rewound(body)
                continue
            if self.limiter is not None:
                self.limiter.observe(self.host, response.headers)
            if response.is_success:
                return response, answer
            if response.status_code == 429:
                rate_waited += self._wait_out_429(nsid, response, rate_waited)
                body = _rewound(body)
                continue
            if response.status_code in _RETRY_STATUSES and attempt < self.retries and replayable:
                response.close()
                attempt += 1
                self._sleep_backoff(attempt, nsid, f"HTTP {response.status_code}")
                body = _rewound(body)
                continue
            raise self._error_for(nsid, response)

    def _send_once(self, request: httpx.Request, same_origin_only: bool) -> httpx.Response:
        """Send, following redirects; a request carrying a password (`same_origin_only`) follows only
        redirects within its origin, whatever the status (a 307/308 would re-send the body)."""

        def same_origin(target: httpx.URL) -> None:
            if _origin(target) != _origin(request.url):
                raise UnsafeLogin(f"{request.url.host} redirected the login to another origin "
                                  f"({target.scheme}://{target.netloc.decode()}); the password is not sent there",
                                  host=self.host, nsid=CREATE_SESSION)

        return send_following(self._http, request, same_origin if same_origin_only else None)

    def _build(self, method: str, nsid: str, params: dict | None, body: Body, headers: dict,
               token: str | None) -> httpx.Request:
        all_headers = dict(headers)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {}
        if isinstance(body, dict):
            kwargs["json"] = body
        elif isinstance(body, (bytes, bytearray)):
            kwargs["content"] = bytes(body)
        elif body is not None and hasattr(body, "read"):
            kwargs["content"] = iter(lambda: body.read(64 * 1024), b"")  # type: ignore[union-attr]
        elif body is not None:
            kwargs["content"] = body
        return self._http.build_request(
            method, f"{self.base_url}/xrpc/{nsid}", params=_clean_params(params), headers=all_headers, **kwargs
        )

    def _acquire(self, nsid: str, rate_waited: float) -> None:
        if self.limiter is None:
            return
        try:
            self.limiter.acquire(self.host, max_wait=max(self.max_rate_limit_wait - rate_waited, 0.0))
        except LimiterWaitExceeded as exc:
            raise RateLimited(
                "host paused or out of budget longer than max_rate_limit_wait",
                host=self.host, nsid=nsid, status=None, error="RateLimitExceeded", retry_at=exc.retry_at,
            ) from None

    def _wait_out_429(self, nsid: str, response: httpx.Response, rate_waited: float) -> float:
        """Sleep until the 429 lifts and return the seconds slept, or raise RateLimited if that is too long."""
        error = self._error_for(nsid, response)
        now = time.time()
        retry_at = pause_end(response.headers, now, self.settings)
        if self.limiter is not None:
            self.limiter.pause_until(self.host, retry_at)
        wait = max(retry_at - now, 0.0)
        if rate_waited + wait > self.max_rate_limit_wait:
            raise RateLimited(error.message, host=self.host, nsid=nsid, status=429,
                              error=error.error or "RateLimitExceeded", retry_at=retry_at)
        log.info("%s on %s: HTTP 429, waiting %.1f s", nsid, self.host, wait)
        time.sleep(wait)
        return wait

    def _sleep_backoff(self, attempt: int, nsid: str, reason: str) -> None:
        log.info("%s on %s: %s, retry %d/%d", nsid, self.host, reason, attempt, self.retries)
        self.backoff.sleep(attempt)

    # --- replies ---

    def _error_for(self, nsid: str, response: httpx.Response) -> XrpcError:
        """The typed error of a non-2xx reply (reads at most _ERROR_BODY_LIMIT bytes and closes it)."""
        raw = _read_limited(response, _ERROR_BODY_LIMIT)
        error, message = _parse_error_body(raw)
        cls = error_class(response.status_code, error, message)
        kwargs: dict[str, Any] = {"host": self.host, "nsid": nsid, "status": response.status_code, "error": error}
        if cls is RateLimited:
            kwargs["retry_at"] = pause_end(response.headers, time.time(), self.settings)
        return cls(message, **kwargs)

    def _answer(self, nsid: str, response: httpx.Response) -> bytes:
        """The body of a 2xx reply, up to MAX_JSON_BYTES; a transport error reading it is the attempt's."""
        try:
            return read_at_most(response, MAX_JSON_BYTES)
        except ReplyTooLarge:
            raise XrpcError(f"reply is larger than {MAX_JSON_BYTES} bytes: refused unread", host=self.host,
                            nsid=nsid, status=response.status_code) from None
        except httpx.DecodingError as exc:
            raise self._undecodable(nsid, response, exc) from None
        finally:
            response.close()

    def _undecodable(self, nsid: str, response: httpx.Response, exc: httpx.DecodingError) -> XrpcError:
        encoding = response.headers.get("content-encoding", "")[:50]
        return XrpcError(f"reply body does not decode as its Content-Encoding ({encoding!r}): {exc}",
                         host=self.host, nsid=nsid, status=response.status_code)

    def _json(self, nsid: str, response: httpx.Response, raw: bytes) -> dict:
        if not raw.strip():
            return {}
        try:
            value = untrusted_json(raw)
        except ValueError:
            raise XrpcError(f"reply is not JSON ({len(raw)} bytes, {response.headers.get('content-type')})",
                            host=self.host, nsid=nsid, status=response.status_code) from None
        if not isinstance(value, dict):
            raise XrpcError("reply JSON is not an object", host=self.host, nsid=nsid, status=response.status_code)
        return value

    def _transport_failure(self, nsid: str, exc: httpx.TransportError) -> TransportFailure:
        # Built from the exception's type and text only: the request (and its headers) is not carried.
        return TransportFailure(f"{type(exc).__name__}: {exc}", host=self.host, nsid=nsid)


# --- helpers ----------------------------------------------------------------------------------------


def _clean_params(params: dict | None) -> dict | None:
    """Drop None values; booleans as the lexicons spell them."""
    if not params:
        return None
    clean: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        clean[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return clean


def _replayable(body: Body) -> bool:
    if body is None or isinstance(body, (dict, bytes, bytearray)):
        return True
    return hasattr(body, "seek") and hasattr(body, "seekable") and body.seekable()  # type: ignore[union-attr]


def _rewound(body: Body) -> Body:
    """The body ready to send again (a seekable file back at its start)."""
    if body is not None and hasattr(body, "seek") and getattr(body, "seekable", lambda: False)():
        body.seek(0)  # type: ignore[union-attr]
    return body


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def send_following(http: httpx.Client, request: httpx.Request,
                   check: Callable[[httpx.URL], None] | None = None) -> httpx.Response:
    """Send with the body unread, following redirects (when the client does) by hand: each redirect's
    answer is closed unread (httpx reads it whole, whatever its size), `check(url)` may refuse a hop,
    and the client's max_redirects holds."""
    response = http.send(request, stream=True, follow_redirects=False)
    hops = 0
    while http.follow_redirects and response.next_request is not None:
        following = response.next_request
        response.close()
        if check is not None:
            check(following.url)
        hops += 1
        if hops > http.max_redirects:
            raise httpx.TooManyRedirects("too many redirects", request=request)
        response = http.send(following, stream=True, follow_redirects=False)
    return response


class ReplyTooLarge(Exception):
    """A body past the reader's limit (read_at_most)."""


def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """A streamed reply's whole body, or ReplyTooLarge past `limit` bytes (decoded: a gzip bomb counts
    as what it inflates to). A Content-Length over the limit is refused before reading."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ReplyTooLarge
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    try:
        if response.is_stream_consumed:  # a non-streamed reply: already read
            return response.content[:limit]
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(chunks)[:limit]
    except httpx.HTTPError:
        return b""
    finally:
        response.close()


def untrusted_json(raw: bytes | str) -> Any:
    """json.loads for what a host sent: ValueError also for nesting too deep to decode, which raises
    RecursionError (an error of a different kind, that callers handling one bad answer don't expect)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode") from None


def _parse_error_body(raw: bytes) -> tuple[str | None, str]:
    """(error name, message) of an XRPC error body; a non-JSON body becomes the message, shortened."""
    try:
        value = untrusted_json(raw)
    except ValueError:
        value = None
    if isinstance(value, dict):
        error = value.get("error") if isinstance(value.get("error"), str) else None
        message = value.get("message") if isinstance(value.get("message"), str) else ""
        return error, message[:500]
    return None, raw[:200].decode("utf-8", "replace").strip()

