"""A loopback proxy in front of a real PDS that can count, slow, tamper with, rate-limit or drop its
traffic: the faults a blob migration must survive. Bodies are buffered (test blobs are small)."""

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class PdsProxy:
    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream
        self.client = httpx.Client(base_url=upstream, timeout=60)
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # nsid -> requests seen
        self.uploads: Counter[str] = Counter()  # sha256 hex of each uploadBlob body the PDS accepted
        self.tamper_cids: set[str] = set()  # getBlob bodies of these CIDs get one byte flipped
        self.rate_limit_burst = 0  # answer this many next requests with 429
        self.rate_limit_seconds = 1.0
        self.rate_limited = 0
        self.blob_delay = 0.0  # seconds to stall in the middle of each getBlob body
        self.stalling = threading.Event()  # set while a getBlob body is stalled half sent
        self.hold_first_blob: threading.Event | None = None  # the next getBlob stalls half sent until it is set
        self.extra_missing: list = []  # entries added to every listMissingBlobs answer
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """(Re)open on the same port, e.g. after `close()` to bring the PDS back."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """The PDS goes away: new connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:  # kept-alive connections too, or the client would go on using them
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def stop(self) -> None:
        self.close()
        self.client.close()

    def _take_rate_limit(self) -> bool:
        with self.lock:
            if self.rate_limit_burst <= 0:
                return False
            self.rate_limit_burst -= 1
            self.rate_limited += 1
            return True


def _handler(proxy: PdsProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with proxy.lock:
                proxy._connections.add(self.connection)

        def do_GET(self) -> None:
            self._forward("GET")

        def do_POST(self) -> None:
            self._forward("POST")

        def _forward(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else b""
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                body = self._read_chunked()
            nsid = urlsplit(self.path).path.removeprefix("/xrpc/")
            with proxy.lock:
                proxy.calls[nsid] += 1
            if proxy._take_rate_limit():
                reset = str(int(time.time() + proxy.rate_limit_seconds) + 1)
                self._reply(429, b'{"error":"RateLimitExceeded","message":"slow down"}',
                            {"content-type": "application/json", "ratelimit-reset": reset, "ratelimit-remaining": "0"})
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            reply = proxy.client.request(method, self.path, content=body or None, headers=headers)
            content = reply.content
            if nsid == "com.atproto.sync.getBlob" and reply.is_success:
                cid = parse_qs(urlsplit(self.path).query).get("cid", [""])[0]
                if cid in proxy.tamper_cids:
                    content = bytes([content[0] ^ 0xFF]) + content[1:]
            if nsid == "com.atproto.repo.uploadBlob" and reply.is_success:
                with proxy.lock:
                    proxy.uploads[hashlib.sha256(body).hexdigest()] += 1
            if nsid == "com.atproto.repo.listMissingBlobs" and reply.is_success and proxy.extra_missing:
                page = json.loads(content)
                page["blobs"] = page.get("blobs", []) + proxy.extra_missing
                content = json.dumps(page).encode()
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}
            slow = proxy.blob_delay if nsid == "com.atproto.sync.getBlob" else 0.0
            hold = self._take_hold() if nsid == "com.atproto.sync.getBlob" else None
            self._reply(reply.status_code, content, out_headers, slow, hold)

        def _take_hold(self) -> threading.Event | None:
            with proxy.lock:
                hold, proxy.hold_first_blob = proxy.hold_first_blob, None
                return hold

        def _read_chunked(self) -> bytes:
            parts = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()

        def _reply(self, status: int, content: bytes, headers: dict[str, str], stall: float = 0.0,
                   hold: threading.Event | None = None) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            half = len(content) // 2
            self.wfile.write(content[:half])
            if stall or hold:
                self.wfile.flush()
                proxy.stalling.set()
                if hold:
                    hold.wait(300)
                else:
                    time.sleep(stall)
                proxy.stalling.clear()
            self.wfile.write(content[half:])

        def log_message(self, *args) -> None:
            pass

    return Handler
