"""Client CPU per small PUT: a bare loop of N x 8 KB PutObjects with ChecksumSHA256 against SeaweedFS on
loopback, 8 threads, for each way of sending them. Each candidate runs in its own process (its CPU is
that process's user + system time around the loop, warm-up excluded); the server's CPU is read from /proc.

Candidates:
- botocore:  the pipeline's client (files/s3client.copy_client) and put_object, as mover.py called it;
- lean:      files/s3client.FastPut: its own SigV4 signer (s3client.SigV4Signer), a kept-alive http.client
             connection per upload in flight, none of botocore's request machinery (events, serializer,
             parser, retries);
- lean_botocore_signer: FastPut signing with botocore's S3SigV4Auth on an AWSRequest, as it did before
             it had its own signer (the same headers, byte for byte: tests/files/test_sigv4.py);
- diagnostics, only with --only (what each header of the lean PUT costs SeaweedFS; the pipeline must
  keep sending the SHA-256): lean_no_sdk_algorithm, lean_no_metadata, lean_md5_not_sha256 (Content-MD5
  instead of the SHA-256 headers, as rclone sends), lean_bare (neither checksum nor metadata);
- crt:       awscrt's S3Client (native, releases the GIL), only when `awscrt` imports (not a project
             dependency: `pip install --target DIR awscrt` and put DIR on PYTHONPATH to compare).

Measured while writing FastPut (8 KB, 3,000 PUTs, load 17-26): botocore 0.89-1.0 ms, FastPut on
botocore's urllib3 pool 0.51-0.53 ms, on http.client 0.29-0.35 ms, awscrt 0.31-0.35 ms of client CPU per PUT.
With its own signer (load 2.5-3.3): lean 0.10-0.12 ms, lean_botocore_signer 0.18-0.20 ms.

After each candidate the bucket is listed: server_cpu_ms_per_listed_object is what a range check's
listing costs SeaweedFS per object.

Server CPU per PUT (3,000 x 8 KB, load 2-3.7, 2 cores): lean 0.60-0.75 ms, and within that noise for
every diagnostic variant (no x-amz-sdk-checksum-algorithm 0.65-0.67, no metadata 0.63-0.66, MD5
instead of SHA-256 0.60-0.70, bare 0.59-0.63); rclone copy of the same files, same server, 0.72-0.78.
A listing costs 0.014-0.018 ms per object. What moves SeaweedFS's CPU per PUT is how the requests
arrive: the same lean PUTs from 2 threads, or from 8 that pause 4 ms each, cost it 0.83-0.87 ms
(--threads 2; --pause-ms 4).

    python bench/s3_put_cpu.py [--puts 3000] [--only lean] [--threads 8] [--pause-ms 0]
"""

import argparse
import base64
import hashlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

try:
    from bench.common import load_average, log, machine_info, write_result
except ImportError:  # run as a script: bench/ is on sys.path
    from common import load_average, log, machine_info, write_result

NAME = "s3_put_cpu"
SIZE = 8 * 1024
THREADS = 8
WARMUP = 100


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bodies(count: int) -> list[tuple[str, bytes, bytes]]:
    rng = random.Random(count)
    out = []
    for n in range(count):
        data = rng.randbytes(SIZE)
        out.append((f"put/{n:06d}.bin", data, hashlib.sha256(data).digest()))
    return out


class _Resource:
    """The fields copy_client reads (dagster-aws's S3Resource's), from the environment."""
    region_name, endpoint_url = os.environ.get("AWS_REGION"), os.environ.get("AWS_ENDPOINT_URL_S3")
    use_ssl, verify, profile_name, use_unsigned_session, max_attempts = True, None, None, False, 5
    aws_access_key_id = aws_secret_access_key = aws_session_token = None


def botocore_put(bucket: str):
    from migration_assets.files.s3client import copy_client
    client = copy_client(_Resource(), THREADS)

    def put(key: str, data: bytes, sha: bytes) -> str:
        reply = client.put_object(Bucket=bucket, Key=key, Body=data, ContentLength=len(data),
                                  ChecksumAlgorithm="SHA256", ChecksumSHA256=base64.b64encode(sha).decode(),
                                  Metadata={"sha256": sha.hex()})
        return reply["ETag"]
    return put


def lean_put(bucket: str, botocore_signer: bool = False):
    from migration_assets.files.s3client import FastPut, copy_client
    fast = FastPut(copy_client(_Resource(), THREADS), bucket)
    if botocore_signer:  # the before of SigV4Signer: FastPut as it signed with botocore
        fast._signer = _BotocoreSigner(fast)

    def put(key: str, data: bytes, sha: bytes) -> str:
        reply = fast.put(key, data, sha, {"sha256": sha.hex()})
        assert reply is not None, "the lean path gave up on a PUT"
        return reply["ETag"]
    return put


class _BotocoreSigner:
    """SigV4Signer's interface, signed by botocore's S3SigV4Auth (the pipeline's client does not sign payloads,
    so the AWSRequest needs no body)."""

    def __init__(self, fast) -> None:
        self._origin, self._config = fast._base[: len(fast._base) - len(fast._path)], fast._client.meta.config
        self._service, self._region = fast._service, fast._region

    def sign(self, method, path, headers, payload_hash, credentials, amz_date=None):
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        request = AWSRequest(method, self._origin + path, headers=headers, data=b"")
        request.context["client_config"] = self._config
        S3SigV4Auth(credentials, self._service, self._region).add_auth(request)
        headers.clear()
        headers.update(request.headers.items())
        return headers


def lean_botocore_signer_put(bucket: str):
    return lean_put(bucket, botocore_signer=True)


class _Reshaped:
    """A signer that reshapes the headers before signing them: server-CPU diagnostics (what each header
    the lean PUT sends costs SeaweedFS), not ways the pipeline may send."""

    def __init__(self, signer, drop=(), md5=None) -> None:
        self._signer, self._drop, self._md5 = signer, drop, md5

    def sign(self, method, path, headers, payload_hash, credentials, amz_date=None):
        for name in self._drop:
            headers.pop(name, None)
        if self._md5 is not None:
            headers["Content-MD5"] = self._md5.value
        return self._signer.sign(method, path, headers, payload_hash, credentials, amz_date)


def _lean_variant(bucket: str, drop=(), metadata=True, md5=False):
    from migration_assets.files.s3client import FastPut, copy_client
    fast = FastPut(copy_client(_Resource(), THREADS), bucket)
    current = threading.local()
    fast._signer = _Reshaped(fast._signer, drop, current if md5 else None)

    def put(key: str, data: bytes, sha: bytes) -> str:
        if md5:
            current.value = base64.b64encode(hashlib.md5(data).digest()).decode()
        reply = fast.put(key, data, sha, {"sha256": sha.hex()} if metadata else {})
        assert reply is not None, "the lean path gave up on a PUT"
        return reply["ETag"]
    return put


_CHECKSUM = ("x-amz-checksum-sha256", "x-amz-sdk-checksum-algorithm")
VARIANTS = {  # diagnostics only (--only NAME): the pipeline's PUTs must carry the SHA-256 for S3 to verify
    "lean_no_sdk_algorithm": lambda bucket: _lean_variant(bucket, drop=_CHECKSUM[1:]),
    "lean_no_metadata": lambda bucket: _lean_variant(bucket, metadata=False),
    "lean_md5_not_sha256": lambda bucket: _lean_variant(bucket, drop=_CHECKSUM, md5=True),  # as rclone sends
    "lean_bare": lambda bucket: _lean_variant(bucket, drop=_CHECKSUM, metadata=False),
}


def crt_put(bucket: str):
    from awscrt.auth import AwsCredentialsProvider
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RequestType

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"].removeprefix("http://")
    loops = EventLoopGroup(2)
    bootstrap = ClientBootstrap(loops, DefaultHostResolver(loops))
    credentials = AwsCredentialsProvider.new_static(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    client = S3Client(bootstrap=bootstrap, region=os.environ["AWS_REGION"], credential_provider=credentials,
                      tls_mode=S3RequestTlsMode.DISABLED, throughput_target_gbps=1.0)

    def put(key: str, data: bytes, sha: bytes) -> str:
        headers = HttpHeaders([("Host", endpoint), ("Content-Length", str(len(data))),
                               ("x-amz-checksum-sha256", base64.b64encode(sha).decode()),
                               ("x-amz-meta-sha256", sha.hex())])
        request = HttpRequest("PUT", f"/{bucket}/{key}", headers, io.BytesIO(data))
        done: Future = Future()
        found: dict = {}

        def on_headers(status_code, headers, **_):
            found.update(status=status_code, headers=dict(headers))

        def on_done(error=None, status_code=None, error_body=None, **_):
            if error:
                done.set_exception(RuntimeError(f"{error} {status_code} {error_body!r}"))
            else:
                done.set_result(found)
        client.make_request(type=S3RequestType.PUT_OBJECT, request=request, on_headers=on_headers, on_done=on_done)
        reply = done.result()
        return reply["headers"].get("ETag") or reply["headers"].get("etag")
    return put


CANDIDATES = {"botocore": botocore_put, "lean": lean_put, "lean_botocore_signer": lean_botocore_signer_put, "crt": crt_put}
DEFAULT = list(CANDIDATES)
CANDIDATES.update(VARIANTS)


def child(name: str, bucket: str, count: int, threads: int = THREADS, pause: float = 0.0) -> None:
    put = CANDIDATES[name](bucket)
    work = bodies(count + WARMUP)
    for key, data, sha in work[:WARMUP]:
        put("warm/" + key, data, sha)
    todo = iter(work[WARMUP:])
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            if pause:
                time.sleep(pause)
            put(*item)

    threads = [threading.Thread(target=run) for _ in range(threads)]
    started, cpu = time.perf_counter(), cpu_seconds()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    print(json.dumps({"seconds": round(seconds, 3), "client_cpu_seconds": round(cpu, 3)}))


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS, help="PUTs in flight")
    parser.add_argument("--pause-ms", type=float, default=0.0,
                        help="each thread waits this long before each PUT: requests arriving slower")
    parser.add_argument("--puts", type=int, default=3000)
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]), float(args.child[4]))
    import boto3

    from migration_assets.devstack.servers import local_aws_environment, start_seaweedfs

    names = args.only or DEFAULT
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-put-") as work:
        server = start_seaweedfs(Path(work) / "data", log_path=Path(work) / "weed.log")
        try:
            os.environ.update(local_aws_environment(s3_url=server.url))
            os.environ.pop("AWS_CA_BUNDLE", None)
            s3 = boto3.client("s3")
            for _ in range(args.repeats):
                for name in names:
                    bucket = f"put-{name.replace('_', '-')}-{random.randrange(1 << 30):x}"
                    s3.create_bucket(Bucket=bucket)
                    before = server_cpu(server.process.pid)
                    done = subprocess.run([sys.executable, __file__, "--child", name, bucket, str(args.puts),
                                           str(args.threads), str(args.pause_ms / 1000)],
                                          capture_output=True, text=True)
                    if done.returncode:
                        log(f"{name}: failed: {done.stderr[-2000:]}")
                        figures.setdefault(name, {})["error"] = done.stderr.strip().splitlines()[-1]
                        continue
                    run = json.loads(done.stdout.strip().splitlines()[-1])
                    run["server_cpu_seconds"] = round(server_cpu(server.process.pid) - before, 2)
                    run["client_cpu_ms_per_put"] = round(1000 * run["client_cpu_seconds"] / args.puts, 3)
                    run["server_cpu_ms_per_put"] = round(1000 * run["server_cpu_seconds"] / args.puts, 3)
                    before = server_cpu(server.process.pid)  # what a listing of them costs (a range check's)
                    listed = sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(
                        Bucket=bucket, Prefix="put/"))
                    run["server_cpu_ms_per_listed_object"] = round(1000 * (server_cpu(server.process.pid) - before)
                                                                   / max(1, listed), 3)
                    run["load_average"] = load_average()
                    log(f"{name}: {run}")
                    figures.setdefault(name, {}).setdefault("runs", []).append(run)
        finally:
            server.stop()
    for name, found in figures.items():
        if found.get("runs"):
            found["best_client_cpu_ms_per_put"] = min(r["client_cpu_ms_per_put"] for r in found["runs"])
    write_result(NAME, {"bench": NAME, "machine": machine_info(), "load_average": load_average(),
                        "puts": args.puts, "size_bytes": SIZE, "threads": args.threads,
                        "pause_ms": args.pause_ms, "candidates": figures})


if __name__ == "__main__":
    main()
