"""XrpcClient against real HTTP servers on loopback: typed errors, sessions, 429s, retries, redirects, guard."""

import gzip
import io
import json
import logging
import pickle
import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from migration_assets.atproto import xrpc
from migration_assets.atproto.deadline import Deadline, resolve_host
from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.atproto.settings import AtprotoSettings
from migration_assets.atproto.xrpc import (
    AuthRequired,
    BlobNotFound,
    PrivateHostRefused,
    RateLimited,
    RepoDeactivated,
    RepoNotFound,
    RepoSuspended,
    RepoTakendown,
    TransportFailure,
    UnsafeLogin,
    XrpcClient,
    XrpcError,
    is_forbidden_address,
)
from tests.atproto.loopback import LoopbackServer, Reply, json_reply, xrpc_error
from tests.ending import ends_within

LIST_REPOS = "com.atproto.sync.listRepos"
PATH = f"/xrpc/{LIST_REPOS}"
OK = json_reply({"repos": []})
PASSWORD = "hunter2-secret-pw"


@pytest.fixture
def server(servers) -> LoopbackServer:
    return servers()


def client_for(server: LoopbackServer, **kwargs) -> XrpcClient:
    kwargs.setdefault("allow_private_hosts", True)
    kwargs.setdefault("backoff", 0.01)
    return XrpcClient(server.url, **kwargs)


# --- replies and typed errors ---


def test_query_sends_params_and_returns_json(server):
    server.route("GET", PATH, json_reply({"repos": [{"did": "did:plc:a"}], "cursor": "c1"}))
    with client_for(server) as client:
        reply = client.query(LIST_REPOS, {"limit": 2, "cursor": None, "flag": True})
    assert reply == {"repos": [{"did": "did:plc:a"}], "cursor": "c1"}
    assert server.calls(PATH)[0].query == {"limit": ["2"], "flag": ["true"]}
    assert client.host == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize(
    ("reply", "expected", "error"),
    [
        (xrpc_error(400, "RepoNotFound", "Could not find repo for DID: did:plc:x"), RepoNotFound, "RepoNotFound"),
        (xrpc_error(400, "RepoDeactivated", "Repo has been deactivated"), RepoDeactivated, "RepoDeactivated"),
        (xrpc_error(400, "RepoTakendown", "Repo has been takendown"), RepoTakendown, "RepoTakendown"),
        (xrpc_error(400, "RepoSuspended", "Repo has been suspended"), RepoSuspended, "RepoSuspended"),
        (xrpc_error(400, "InvalidRequest", "Blob not found"), BlobNotFound, "InvalidRequest"),
        (xrpc_error(404, "BlobNotFound", "no such blob"), BlobNotFound, "BlobNotFound"),
        (xrpc_error(401, "AuthMissing", "Authentication Required"), AuthRequired, "AuthMissing"),
        (xrpc_error(400, "InvalidRequest", "bad limit"), XrpcError, "InvalidRequest"),
        (Reply(400, b"<html>oops</html>"), XrpcError, None),
    ],
)
def test_error_replies_map_to_typed_errors(server, reply, expected, error):
    server.route("GET", PATH, reply)
    with client_for(server) as client, pytest.raises(expected) as raised:
        client.query(LIST_REPOS)
    exc = raised.value
    assert type(exc) is expected
    assert (exc.status, exc.error, exc.nsid, exc.host) == (reply.status, error, LIST_REPOS, client.host)
    assert exc.message and exc.message in str(exc)
    assert len(server.calls(PATH)) == 1  # 4xx is not retried
    assert pickle.loads(pickle.dumps(exc)).error == error


def test_procedure_bodies(server):
    def echo(request):
        return json_reply({"type": request.headers.get("content-type"), "size": len(request.body),
                           "body": request.body.decode()})

    server.route("POST", "/xrpc/com.atproto.repo.uploadBlob", echo)
    nsid = "com.atproto.repo.uploadBlob"
    with client_for(server) as client:
        as_json = client.procedure(nsid, {"a": 1})
        as_bytes = client.procedure(nsid, b"abc", content_type="image/png")
        as_iter = client.procedure(nsid, iter([b"ab", b"cd"]))
        as_file = client.procedure(nsid, io.BytesIO(b"x" * 100_000), content_type="text/plain")
    assert as_json["type"] == "application/json" and as_json["body"] == '{"a":1}'
    assert (as_bytes["type"], as_bytes["body"]) == ("image/png", "abc")
    assert (as_iter["type"], as_iter["body"]) == ("application/octet-stream", "abcd")
    assert (as_file["type"], as_file["size"]) == ("text/plain", 100_000)


def test_empty_reply_is_empty_dict_and_non_json_reply_is_an_error(server):
    server.route("POST", "/xrpc/x.empty", Reply(200))
    server.route("GET", "/xrpc/x.html", Reply(200, b"<html/>", {"Content-Type": "text/html"}))
    # Nested too deep to decode: RecursionError, which no caller handling one bad answer expects
    server.route("GET", "/xrpc/x.deep", Reply(200, b"[" * 100_000, {"Content-Type": "application/json"}))
    server.route("GET", "/xrpc/x.deep_error", Reply(400, b'{"error": ' + b"[" * 100_000))
    with client_for(server) as client:
        assert client.procedure("x.empty") == {}
        with pytest.raises(XrpcError, match="not JSON"):
            client.query("x.html")
        with pytest.raises(XrpcError, match="not JSON"):
            client.query("x.deep")
        with pytest.raises(XrpcError) as raised:
            client.query("x.deep_error")
        assert raised.value.status == 400 and raised.value.message.startswith('{"error": [[[')


# --- sessions ---


def session_reply(n: int, did: str = "did:plc:abc") -> Reply:
    return json_reply({"did": did, "handle": "alice.test", "accessJwt": f"access-{n}", "refreshJwt": f"refresh-{n}"})


def protected(valid_token: str):
    def handler(request):
        if request.headers.get("authorization") != f"Bearer {valid_token}":
            return xrpc_error(400, "ExpiredToken", "Token has expired")
        return json_reply({"ok": True})

    return handler


def test_expired_token_refreshes_once_and_retries(server):
    server.route("POST", "/xrpc/com.atproto.server.createSession", session_reply(1))
    server.route("POST", "/xrpc/com.atproto.server.refreshSession", session_reply(2))
    server.route("GET", "/xrpc/x.private", protected("access-2"))
    with client_for(server) as client:
        client.login("alice.test", PASSWORD)
        assert client.query("x.private", auth=True) == {"ok": True}
        assert client.query("x.private", auth=True) == {"ok": True}  # new token kept
    login = server.calls("/xrpc/com.atproto.server.createSession")
    refresh = server.calls("/xrpc/com.atproto.server.refreshSession")
    assert len(login) == 1 and len(refresh) == 1
    assert refresh[0].headers["authorization"] == "Bearer refresh-1"
    assert client.session_did == "did:plc:abc"


def test_failed_refresh_logs_in_again_with_stored_password(server):
    server.route("POST", "/xrpc/com.atproto.server.createSession", [session_reply(1), session_reply(3)])
    server.route("POST", "/xrpc/com.atproto.server.refreshSession", xrpc_error(400, "ExpiredToken", "expired"))
    server.route("GET", "/xrpc/x.private", protected("access-3"))
    with client_for(server) as client:
        client.login("alice.test", PASSWORD)
        assert client.query("x.private", auth=True) == {"ok": True}
    logins = server.calls("/xrpc/com.atproto.server.createSession")
    assert len(logins) == 2 and PASSWORD.encode() in logins[1].body


def test_auth_without_login_and_bad_password_never_leak_secrets(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.route("POST", "/xrpc/com.atproto.server.createSession",
                 xrpc_error(401, "AuthenticationRequired", "Invalid identifier or password"))
    with client_for(server) as client:
        with pytest.raises(AuthRequired, match="login"):
            client.query("x.private", auth=True)
        with pytest.raises(AuthRequired) as raised:
            client.login("alice.test", PASSWORD)
        assert PASSWORD not in str(raised.value) and PASSWORD not in repr(raised.value)
        assert PASSWORD not in repr(client)
    assert PASSWORD not in caplog.text


def test_tokens_stay_out_of_repr_and_logs(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.route("POST", "/xrpc/com.atproto.server.createSession", session_reply(1))
    server.route("GET", "/xrpc/x.private", protected("access-1"))
    with client_for(server) as client:
        client.login("alice.test", PASSWORD)
        client.query("x.private", auth=True)
        assert "access-1" not in repr(client) and "did:plc:abc" in repr(client)
    assert "access-1" not in caplog.text and PASSWORD not in caplog.text


# --- 429s ---


def limited_until(reset: float, headers: dict[str, str]):
    """429 for every call before `reset` (unix time), then OK: a retry that comes early shows in the count."""
    def handler(_request):
        if time.time() < reset - 0.05:  # a little slack for the clocks' granularity
            return xrpc_error(429, "RateLimitExceeded", "slow down", headers)
        return OK
    return handler


def test_429_with_reset_soon_is_waited_out_without_using_retries(server):
    reset = int(time.time()) + 2
    server.route("GET", PATH, limited_until(reset, {"RateLimit-Reset": str(reset), "RateLimit-Remaining": "0"}))
    with client_for(server, retries=0) as client:
        assert client.query(LIST_REPOS) == {"repos": []}
    assert len(server.calls(PATH)) == 2, "the client retried before the reset (or never waited)"


def test_429_with_retry_after_is_waited_out(server):
    reset = time.time() + 1.5
    server.route("GET", PATH, limited_until(reset, {"Retry-After": "2"}))
    with client_for(server, retries=0) as client:
        assert client.query(LIST_REPOS) == {"repos": []}
    assert len(server.calls(PATH)) == 2


MAX_PAUSE = AtprotoSettings().max_pause_seconds
DEFAULT_PAUSE = AtprotoSettings().default_pause_seconds


@pytest.mark.parametrize(
    ("headers", "pause"),
    [
        ({"Retry-After": "1000000000000"}, MAX_PAUSE),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_PAUSE),
        ({"RateLimit-Reset": "99999999999999999999"}, MAX_PAUSE),
        ({"RateLimit-Reset": "1e300", "Retry-After": "5"}, MAX_PAUSE),
        ({"Retry-After": "inf"}, DEFAULT_PAUSE),
        ({"Retry-After": "nan"}, DEFAULT_PAUSE),
        ({"Retry-After": "-5"}, DEFAULT_PAUSE),
        ({"Retry-After": "soon, maybe"}, DEFAULT_PAUSE),
        ({"RateLimit-Reset": "-Infinity"}, DEFAULT_PAUSE),
        ({"RateLimit-Reset": "NaN"}, DEFAULT_PAUSE),
    ],
)
def test_absurd_429_pauses_are_bounded(server, headers, pause):
    """A hostile host's pause is clamped to max_pause_seconds, an unusable one is the short default; the
    result always converts to a datetime (the ledger stores it as one)."""
    server.route("GET", PATH, [Reply(429, b"", headers), OK])
    before = time.time()
    with client_for(server, max_rate_limit_wait=1) as client, pytest.raises(RateLimited) as raised:
        client.query(LIST_REPOS)
    retry_at = raised.value.retry_at
    assert datetime.fromtimestamp(retry_at, timezone.utc)
    assert before + pause - 1 <= retry_at <= time.time() + pause + 1


# --- logins: the password goes to the PDS asked for, over https, and nowhere else ---


@pytest.mark.parametrize("status", [302, 307, 308])
def test_login_never_follows_a_redirect_to_another_origin(servers, status):
    pds, elsewhere = servers(), servers()
    pds.route("POST", "/xrpc/com.atproto.server.createSession",
              Reply(status, b"", {"Location": f"{elsewhere.url}/xrpc/com.atproto.server.createSession"}))
    elsewhere.route("POST", "/xrpc/com.atproto.server.createSession", session_reply(1))
    elsewhere.route("GET", "/xrpc/com.atproto.server.createSession", session_reply(1))
    with client_for(pds) as client, pytest.raises(UnsafeLogin, match="another origin") as raised:
        client.login("alice.test", PASSWORD)
    assert elsewhere.requests == []
    assert PASSWORD not in str(raised.value)


def test_login_follows_a_redirect_within_its_origin(server):
    server.route("POST", "/xrpc/com.atproto.server.createSession",
                 Reply(308, b"", {"Location": "/v2/xrpc/com.atproto.server.createSession"}))
    server.route("POST", "/v2/xrpc/com.atproto.server.createSession", session_reply(1))
    with client_for(server) as client:
        client.login("alice.test", PASSWORD)
        assert client.session_did == "did:plc:abc"
    assert PASSWORD.encode() in server.calls("/v2/xrpc/com.atproto.server.createSession")[0].body


def test_login_over_plain_http_is_refused_unless_private_hosts_allowed(server, monkeypatch):
    """The host passes the address guard (its address is made public for it), so only the scheme is wrong."""
    server.route("POST", "/xrpc/com.atproto.server.createSession", session_reply(1))
    only_stand_in_is_public(monkeypatch)
    with client_for(server, allow_private_hosts=False) as client, pytest.raises(UnsafeLogin, match="http"):
        client.login("alice.test", PASSWORD)
    assert server.requests == []
    with client_for(server, allow_private_hosts=True) as client:
        client.login("alice.test", PASSWORD)
    assert len(server.requests) == 1


def test_429_with_reset_far_ahead_raises_rate_limited(server):
    reset = int(time.time()) + 3600
    server.route("GET", PATH, xrpc_error(429, "RateLimitExceeded", "slow down", {"RateLimit-Reset": str(reset)}))
    with client_for(server) as client, pytest.raises(RateLimited) as raised:
        client.query(LIST_REPOS)
    assert raised.value.retry_at == reset and raised.value.status == 429
    assert pickle.loads(pickle.dumps(raised.value)).retry_at == reset
    assert len(server.calls(PATH)) == 1


@pytest.mark.parametrize("headers", [{"Retry-After": "0"}, {"RateLimit-Reset": "0"}], ids=["retry-after 0", "reset 0"])
def test_a_429_that_asks_for_no_wait_is_still_paused_and_ends(server, headers):
    """A host answering every call with 429 and no wait would be asked again at once, without end: each
    429 pauses at least a second, so the wait limit is reached and the call raises RateLimited."""
    server.route("GET", PATH, Reply(429, b"", headers))
    with client_for(server, max_rate_limit_wait=2) as client:
        kind, value = ends_within(20, lambda: client.query(LIST_REPOS), lambda: f"{len(server.calls(PATH))} requests")
    assert kind == "raised" and isinstance(value, RateLimited) and len(server.calls(PATH)) <= 4


def test_retry_after_seconds_beyond_the_wait_limit_raises(server):
    server.route("GET", PATH, Reply(429, b"", {"Retry-After": "120"}))
    before = time.time()
    with client_for(server, max_rate_limit_wait=5) as client, pytest.raises(RateLimited) as raised:
        client.query(LIST_REPOS)
    assert raised.value.retry_at >= before + 120


def test_429_pauses_the_host_for_every_client_sharing_the_limiter(server, target_url):
    reset = int(time.time()) + 3600
    server.route("GET", PATH, [Reply(429, b"", {"RateLimit-Reset": str(reset)}), OK])
    limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    with client_for(server, limiter=limiter) as first, pytest.raises(RateLimited):
        first.query(LIST_REPOS)
    other_process_limiter = HostRateLimiter(target_url, limit=100, window_seconds=60)
    with client_for(server, limiter=other_process_limiter, max_rate_limit_wait=1) as second:
        with pytest.raises(RateLimited) as raised:
            second.query(LIST_REPOS)
    assert raised.value.retry_at == pytest.approx(reset, abs=5)
    assert len(server.calls(PATH)) == 1  # the second client never sent its request


# --- transient failures ---


def test_503_is_retried_then_succeeds(server):
    server.route("GET", PATH, [xrpc_error(503, "ServiceUnavailable"), Reply(502, b"bad gateway"), OK])
    with client_for(server, retries=3) as client:
        assert client.query(LIST_REPOS) == {"repos": []}
    assert len(server.calls(PATH)) == 3


def test_persistent_503_becomes_transport_failure(server):
    server.route("GET", PATH, xrpc_error(503, "ServiceUnavailable", "down"))
    with client_for(server, retries=2) as client, pytest.raises(TransportFailure) as raised:
        client.query(LIST_REPOS)
    assert raised.value.status == 503
    assert len(server.calls(PATH)) == 3


def test_timeout_becomes_transport_failure_after_retries(server):
    server.route("GET", PATH, Reply(200, b"{}", delay=3))
    with client_for(server, timeout=0.3, retries=1) as client, pytest.raises(TransportFailure, match="Timeout"):
        client.query(LIST_REPOS)
    assert len(server.calls(PATH)) == 2


# --- hosts that drip: every byte within the per-read timeout, so only a whole-request deadline ends them ---

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
DRIPS = {
    "103 Early Hints without end": [EARLY_HINTS] * 200,
    "headers byte by byte": [bytes([b]) for b in ANSWER],
}


@pytest.mark.parametrize("drip", DRIPS, ids=list(DRIPS))
def test_a_host_dripping_its_headers_is_cut_at_the_deadline(server, drip):
    """Before the answer's headers end, httpx's 1 s per-read timeout never trips (a piece every 0.3 s):
    the call was held for as long as the host went on (60 s of 103s, 20 s of headers), checked nowhere."""
    server.route("GET", PATH, Reply(raw=DRIPS[drip], chunk_delay=0.3))
    with client_for(server, timeout=1, retries=1, deadline_seconds=1.5) as client:
        kind, error = ends_within(6, lambda: client.query(LIST_REPOS), lambda: f"{len(server.calls(PATH))} requests")
    assert kind == "raised" and isinstance(error, TransportFailure), error
    assert f"{LIST_REPOS} on {client.host} took longer than its deadline of 1.5 s" in str(error)
    assert len(server.calls(PATH)) == 2  # a retry gets the whole deadline again


def test_a_deadline_grows_with_the_bytes_moved_only_up_to_its_cap(server):
    """A deadline that grows with the bytes moved counts bytes on the wire, and 103s are bytes that are
    never data: sent fast (80 KB/s against a 10 KB/s minimum), they bought time without end before the
    cap (20 s of them here, held for all of it). Now the deadline grows by at most `max_bytes` worth."""
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </" + b"x" * 4000 + b">; rel=preload\r\n\r\n"
    server.route("GET", PATH, Reply(raw=[hint] * 400, chunk_delay=0.05))
    with client_for(server, timeout=1, retries=0) as client:
        growing = client.deadline(LIST_REPOS, "the flood", seconds=1, min_bytes_per_second=10_000, max_bytes=20_000)
        kind, error = ends_within(15, lambda: client.query(LIST_REPOS, deadline=growing), lambda: "still reading 103s")
    assert kind == "raised" and isinstance(error, TransportFailure), error
    assert "the flood took longer than its deadline of 1 s (and 1 s per 10,000 bytes moved, up to 20,000)" in str(error)


def test_a_name_server_that_never_answers_is_cut_at_the_deadline(server):
    """getaddrinfo has no timeout: a lookup that hung held the request until the system resolver gave up
    (for a name server that drops queries, its timeout times its attempts, per name), past the deadline."""
    released, finished = threading.Event(), threading.Event()

    def hanging(host, port):
        released.wait(30)
        finished.set()
        return resolve_host("127.0.0.1", port)

    with XrpcClient(f"http://pds.hang.test:{server.port}", allow_private_hosts=True, retries=0, deadline_seconds=1,
                    resolve=hanging) as client:
        kind, error = ends_within(40, lambda: client.query(LIST_REPOS), lambda: "still resolving")
    answered_first = finished.is_set()
    released.set()
    assert not answered_first, "the request waited for the lookup to end"
    assert kind == "raised" and isinstance(error, TransportFailure), error
    assert f"{LIST_REPOS} on {client.host} took longer than its deadline of 1 s" in str(error)
    assert server.calls(PATH) == []


def test_a_did_fetch_from_a_plc_whose_name_never_resolves_is_cut_at_its_deadline(monkeypatch):
    """The PLC's client is not behind the private-host guard, and connected by name: the system lookup
    inside the connect had no bound at all."""
    from migration_assets.atproto.identity import DidResolutionFailed, IdentityResolver

    released, finished = threading.Event(), threading.Event()
    system_getaddrinfo = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "plc.hang.test":
            released.wait(30)
            finished.set()
            raise socket.gaierror(socket.EAI_NONAME, "never answered")
        return system_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    with IdentityResolver(plc_url="http://plc.hang.test", deadline_seconds=1, retries=0) as resolver:
        kind, error = ends_within(40, lambda: resolver.resolve("did:plc:" + "a" * 24), lambda: "still resolving")
    answered_first = finished.is_set()
    released.set()
    assert not answered_first, "the fetch waited for the lookup to end"
    assert kind == "raised" and isinstance(error, DidResolutionFailed), error
    assert "took longer than its deadline of 1 s" in str(error)


def test_an_address_that_never_answers_the_connect_gives_way_to_the_next(server):
    """A name's first address dropping the connect (an IPv6 route that black-holes) timed out the
    request; the system's create_connection tries the next address, and so does the backend now. Here
    the first address is a listener whose accept queue is full, so the kernel drops its SYNs."""
    server.route("GET", PATH, Reply(200, b"{}", {"Content-Type": "application/json"}))
    clogged = socket.socket()
    clogged.bind(("127.0.0.2", server.port))
    clogged.listen(0)
    fillers = []
    try:
        for _ in range(3):  # the queue holds one; the rest wait in SYN-sent or are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.2", server.port))
            fillers.append(filler)
        resolve = lambda host, port: ["127.0.0.2", "127.0.0.1"]  # noqa: E731
        with XrpcClient(f"http://pds.clogged.test:{server.port}", allow_private_hosts=True, retries=0, timeout=1,
                        deadline_seconds=20, resolve=resolve) as client:
            kind, value = ends_within(30, lambda: client.query(LIST_REPOS), lambda: "still connecting")
    finally:
        for sock in (*fillers, clogged):
            sock.close()
    assert kind == "returned", value
    assert len(server.calls(PATH)) == 1


def test_a_growing_deadline_needs_its_cap_and_stops_growing_there():
    with pytest.raises(ValueError, match="needs max_bytes"):
        Deadline(1, "uncapped", min_bytes_per_second=1000)
    deadline = Deadline(1, "capped", min_bytes_per_second=1000, max_bytes=2500)
    start = deadline.ends
    deadline.count(2000)
    deadline.count(2000)
    assert (deadline.moved, round(deadline.ends - start, 6)) == (4000, 2.5)


def test_a_json_answer_dripped_byte_by_byte_is_cut_at_the_deadline(server):
    body = json.dumps({"repos": [], "cursor": "x" * 100}).encode()
    server.route("GET", PATH, Reply(200, [bytes([b]) for b in body], {"Content-Type": "application/json"},
                                    chunk_delay=0.1))
    with client_for(server, timeout=1, retries=0, deadline_seconds=1) as client:
        kind, error = ends_within(5, lambda: client.query(LIST_REPOS), lambda: "still reading")
    assert kind == "raised" and isinstance(error, TransportFailure) and "deadline of 1 s" in str(error), error


def test_a_deadline_is_per_call_and_the_next_call_on_the_connection_has_its_own(server):
    server.route("GET", PATH, [Reply(200, [b'{"repos"', b': []}'], {"Content-Type": "application/json"},
                                     chunk_delay=0.6), OK])
    with client_for(server, retries=0, deadline_seconds=1) as client:
        assert client.query(LIST_REPOS) == {"repos": []}  # 0.6 s of its 1 s
        assert client.query(LIST_REPOS) == {"repos": []}  # the kept-alive connection, a new second
        slow = client.deadline(LIST_REPOS, "the slow one", seconds=0.3)
        with pytest.raises(TransportFailure, match="the slow one took longer than its deadline of 0.3 s"):
            server.route("GET", PATH, Reply(200, [b"{", b"}"], chunk_delay=1))
            client.query(LIST_REPOS, deadline=slow)


def test_a_json_answer_cut_short_is_tried_again(server):
    """The body is read within the attempt: before, it was read after the retry loop, so a host hanging
    up halfway through an answer failed the call (a page of a blob listing failed its account)."""
    cut = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n", b'{"repos": [']
    server.route("GET", PATH, [Reply(raw=cut), OK])
    with client_for(server, retries=1) as client:
        assert client.query(LIST_REPOS) == {"repos": []}
    assert len(server.calls(PATH)) == 2


def test_a_redirect_is_followed_without_reading_its_body(servers):
    """httpx reads a redirect's body whole before following it: 200 MB here (any size, bounded only by
    the deadline), held in memory for nothing. Now it is closed unread."""
    target, redirecting = servers(), servers()
    target.route("GET", PATH, OK)
    megabyte = b"x" * (1 << 20)
    head = f"HTTP/1.1 302 Found\r\nLocation: {target.url}{PATH}\r\nContent-Length: {200 << 20}\r\n\r\n".encode()
    redirecting.route("GET", PATH, Reply(raw=[head] + [megabyte] * 200))
    with client_for(redirecting) as client:
        assert client.query(LIST_REPOS) == {"repos": []}
    assert len(target.calls(PATH)) == 1
    ends_within(10, lambda: _wait_for(lambda: redirecting.unfinished == 1), lambda: "the redirect's body read whole")


def _wait_for(condition) -> None:
    while not condition():
        time.sleep(0.05)


def test_a_body_that_does_not_decode_as_its_encoding_is_a_clear_error(server):
    server.route("GET", PATH, Reply(200, b"not gzip at all", {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
    with client_for(server) as client, pytest.raises(XrpcError, match="does not decode as its Content-Encoding"):
        client.query(LIST_REPOS)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_json_answer_past_the_size_limit_is_refused(server, encoding):
    """17 MB of JSON, or a 17 KB gzip that inflates to it: refused at MAX_JSON_BYTES, not held whole."""
    body = b'{"repos": [], "pad": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    headers = {"Content-Type": "application/json"}
    if encoding == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    server.route("GET", PATH, Reply(200, [body[i:i + 65536] for i in range(0, len(body), 65536)], headers))
    with client_for(server, retries=0) as client, pytest.raises(XrpcError, match="larger than 16777216 bytes"):
        client.query(LIST_REPOS)


def test_connection_refused_becomes_transport_failure(servers):
    dead = servers()
    dead.stop()
    with client_for(dead, retries=1) as client, pytest.raises(TransportFailure, match="ConnectError"):
        client.query(LIST_REPOS)


def test_one_shot_body_is_not_retried(server):
    server.route("POST", "/xrpc/x.upload", [xrpc_error(503, "ServiceUnavailable"), OK])
    with client_for(server) as client, pytest.raises(TransportFailure):
        client.procedure("x.upload", iter([b"once"]))
    assert len(server.calls("/xrpc/x.upload")) == 1


# --- streams and redirects ---


def test_stream_yields_the_body_in_chunks(server):
    server.route("GET", "/xrpc/com.atproto.sync.getRepo", Reply(200, [b"a" * 70_000, b"b" * 70_000]))
    with client_for(server) as client, client.stream("com.atproto.sync.getRepo", {"did": "did:plc:x"}) as reply:
        data = b"".join(reply.iter_bytes())
    assert data == b"a" * 70_000 + b"b" * 70_000


def test_stream_error_reply_raises_typed_error(server):
    server.route("GET", "/xrpc/com.atproto.sync.getBlob", xrpc_error(400, "InvalidRequest", "Blob not found"))
    with client_for(server) as client, pytest.raises(BlobNotFound):
        with client.stream("com.atproto.sync.getBlob", {"did": "did:plc:x", "cid": "bafk"}):
            pytest.fail("the body of a failed stream must not be entered")


def test_redirect_to_another_loopback_server_is_followed_when_allowed(servers):
    origin, cdn = servers(), servers()
    origin.route("GET", "/xrpc/com.atproto.sync.getBlob", Reply(302, b"", {"Location": f"{cdn.url}/blob/1"}))
    cdn.route("GET", "/blob/1", Reply(200, b"blob bytes"))
    with client_for(origin) as client, client.stream("com.atproto.sync.getBlob", {"cid": "b"}) as reply:
        assert reply.read() == b"blob bytes"
    assert len(cdn.calls("/blob/1")) == 1


def test_redirect_loop_is_an_error(server):
    server.route("GET", "/xrpc/x.loop", Reply(302, b"", {"Location": "/xrpc/x.loop"}))
    with client_for(server) as client, pytest.raises(XrpcError, match="too many redirects"):
        client.query("x.loop")


def test_guard_refuses_loopback_host_unless_allowed(server, monkeypatch):
    server.route("GET", PATH, OK)
    monkeypatch.delenv(xrpc.ALLOW_PRIVATE_ENV, raising=False)
    with XrpcClient(server.url) as client, pytest.raises(PrivateHostRefused, match="127.0.0.1"):
        client.query(LIST_REPOS)
    assert server.calls(PATH) == []
    monkeypatch.setenv(xrpc.ALLOW_PRIVATE_ENV, "yes")
    with XrpcClient(server.url) as client:
        assert client.query(LIST_REPOS) == {"repos": []}


STAND_IN_PUBLIC = "127.0.0.1"  # the machine has no public interface: the guard is told this one is public
INTERNAL = "127.0.0.2"  # an internal service, on loopback too


def only_stand_in_is_public(monkeypatch) -> None:
    monkeypatch.setattr(xrpc, "is_forbidden_address", lambda address: address != STAND_IN_PUBLIC)


def test_guard_checks_every_redirect_hop(servers, monkeypatch):
    """The first hop's name resolves (through the injected resolver) to the stand-in public address; its
    redirect names an internal address, which the guard refuses before connecting."""
    origin = servers()
    internal = servers(INTERNAL)
    origin.route("GET", "/xrpc/com.atproto.sync.getBlob",
                 Reply(302, b"", {"Location": f"http://{INTERNAL}:{internal.port}/secret"}))
    internal.route("GET", "/secret", Reply(200, b"internal data"))
    only_stand_in_is_public(monkeypatch)

    def resolve(host, port):
        return [STAND_IN_PUBLIC] if host == "pds.example.test" else resolve_host(host, port)

    with XrpcClient(f"http://pds.example.test:{origin.port}", allow_private_hosts=False, resolve=resolve) as client:
        with pytest.raises(PrivateHostRefused, match=INTERNAL):
            with client.stream("com.atproto.sync.getBlob", {"cid": "b"}):
                pass
    assert len(origin.calls("/xrpc/com.atproto.sync.getBlob")) == 1
    assert internal.calls("/secret") == []


def test_connection_goes_to_the_address_the_guard_checked_on_every_hop(servers, monkeypatch):
    """DNS rebinding: every name answers the stand-in public address first, then the internal one. The
    guard must connect to the address it checked, on the first hop and after the redirect: a second
    resolution (as httpx does on its own) would reach the internal server on the same port."""
    public = servers()
    internal = servers(INTERNAL, public.port)
    public.route("GET", "/xrpc/com.atproto.sync.getBlob",
                 Reply(302, b"", {"Location": f"http://cdn.rebind.test:{public.port}/blob"}))
    public.route("GET", "/blob", Reply(200, b"public blob"))
    for path in ("/xrpc/com.atproto.sync.getBlob", "/blob"):
        internal.route("GET", path, Reply(200, b"internal secret"))
    lookups: dict[str, int] = {}
    system_getaddrinfo = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".rebind.test"):
            lookups[host] = lookups.get(host, 0) + 1
            host = STAND_IN_PUBLIC if lookups[host] == 1 else INTERNAL
        return system_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    only_stand_in_is_public(monkeypatch)
    with XrpcClient(f"http://pds.rebind.test:{public.port}", allow_private_hosts=False) as client:
        with client.stream("com.atproto.sync.getBlob", {"cid": "b"}) as reply:
            assert reply.read() == b"public blob"
    assert internal.requests == []
    assert [r.path for r in public.requests] == ["/xrpc/com.atproto.sync.getBlob", "/blob"]
    assert public.requests[0].headers["host"] == f"pds.rebind.test:{public.port}"  # the name, not the IP
    assert public.requests[1].headers["host"] == f"cdn.rebind.test:{public.port}"


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.9", True), ("192.168.1.1", True),
        ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),
        ("240.0.0.1", True), ("::1", True), ("fd00::2", True), ("fe80::1%eth0", True),
        ("::ffff:10.0.0.1", True), ("192.0.2.2", True),
        ("8.8.8.8", False), ("93.184.215.14", False), ("2606:4700:4700::1111", False),
    ],
)
def test_forbidden_addresses(address, forbidden):
    assert is_forbidden_address(address) is forbidden


def test_bad_base_url_is_refused():
    with pytest.raises(ValueError, match="http"):
        XrpcClient("ftp://pds.example")


def test_every_client_shares_one_verifying_tls_context():
    """Building a TLS context loads the CA bundle (~20 ms of CPU); a run makes a client per host."""
    import ssl

    from migration_assets.atproto.identity import IdentityResolver

    contexts = [client._transport._pool._ssl_context for client in (
        xrpc.guarded_http_client(timeout=1, allow_private=False, user_agent="t"),
        xrpc.guarded_http_client(timeout=1, allow_private=True, user_agent="t"),
    )]
    resolver = IdentityResolver(plc_url="https://plc.example")
    contexts += [resolver._plc._transport._pool._ssl_context, resolver._web._transport._pool._ssl_context]
    assert all(context is xrpc.shared_ssl_context() for context in contexts)
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED and contexts[0].check_hostname
