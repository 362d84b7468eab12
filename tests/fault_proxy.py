"""A loopback HTTP proxy in front of a real server that can rewrite responses: a corrupt source, or an
answer of another status (a throttled DynamoDB)."""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# (request headers, request body, response body) -> new response body, or (status, body)
Rewrite = Callable[[dict[str, str], bytes, bytes], bytes | tuple[int, bytes]]
THROTTLED = (400, b'{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",'
                  b'"message":"The level of configured provisioned throughput for the table was exceeded"}')

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "x-amz-crc32"}


@contextmanager
def fault_proxy(upstream: str, rewrite: Rewrite) -> Iterator[str]:
    # No kept-alive connection upstream: reusing one just as the server closes it (Node's 5 s
    # keepAliveTimeout, in dynalite) would fail that request, an error of the proxy's own that a test
    # counting a step's tries would count as one.
    client = httpx.Client(base_url=upstream, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            reply = client.post(self.path, content=body, headers=headers)
            content = rewrite(dict(self.headers), body, reply.content)
            status, content = content if isinstance(content, tuple) else (reply.status_code, content)
            self.send_response(status)
            for name, value in reply.headers.items():
                if name.lower() not in _HOP_HEADERS:  # the CRC no longer matches a rewritten body
                    self.send_header(name, value)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # a run's parallel reads connect at once: no connection kept waiting a second

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        client.close()
