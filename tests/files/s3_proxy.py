"""A loopback proxy in front of a local S3 server (moto, SeaweedFS): counts PUTs received and uploads
completed per key, fails PUTs of chosen keys (S3 500 InternalError) or drops them midway, until
healed or a given number of times, flips a byte of their bodies on the way (a faulty network), and
calls a hook once per request: before the client sends its body when it asks to (Expect:
100-continue), else before forwarding."""

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import httpx

_HOP = {"host", "content-length", "connection", "transfer-encoding"}
_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
          b"<Message>injected by the test proxy</Message></Error>")


@dataclass
class ProxyState:
    url: str = ""
    failing_keys: set[str] = field(default_factory=set)    # "bucket/key" whose PUTs fail
    cut_keys: set[str] = field(default_factory=set)        # "bucket/key" whose PUTs the proxy drops midway
    fail_times: Counter = field(default_factory=Counter)    # "bucket/key" -> next PUTs to fail (500), then heal
    cut_times: Counter = field(default_factory=Counter)     # "bucket/key" -> next PUTs to drop midway, then heal
    corrupt_keys: set[str] = field(default_factory=set)    # "bucket/key" whose PUT bodies arrive with a byte flipped
    attempts: Counter = field(default_factory=Counter)      # "bucket/key" -> PUTs received
    uploads: Counter = field(default_factory=Counter)       # "bucket/key" -> completed uploads
    before: Callable[[str, str], None] | None = None        # (method, path with query) hook
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, times: Counter, key: str) -> bool:
        """One of the `times` left for `key` used up; False when none is left."""
        with self.lock:
            if times[key] <= 0:
                return False
            times[key] -= 1
            return True


def _is_upload(method: str, query: str) -> bool:
    """A finished copy: PutObject, or CompleteMultipartUpload (POST ?uploadId=...). Parts are not."""
    if method == "PUT":
        return "partNumber" not in query
    return method == "POST" and "uploadId" in query


@contextmanager
def s3_proxy(upstream: str) -> Iterator[ProxyState]:
    state = ProxyState()
    client = httpx.Client(base_url=upstream, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        hooked = False  # the hook already ran for this request

        def handle_expect_100(self) -> bool:
            """The body is not sent yet: a hook here can change a file as its upload starts."""
            if state.before:
                state.before(self.command, self.path)
                self.hooked = True
            return super().handle_expect_100()

        def _forward(self) -> None:
            hooked, self.hooked = self.hooked, False
            parts = urlsplit(self.path)
            object_name = parts.path.lstrip("/")
            length = int(self.headers.get("content-length", 0) or 0)
            if self.command == "PUT":
                with state.lock:
                    state.attempts[object_name] += 1
            if object_name in state.cut_keys or (self.command == "PUT" and state.take(state.cut_times, object_name)):
                # dies mid-body, answers nothing
                self.rfile.read(min(length, 1 << 20))
                self.close_connection = True
                return
            body = self.rfile.read(length)
            if len(body) < length:  # the client gave up mid-body: like S3, store nothing
                self.close_connection = True
                return
            if state.before and not hooked:
                state.before(self.command, self.path)
            if self.command == "PUT" and object_name in state.corrupt_keys and body:
                body = bytes([body[0] ^ 1]) + body[1:]
            if self.command in ("PUT", "POST") and (object_name in state.failing_keys
                                                    or state.take(state.fail_times, object_name)):
                self._reply(500, {"content-type": "application/xml"}, _ERROR)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            reply = client.request(self.command, self.path, content=body, headers=headers)
            if reply.status_code < 300 and _is_upload(self.command, parts.query):
                with state.lock:
                    state.uploads[object_name] += 1
            self._reply(reply.status_code, reply.headers, b"" if self.command == "HEAD" else reply.content,
                        length=reply.headers.get("content-length"))

        def _reply(self, status: int, headers, content: bytes, length: str | None = None) -> None:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in _HOP | {"content-encoding"}:
                    self.send_header(name, value)
            self.send_header("content-length", length if self.command == "HEAD" and length else str(len(content)))
            self.end_headers()
            if content:
                self.wfile.write(content)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        client.close()
