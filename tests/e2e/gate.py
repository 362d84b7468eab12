"""A loopback reverse proxy in front of a PDS that holds blob downloads in flight until released.

While the gate is closed, each getBlob reply gets its headers and then one byte of its body every few
seconds: the run downloading it is alive and mid-transfer (no read timeout fires, no retry starts), but
cannot finish. Release sends the rest. Every other call is passed through as it is."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

GET_BLOB = "/xrpc/com.atproto.sync.getBlob"
TRICKLE_SECONDS = 5.0  # well inside the runs' read timeout (BLOB_REQUEST_TIMEOUT_SECONDS, 120 s)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class BlobGate:
    def __init__(self, upstream: str):
        self.upstream = httpx.Client(base_url=upstream, timeout=60)
        self.released = threading.Event()
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def held_dids(self) -> set[str]:
        """Accounts whose blob download is held at the gate now."""
        with self._lock:
            return set(self._held)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward()

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                reply = gate.upstream.request(self.command, self.path, headers=headers, content=body)
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in HOP_BY_HOP | {"content-encoding"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                url = urlsplit(self.path)
                if url.path == GET_BLOB and reply.is_success and not gate.released.is_set():
                    self._trickle(reply.content, parse_qs(url.query).get("did", ["?"])[0])
                else:
                    self.wfile.write(reply.content)

            def _trickle(self, content: bytes, did: str):
                with gate._lock:
                    gate._held.add(did)
                sent = 0
                try:
                    while not gate.released.wait(TRICKLE_SECONDS):
                        if sent < len(content) - 1:  # the last byte only after release
                            self.wfile.write(content[sent:sent + 1])
                            self.wfile.flush()
                            sent += 1
                    self.wfile.write(content[sent:])
                finally:
                    with gate._lock:
                        gate._held.discard(did)

        return Handler


@contextmanager
def blob_gate(upstream: str) -> Iterator[BlobGate]:
    """A closed gate in front of `upstream`; on leaving, it is released and stopped."""
    gate = BlobGate(upstream)
    thread = threading.Thread(target=gate.server.serve_forever, name="blob-gate", daemon=True)
    thread.start()
    try:
        yield gate
    finally:
        gate.released.set()
        gate.server.shutdown()
        gate.server.server_close()
        gate.upstream.close()
