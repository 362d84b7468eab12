"""A loopback HTTP proxy in front of a real PLC or PDS that can answer for it or rewrite its replies:
rate limits, corrupt CARs, wrong keys. Requests and replies are buffered (test data is small)."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_HOP = {"host", "content-length", "connection", "transfer-encoding", "content-encoding", "keep-alive"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: list[bytes] = field(default_factory=list)  # instead: the whole answer as is, `drip_seconds` apart
    drip_seconds: float = 0.0


# (method, path with query) -> a reply to send instead of asking upstream, or None
Intercept = Callable[[str, str], Reply | None]
# (method, path, upstream reply) -> the reply to send
Rewrite = Callable[[str, str, Reply], Reply]


@dataclass
class Proxy:
    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)

    def count(self, fragment: str) -> int:
        return sum(fragment in path for _, path in self.requests)


@contextmanager
def http_proxy(upstream: str, intercept: Intercept | None = None, rewrite: Rewrite | None = None) -> Iterator[Proxy]:
    client = httpx.Client(base_url=upstream, timeout=60)
    server: ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            proxy.requests.append((self.command, self.path))
            reply = intercept(self.command, self.path) if intercept else None
            if reply is None:
                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream_reply = client.request(self.command, self.path, content=body or None, headers=headers)
                reply = Reply(upstream_reply.status_code, dict(upstream_reply.headers), upstream_reply.content)
                if rewrite:
                    reply = rewrite(self.command, self.path, reply)
            if reply.raw:
                return self._drip(reply)
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                if name.lower() not in _HOP:
                    self.send_header(name, value)
            self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def _drip(self, reply: Reply) -> None:
            try:
                for piece in reply.raw:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(reply.drip_seconds)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up

        do_GET = do_POST = _handle

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy = Proxy(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        client.close()
