"""Small real HTTP servers on loopback for the client tests: each route answers with scripted replies."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes | list[bytes] = b""  # a list is sent as separate writes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (timeouts)
    chunk_delay: float = 0.0  # seconds between the writes of a list body (a host dripping bytes)
    raw: list[bytes] | None = None  # the whole answer, status line and headers too, written as is (chunk_delay
    # between), then the connection closes (an answer cut short, a host that hangs up)


def json_reply(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})


def xrpc_error(status: int, error: str, message: str = "", headers: dict[str, str] | None = None) -> Reply:
    return json_reply({"error": error, "message": message}, status, headers)


Handler = Callable[[Request], Reply]


class LoopbackServer:
    """`server.route("GET", "/xrpc/nsid", reply | [replies...] | handler)`; `server.requests` logs each call.
    A list of replies is served in order, its last reply repeating."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Request] = []
        self.unfinished = 0  # replies the client stopped reading before their end
        self._routes: dict[tuple[str, str], Handler] = {}
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def route(self, method: str, path: str, answer: Reply | list[Reply] | Handler) -> None:
        if isinstance(answer, Reply):
            answer = [answer]
        if isinstance(answer, list):
            replies = list(answer)
            lock = threading.Lock()

            def scripted(_: Request) -> Reply:
                with lock:
                    return replies.pop(0) if len(replies) > 1 else replies[0]

            answer = scripted
        self._routes[(method, path)] = answer

    def calls(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, request: Request) -> Reply:
        self.requests.append(request)
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            return json_reply({"error": "MethodNotImplemented", "message": f"no route {request.path}"}, 501)
        return handler(request)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _make_handler(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: Nagle held the body ~40 ms

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            request = Request(self.command, parts.path, parse_qs(parts.query),
                              {k.lower(): v for k, v in self.headers.items()}, _read_body(self))
            reply = server._answer(request)
            if reply.delay:
                time.sleep(reply.delay)
            chunks = reply.body if isinstance(reply.body, list) else [reply.body]
            try:
                if reply.raw is not None:
                    self.close_connection = True
                    return self._write(reply.raw, reply.chunk_delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(sum(len(c) for c in chunks)))
                self.end_headers()
                self._write(chunks, reply.chunk_delay)
            except (BrokenPipeError, ConnectionResetError):
                server.unfinished += 1  # the client gave up (timeout tests, bodies it refuses)

        def _write(self, chunks: list[bytes], delay: float) -> None:
            for n, chunk in enumerate(chunks):
                if n and delay:
                    time.sleep(delay)
                self.wfile.write(chunk)
                self.wfile.flush()

        do_GET = do_POST = _handle

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def serve() -> Iterator[Callable[[], LoopbackServer]]:
    """Body of a fixture: yields a factory of servers, all stopped afterwards."""
    started: list[LoopbackServer] = []

    def make(host: str = "127.0.0.1", port: int = 0) -> LoopbackServer:
        server = LoopbackServer(host, port)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
