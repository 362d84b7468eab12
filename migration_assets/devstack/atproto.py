"""A local AT Protocol network (PLC + reference PDSes from @atproto/dev-env's packages) and a seeder.

Test, bench and demo tooling: plain httpx against the PDS, no retries, no rate limiting. The
network runs as one Node subprocess (atproto_network.mjs) on loopback; processes that talk to it
need `network.environment()` (ATPROTO_PLC_URL, ATPROTO_ALLOW_PRIVATE_HOSTS).
"""

import base64
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from migration_assets.core.settings import PROJECT_ROOT
from migration_assets.devstack.servers import LocalServer

APPLY_WRITES_MAX = 200  # the reference PDS refuses larger applyWrites batches
DEFAULT_PASSWORD = "local-dev-password"
LAUNCHER = Path(__file__).with_name("atproto_network.mjs")
_REQUIRED_PACKAGES = ("@atproto/pds", "@did-plc/server", "@atproto/crypto", "core-js")


class AtprotoNetworkError(RuntimeError):
    """The local network did not start, or a seeding call was refused."""


@dataclass
class PdsInfo:
    url: str
    did: str
    admin_password: str = field(repr=False)


@dataclass
class AtprotoNetwork:
    """A running PLC + N PDSes on loopback (or only one of the two), started as one Node subprocess."""

    plc_url: str
    pdses: list[PdsInfo]
    server: LocalServer
    data_dir: Path
    log_path: Path
    start_seconds: float

    def environment(self) -> dict[str, str]:
        """Env for processes that resolve identities through this network."""
        return {"ATPROTO_PLC_URL": self.plc_url, "ATPROTO_ALLOW_PRIVATE_HOSTS": "true"}

    def stop(self, timeout: float = 15.0) -> None:
        """Close stdin (the launcher's shutdown signal), then fall back to SIGTERM/SIGKILL."""
        process = self.server.process
        if process.stdin and not process.stdin.closed:
            process.stdin.close()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.server.stop()

    def __enter__(self) -> "AtprotoNetwork":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_atproto_network(
    pds_count: int = 2,
    *,
    blob_upload_limit: int = 5_000_000,
    log_path: Path | None = None,
    data_dir: Path | None = None,
    plc_port: int | None = None,
    plc_url: str | None = None,
    pds_ports: Sequence[int] | None = None,
    max_import_size: int | None = None,
    startup_timeout: float = 120.0,
) -> AtprotoNetwork:
    """Start PLC + `pds_count` PDSes; returns once every server answers.

    plc_url: start only the PDSes, against this PLC (e.g. one started with pds_count=0, so PLC and
      PDSes run in separate processes, as in production; the bench needs that).

    data_dir: kept after stop (default: a temp dir the launcher deletes on shutdown); give a fresh
      one, since the PLC directory lives in memory and forgets the DIDs of an earlier run.
    log_path: the launcher's log (default: a temp file, named in errors).
    """
    _check_node_packages()
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="atproto-network-", suffix=".log")[1])
    args = ["node", str(LAUNCHER), "--pds-count", str(pds_count),
            "--blob-upload-limit", str(blob_upload_limit)]
    if max_import_size is not None:
        args += ["--max-import-size", str(max_import_size)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if plc_port:
        args += ["--plc-port", str(plc_port)]
    if plc_url:
        args += ["--plc-url", plc_url]
    if pds_ports:
        args += ["--pds-ports", ",".join(map(str, pds_ports))]
    started = time.monotonic()
    with open(log_path, "ab") as log:
        try:
            process = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=PROJECT_ROOT,
                env={**os.environ, "NODE_OPTIONS": "", "LOG_ENABLED": os.environ.get("LOG_ENABLED", "false")},
            )
        except FileNotFoundError:
            raise AtprotoNetworkError("`node` is not on PATH: install Node.js 20+ (scripts/system-packages)") from None
    ready = _read_ready_line(process, log_path, startup_timeout)
    return AtprotoNetwork(
        plc_url=ready["plc"],
        pdses=[PdsInfo(p["url"], p["did"], p["admin_password"]) for p in ready["pdses"]],
        server=LocalServer("atproto-network", ready["plc"], process),
        data_dir=Path(ready["data_dir"]),
        log_path=log_path,
        start_seconds=time.monotonic() - started,
    )


def _check_node_packages() -> None:
    missing = [p for p in _REQUIRED_PACKAGES if not (PROJECT_ROOT / "node_modules" / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"node packages {', '.join(missing)} are missing: run `npm ci` in {PROJECT_ROOT}")


def _read_ready_line(process: subprocess.Popen, log_path: Path, timeout: float) -> dict[str, Any]:
    """Wait for the launcher's JSON line; later stdout is drained into the log so it never blocks."""
    found: dict[str, Any] = {}
    ready = threading.Event()

    def drain() -> None:
        assert process.stdout is not None
        with open(log_path, "ab") as log:
            for line in process.stdout:
                if not ready.is_set() and line.startswith(b'{"plc"'):
                    found.update(json.loads(line))
                    ready.set()
                else:
                    log.write(line)
                    log.flush()
        ready.set()  # stdout closed: the launcher exited

    threading.Thread(target=drain, name="atproto-network-stdout", daemon=True).start()
    if ready.wait(timeout) and found:
        return found
    try:  # stdout closed: the launcher is exiting
        exited: int | None = process.wait(timeout=5 if ready.is_set() else 0.01)
    except subprocess.TimeoutExpired:
        exited = None
        process.kill()
        process.wait()
    reason = f"exited with code {exited}" if exited is not None else f"was not ready within {timeout:.0f} s"
    raise AtprotoNetworkError(
        f"local AT Protocol network {reason}; log {log_path}:\n{_tail(log_path)}\n"
        f"Check that `node --version` runs and `npm ci` was done in {PROJECT_ROOT}.")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(log unreadable: {exc})"


@dataclass
class Account:
    did: str
    handle: str
    password: str = field(repr=False)
    pds: PdsInfo
    access_jwt: str = field(repr=False)
    email: str = ""


class PdsSeeder:
    """Creates accounts, records and blobs on one PDS (test/bench/demo data, not production code)."""

    def __init__(self, pds: PdsInfo, *, timeout: float = 120.0):
        self.pds = pds
        self.http = httpx.Client(base_url=pds.url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "PdsSeeder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # accounts

    def create_account(self, handle: str, password: str = DEFAULT_PASSWORD,
                       email: str | None = None) -> Account:
        email = email or f"{handle.replace('.', '-')}@example.com"
        out = self._call("com.atproto.server.createAccount",
                         {"handle": handle, "password": password, "email": email})
        return Account(out["did"], out["handle"], password, self.pds, out["accessJwt"], email)

    def login(self, account: Account) -> Account:
        """A fresh access token (they expire after a couple of hours)."""
        out = self._call("com.atproto.server.createSession",
                         {"identifier": account.did, "password": account.password})
        account.access_jwt = out["accessJwt"]
        return account

    def deactivate(self, account: Account) -> None:
        self._call("com.atproto.server.deactivateAccount", {}, token=account.access_jwt)

    def activate(self, account: Account) -> None:
        self._call("com.atproto.server.activateAccount", None, token=account.access_jwt)

    def takedown(self, account: Account, applied: bool = True) -> None:
        """Admin takedown (applied=False lifts it)."""
        body = {"subject": {"$type": "com.atproto.admin.defs#repoRef", "did": account.did},
                "takedown": {"applied": applied, "ref": "local-test"}}
        self._call("com.atproto.admin.updateSubjectStatus", body, headers=self._admin_headers())

    def check_account_status(self, account: Account) -> dict[str, Any]:
        return self._query("com.atproto.server.checkAccountStatus", {}, token=account.access_jwt)

    def list_missing_blobs(self, account: Account) -> list[str]:
        cids: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
            page = self._query("com.atproto.repo.listMissingBlobs", params, token=account.access_jwt)
            cids += [b["cid"] for b in page.get("blobs", [])]
            cursor = page.get("cursor")
            if not cursor or not page.get("blobs"):
                return cids

    # records

    def create_records(self, account: Account, collection: str, records: Sequence[dict],
                       rkeys: Sequence[str] | None = None) -> list[str]:
        """Create records (applyWrites, 200 per call); returns their rkeys in order."""
        if rkeys is not None and len(rkeys) != len(records):
            raise ValueError(f"{len(rkeys)} rkeys for {len(records)} records")
        writes = [{"$type": "com.atproto.repo.applyWrites#create", "collection": collection,
                   "value": {"$type": collection, **record},
                   **({"rkey": rkeys[i]} if rkeys is not None else {})}
                  for i, record in enumerate(records)]
        return [result["uri"].rsplit("/", 1)[1] for result in self._apply_writes(account, writes)]

    def update_records(self, account: Account, collection: str, updates: Mapping[str, dict]) -> list[str]:
        """Replace records by rkey; returns the new record CIDs in order."""
        writes = [{"$type": "com.atproto.repo.applyWrites#update", "collection": collection,
                   "rkey": rkey, "value": {"$type": collection, **record}}
                  for rkey, record in updates.items()]
        return [result["cid"] for result in self._apply_writes(account, writes)]

    def delete_records(self, account: Account, collection: str, rkeys: Iterable[str]) -> None:
        writes = [{"$type": "com.atproto.repo.applyWrites#delete", "collection": collection, "rkey": rkey}
                  for rkey in rkeys]
        self._apply_writes(account, writes)

    def _apply_writes(self, account: Account, writes: list[dict]) -> list[dict]:
        results: list[dict] = []
        for start in range(0, len(writes), APPLY_WRITES_MAX):
            body = {"repo": account.did, "writes": writes[start:start + APPLY_WRITES_MAX]}
            out = self._call("com.atproto.repo.applyWrites", body, token=account.access_jwt)
            results += out.get("results", [])
        return results

    # blobs

    def upload_blob(self, account: Account, data: bytes | Iterable[bytes] | IO[bytes],
                    mime: str = "application/octet-stream") -> dict[str, Any]:
        """Upload a blob (bytes, or chunks streamed with chunked encoding); returns the blob ref."""
        out = self._call("com.atproto.repo.uploadBlob", data, token=account.access_jwt,
                         headers={"Content-Type": mime})
        return out["blob"]

    def create_record_with_blob(self, account: Account, data: bytes | Iterable[bytes] | IO[bytes],
                                mime: str = "application/octet-stream",
                                collection: str = "com.example.blob") -> tuple[str, dict[str, Any]]:
        """A record of an unknown collection referencing a new blob of any size; (rkey, blob ref).

        app.bsky.embed.images caps images at 1 MB; an unknown collection is not schema-checked, so
        its blob is referenced (and counted as expected after a migration) whatever its size.
        """
        blob = self.upload_blob(account, data, mime)
        record = {"blob": blob, "createdAt": _now()}
        [rkey] = self.create_records(account, collection, [record])
        return rkey, blob

    # plumbing

    def _admin_headers(self) -> dict[str, str]:
        basic = base64.b64encode(f"admin:{self.pds.admin_password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}

    def _call(self, nsid: str, body: Any, *, token: str | None = None,
              headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        all_headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        if body is None or isinstance(body, dict):
            response = self.http.post(f"/xrpc/{nsid}", json=body, headers=all_headers)
        else:
            response = self.http.post(f"/xrpc/{nsid}", content=body, headers=all_headers)
        return _json_or_raise(response, nsid)

    def _query(self, nsid: str, params: Mapping[str, Any], *, token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return _json_or_raise(self.http.get(f"/xrpc/{nsid}", params=dict(params), headers=headers), nsid)


def _json_or_raise(response: httpx.Response, nsid: str) -> dict[str, Any]:
    """The reply's JSON, or an error naming the call and the server's {error, message}."""
    if response.is_success:
        return response.json() if response.content else {}
    try:
        detail = response.json()
    except ValueError:
        detail = {"message": response.text[:300]}
    raise AtprotoNetworkError(
        f"{nsid} at {response.request.url.host}:{response.request.url.port} failed with "
        f"HTTP {response.status_code} {detail.get('error', '')}: {detail.get('message', '')}")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def migrate_account(old: PdsSeeder, new: PdsSeeder, account: Account, new_password: str) -> Account:
    """Move an account's identity and repo to `new`, as the reference PDS does; blobs NOT copied.

    The new account starts deactivated, and the DID document still names the old PDS: the blobs,
    the PLC update and activation are the caller's job (the pipeline under test).
    """
    token = old._query("com.atproto.server.getServiceAuth",
                       {"aud": new.pds.did, "lxm": "com.atproto.server.createAccount"},
                       token=account.access_jwt)["token"]
    created = new._call("com.atproto.server.createAccount",
                        {"did": account.did, "handle": account.handle, "password": new_password,
                         "email": account.email or f"{account.did.replace(':', '-')}@example.com"},
                        token=token)
    moved = Account(account.did, account.handle, new_password, new.pds, created["accessJwt"], account.email)
    # The account's own token passes the deactivated/takendown gate on getRepo.
    with old.http.stream("GET", "/xrpc/com.atproto.sync.getRepo", params={"did": account.did},
                         headers={"Authorization": f"Bearer {account.access_jwt}"}) as repo:
        if not repo.is_success:
            repo.read()
            _json_or_raise(repo, "com.atproto.sync.getRepo")
        new._call("com.atproto.repo.importRepo", repo.iter_bytes(), token=moved.access_jwt,
                  headers={"Content-Type": "application/vnd.ipld.car"})
    return moved


def populate(seeder: PdsSeeder, accounts: int, records_per_account: int, *,
             handle_prefix: str = "user", collection: str = "com.example.record",
             workers: int = 4) -> list[Account]:
    """Bench data: `accounts` new accounts with `records_per_account` small records each."""
    def one(index: int) -> Account:
        account = seeder.create_account(f"{handle_prefix}{index}.test")
        records = [{"text": f"record {n} of {account.handle}", "n": n, "createdAt": _now()}
                   for n in range(records_per_account)]
        seeder.create_records(account, collection, records)
        return account

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(accounts)))
