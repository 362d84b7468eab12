"""Moving one account's blobs from its old PDS to its new PDS: the seed's ImportBlobsJob, streamed.

Blob by blob, one at a time: the download streams to `{work_dir}/{did}/blobs/{cid}` while it is hashed,
the hash must equal the CID's digest, the file streams up with uploadBlob and is deleted at once, so
memory stays flat whatever the blob sizes. Only what the new PDS reports missing (listMissingBlobs) is
sent, so a resumed or repeated migration never sends a blob twice. No Dagster import here.
"""

import hashlib
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

from migration_assets.atproto.cid import SHA2_256, CID, CidError, CidMismatch
from migration_assets.atproto.ratelimit import HostRateLimiter
from migration_assets.atproto.deadline import Deadline
from migration_assets.atproto.xrpc import (
    AuthRequired, BlobNotFound, RateLimited, TransportFailure, XrpcClient, XrpcError,
)
from migration_assets.blobs.credentials import AccountCredentials
from migration_assets.blobs.store import ProgressData, now_iso
from migration_assets.core.backoff import Backoff
from migration_assets.core.checks import CheckOutcome, listing

LIST_PAGE = 1000  # listBlobs / listMissingBlobs maximum page size
MIB = 1024 * 1024
# Memory estimate (the seed's MemoryEstimatorService): streaming holds a chunk per direction, so what
# grows with the account is the CID list, ~200 bytes per CID (a 59-char str, set and list slots).
BASE_MEMORY_BYTES = 4 * MIB
BYTES_PER_CID = 200

CHECK_NOTHING_MISSING = "nothing_missing_on_new_pds"
CHECK_NO_FAILED_BLOBS = "no_failed_blobs"
CHECK_BYTES_VERIFIED = "bytes_verified"


class TransferSettings(BaseModel):
    work_dir: Path = Field(description="blobs are staged under {work_dir}/{did}/blobs/{cid}")
    attempts: int = Field(default=3, ge=1, description="tries per blob")
    backoff_base_seconds: float = Field(default=2.0, gt=0, description="longest first wait between tries")
    backoff_cap_seconds: float = Field(default=60.0, gt=0, description="longest wait between tries")
    progress_every: int = Field(default=10, ge=1, description="write progress_data every N blobs")
    chunk_bytes: int = Field(default=256 * 1024, ge=4096)
    max_blob_bytes: int = Field(default=1 << 30, description="a bigger download is cut off (the disk is not filled)")
    max_rate_limit_sleep: float = Field(default=3600.0, description="a blob's rate-limit waits past this, in all, fail the job")
    min_bytes_per_second: float = Field(
        default=16 * 1024, gt=0, description="a blob's download or upload gets the request deadline plus 1 s per "
        "this many bytes moved; slower, it is cut and the try fails")


class JobFailure(RuntimeError):
    """The whole account's transfer cannot go on (a PDS unreachable, login refused, local disk): the
    migration is retried or marked failed; blobs already sent stay sent."""


class PermanentFailure(JobFailure):
    """Retrying cannot help (wrong password, account unknown): fail at once."""


class BlobFailed(Exception):
    """One blob could not be moved after its attempts; it goes into failed_blobs and the job goes on."""


class BlobTooSlow(BlobFailed):
    """The old PDS answered for the blob but sent it slower than BLOB_MIN_BYTES_PER_SECOND: cut."""


# This many blobs in a row cut as too slow: the old PDS is slow for all of them, not for one; fail the job
# (it is run again later) rather than spend a deadline on each blob of the account.
SLOW_BLOBS_IN_A_ROW = 3


class LeaseLost(RuntimeError):
    """Another run took this account's migration over (this one stalled past its lease): stop at once
    and write nothing more; the other run redoes what this one had in flight."""


@dataclass
class TransferResult:
    progress: ProgressData
    blobs_listed: int
    missing_at_start: int
    transferred: int = 0
    run_bytes: int = 0  # bytes downloaded, hashed and uploaded in this run
    acknowledged_bytes: int = 0  # sizes the new PDS reported for those uploads
    size_mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.run_bytes / self.seconds if self.seconds > 0 else 0.0


def blob_backoff(settings: TransferSettings) -> Backoff:
    """Waits between the tries of one blob (none after the last: it would delay only the next blob)."""
    return Backoff(settings.backoff_base_seconds, max(settings.backoff_cap_seconds, settings.backoff_base_seconds))


def estimate_memory_mb(blob_count: int, chunk_bytes: int) -> int:
    return math.ceil((BASE_MEMORY_BYTES + 2 * chunk_bytes + blob_count * BYTES_PER_CID) / MIB)


def account_dir(work_dir: Path, did: str) -> Path:
    if not did.startswith("did:") or "/" in did or "\0" in did:
        raise ValueError(f"unsafe DID for a path: {did!r}")
    return work_dir / did


def blob_path(work_dir: Path, did: str, cid: str) -> Path:
    """`{work_dir}/{did}/blobs/{cid}`; the DID and CID are validated first, so neither can leave it."""
    CID.decode(cid)  # base32 only: no separators
    return account_dir(work_dir, did) / "blobs" / cid


@contextmanager
def logged_in_clients(
    did: str, old_pds: str, new_pds: str, credentials: AccountCredentials, limiter: HostRateLimiter | None,
    timeout: float = 120.0,
) -> Iterator[tuple[XrpcClient, XrpcClient]]:
    """Sessions on both PDSes as the account (its own session passes the deactivated gate of the old
    PDS's sync endpoints). The client refreshes them when they expire."""
    with ExitStack() as stack:
        clients = []
        for url, password, which in (
            (old_pds, credentials.old_password, "old"), (new_pds, credentials.new_password, "new"),
        ):
            client = stack.enter_context(XrpcClient(url, limiter=limiter, timeout=timeout))
            _login(client, did, password.get_secret_value(), which, url)
            clients.append(client)
        yield clients[0], clients[1]


def _login(client: XrpcClient, did: str, password: str, which: str, url: str) -> None:
    try:
        client.login(did, password)
    except (TransportFailure, httpx.TransportError) as error:
        raise JobFailure(f"cannot reach the {which} PDS {url} to log in as {did}: {error}") from None
    except XrpcError as error:
        if error.status is not None and 400 <= error.status < 500 and not isinstance(error, RateLimited):
            raise PermanentFailure(
                f"the {which} PDS {url} refused the login of {did}: {error.error or error.status} "
                f"{error.message or ''}. Check the {which} password (ATPROTO_{which.upper()}_PASSWORD for the "
                "CLI) and that the account exists there, then request the migration again"
            ) from None
        raise JobFailure(f"login of {did} at the {which} PDS {url} failed: {error}") from None


def list_old_blobs(old: XrpcClient, did: str) -> list[str]:
    """Every blob CID of the account on the old PDS (listBlobs, cursor paging)."""
    return _paged(old, "com.atproto.sync.listBlobs", {"did": did}, "cids",
                  lambda cid: cid if isinstance(cid, str) else None)


def list_missing_blobs(new: XrpcClient) -> list[str]:
    """CIDs the new PDS's imported repo references but has no blob for (listMissingBlobs, paged). An
    entry that is not a CID string is kept as text: it fails as that blob, not the account."""
    return _paged(new, "com.atproto.repo.listMissingBlobs", {}, "blobs", _entry_cid)


def _paged(client: XrpcClient, nsid: str, params: dict, key: str, item: Callable[[object], str | None]) -> list[str]:
    """A listing's items in order, without duplicates. It ends at a page without items or cursor, and
    also at a cursor seen before or a page with nothing new: a host whose cursors go round (A, B, A...)
    or whose pages repeat would otherwise be listed without end."""
    found: dict[str, None] = {}
    cursor: str | None = None
    seen_cursors: set[str] = set()
    while True:
        page = client.query(nsid, {**params, "limit": LIST_PAGE, **({"cursor": cursor} if cursor else {})}, auth=True)
        entries = page.get(key)
        before = len(found)
        for entry in entries if isinstance(entries, list) else ():
            if (text := item(entry)) is not None:
                found[text] = None
        cursor = page.get("cursor")
        if len(found) == before or not isinstance(cursor, str) or not cursor or cursor in seen_cursors:
            return list(found)
        seen_cursors.add(cursor)


def _entry_cid(entry: object) -> str:
    cid = entry.get("cid") if isinstance(entry, dict) else entry
    return cid if isinstance(cid, str) else repr(cid)[:200]


def malformed_cid(cid: str) -> str | None:
    """Why `cid` (from a PDS listing) is not a CID we can fetch and verify, or None when it is one. Only
    a sha2-256 one can be verified (its text is then 59 characters: a staging file's name)."""
    try:
        parsed = CID.decode(cid)
    except CidError as error:
        return f"malformed CID in listMissingBlobs of the new PDS: {error}"[:500]
    if parsed.hash_code != SHA2_256 or len(parsed.digest) != 32:
        return (f"CID {cid[:100]} in listMissingBlobs of the new PDS is not a sha2-256 one: its blob could not "
                "be verified")
    return None


@dataclass
class _Sent:
    size: int
    acknowledged_size: int | None


GET_BLOB, UPLOAD_BLOB = "com.atproto.sync.getBlob", "com.atproto.repo.uploadBlob"


def transfer_blob(
    old: XrpcClient, new: XrpcClient, did: str, cid: str, path: Path, settings: TransferSettings,
) -> _Sent:
    """Download to `path` while hashing, check the CID, upload the file, delete it (whatever happens).
    Each way keeps to a deadline that grows with the bytes moved (a drip is cut: that try fails)."""
    expected = CID.decode(cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = settings.min_bytes_per_second
    most = settings.max_blob_bytes
    download = old.deadline(GET_BLOB, f"getBlob of {cid} from the old PDS", min_bytes_per_second=rate, max_bytes=most)
    upload = new.deadline(UPLOAD_BLOB, f"uploadBlob of {cid} to the new PDS", min_bytes_per_second=rate, max_bytes=most)
    answered = threading.Event()  # the old PDS's headers came: a cut after that is this blob's slowness
    try:
        hasher = hashlib.sha256()
        size = 0
        with _too_slow(download, answered), old.stream(GET_BLOB, {"did": did, "cid": cid}, auth=True,
                                                       deadline=download) as response:
            answered.set()
            mime = _media_type(response.headers.get("content-type"))
            with path.open("wb") as file:
                for chunk in response.iter_bytes(settings.chunk_bytes):
                    file.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    if size > settings.max_blob_bytes:
                        raise BlobFailed(f"the old PDS sent more than {settings.max_blob_bytes} bytes for blob {cid}")
        if hasher.digest() != expected.digest:
            raise CidMismatch(expected, CID(expected.codec, hasher.digest()))
        with path.open("rb") as file:
            # With a Content-Length the file streams unchunked and the PDS can refuse an oversize blob up front.
            reply = new.procedure(UPLOAD_BLOB, file, content_type=mime, headers={"Content-Length": str(size)},
                                  auth=True, deadline=upload)
    finally:
        path.unlink(missing_ok=True)
    blob = reply.get("blob")
    ref = blob.get("ref") if isinstance(blob, dict) else None
    stored_cid = ref.get("$link") if isinstance(ref, dict) else None
    if stored_cid != cid:
        raise BlobFailed(f"the new PDS stored the upload as {str(stored_cid)[:100]}, not {cid}")
    stored_size = blob.get("size")
    return _Sent(size, stored_size if type(stored_size) is int else None)  # else: a size mismatch, reported


@contextmanager
def _too_slow(deadline: Deadline, answered: threading.Event) -> Iterator[None]:
    """A download cut by its deadline once the old PDS had answered fails this blob's try (BlobTooSlow).
    A host that sends no answer in time, or any other transport error, is the host's: after their tries,
    the account fails (and is run again later)."""
    try:
        yield
    except TransportFailure as error:
        if not (answered.is_set() and deadline.passed()):
            raise
        raise BlobTooSlow(str(error)) from None


_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+(?:\s*;[ -~]*)?", re.ASCII)


def _media_type(value: str | None) -> str:
    """The old PDS's Content-Type, sent again with the upload when it is a media type (printable ASCII:
    an HTTP header can't carry more); else application/octet-stream."""
    return value if value and len(value) <= 200 and _MEDIA_TYPE.fullmatch(value) else "application/octet-stream"


_TRANSPORT = (TransportFailure, httpx.TransportError)


def transfer_with_retries(
    old: XrpcClient, new: XrpcClient, did: str, cid: str, settings: TransferSettings,
    sleep: Callable[[float], None] = time.sleep,
) -> _Sent:
    """`settings.attempts` tries with backoff; rate limits wait for their reset without using a try, up
    to `settings.max_rate_limit_sleep` in all (a host that keeps answering RateLimitExceeded would
    otherwise hold the blob, and its account's slot, without end). Raises BlobFailed (this blob only)
    or JobFailure (a host down or limiting us, login lost, local disk: the account)."""
    backoff = blob_backoff(settings)
    path = blob_path(settings.work_dir, did, cid)
    failures, rate_slept = 0, 0.0
    while True:
        try:
            return transfer_blob(old, new, did, cid, path, settings)
        except RateLimited as error:  # the client already waited what it may; this one is longer
            wait = max(error.retry_at - time.time(), 0.0)
            if rate_slept + wait > settings.max_rate_limit_sleep:
                raise JobFailure(f"{error.host} rate-limits us until unix time {error.retry_at:.0f} (waited "
                                 f"{rate_slept:.0f} s for blob {cid} already): run again later") from None
            sleep(wait)
            rate_slept += wait
            continue
        except AuthRequired as error:
            raise JobFailure(f"the session on {error.host} was lost and could not be renewed: {error}") from None
        except BlobNotFound as error:  # asking again finds no more (a CID only the new PDS lists)
            raise BlobFailed(_reason(error)) from None
        except OSError as error:
            raise JobFailure(f"local staging of blob {cid} under {settings.work_dir} failed: {error}") from None
        except (*_TRANSPORT, CidMismatch, CidError, XrpcError, BlobFailed) as error:
            failures += 1
            if failures >= settings.attempts:
                if isinstance(error, _TRANSPORT):
                    raise JobFailure(f"blob {cid}: {_reason(error)} ({settings.attempts} tries)") from None
                raise (BlobTooSlow if isinstance(error, BlobTooSlow) else BlobFailed)(_reason(error)) from None
            sleep(backoff.delay(failures))


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:500]


class ProgressTracker:
    """Counts as blobs go and writes progress_data every `every` blobs (and at the end)."""

    def __init__(self, progress: ProgressData, every: int, write: Callable[[ProgressData], None]) -> None:
        self.progress = progress
        self.every = every
        self._write = write
        self._since_write = 0

    def blob_done(self, size: int) -> None:
        completed = self.progress.blobs_completed + 1
        total = self.progress.blobs_total
        self.progress.blobs_completed = completed if total is None else min(completed, total)
        self.progress.bytes_transferred += size
        self._tick()

    def blob_failed(self, cid: str, reason: str) -> None:
        self.progress.add_failure(cid, reason)
        self._tick()

    def _tick(self) -> None:
        self._since_write += 1
        if self._since_write >= self.every:
            self.flush()

    def flush(self) -> None:
        self.progress.last_progress_update = now_iso()
        self._write(self.progress)
        self._since_write = 0


def transfer_order(old_cids: list[str], missing: list[str]) -> list[str]:
    """What to send: the missing CIDs, in the old PDS's order, then any it did not list (they will
    fail as not found there, and be recorded)."""
    wanted = set(missing)
    listed = [cid for cid in old_cids if cid in wanted]
    known = set(listed)
    return listed + [cid for cid in missing if cid not in known]


def migrate_blobs(
    old: XrpcClient, new: XrpcClient, did: str, settings: TransferSettings, progress: ProgressData,
    write_progress: Callable[[ProgressData], None], log: Callable[[str], None] = lambda _: None,
    sleep: Callable[[float], None] = time.sleep, lease_lost: threading.Event | None = None,
) -> TransferResult:
    """Send every blob the new PDS is missing; record the ones that fail and go on. The caller holds
    the account's lease (the staging folder is this run's alone); once `lease_lost` is set, LeaseLost
    stops it before the next blob. (No periodic gc.collect() as the seed's GC_INTERVAL: nothing here
    forms reference cycles, so each blob's buffers are freed as soon as its transfer returns.)"""
    started = time.monotonic()
    progress = progress.model_copy(deep=True)
    progress.blobs_started_at = progress.blobs_started_at or now_iso()
    progress.blobs_completed_at = None
    progress.failed_blobs, progress.failed_blob_count = [], 0  # this run retries every earlier failure
    try:
        old_cids = list_old_blobs(old, did)
        missing = list_missing_blobs(new)
    except _TRANSPORT as error:
        raise JobFailure(f"listing the blobs of {did} failed: {_reason(error)}") from None
    shutil.rmtree(account_dir(settings.work_dir, did), ignore_errors=True)  # a killed run's half-downloaded blob
    order = transfer_order(old_cids, missing)
    present = len(old_cids) - len(set(old_cids) & set(missing))
    progress.blob_count = progress.blobs_total = len(old_cids)
    progress.blobs_completed = present
    progress.estimated_memory_mb = estimate_memory_mb(len(old_cids), settings.chunk_bytes)
    log(f"{did}: {len(old_cids)} blobs on the old PDS, {len(missing)} missing on the new one; "
        f"estimated memory {progress.estimated_memory_mb} MB")
    tracker = ProgressTracker(progress, settings.progress_every, write_progress)
    tracker.flush()
    result = TransferResult(progress=progress, blobs_listed=len(old_cids), missing_at_start=len(missing))
    slow_in_a_row = 0
    for number, cid in enumerate(order, 1):
        if lease_lost is not None and lease_lost.is_set():
            raise LeaseLost(f"{did}: another run took this account's blob migration over; this run stops")
        if problem := malformed_cid(cid):
            log(f"{did}: blob {cid[:200]!r} failed: {problem}")
            tracker.blob_failed(cid[:200], problem)
            continue
        try:
            sent = transfer_with_retries(old, new, did, cid, settings, sleep)
        except BlobFailed as failure:
            log(f"{did}: blob {cid} failed: {failure}")
            tracker.blob_failed(cid, str(failure))
            slow_in_a_row = slow_in_a_row + 1 if isinstance(failure, BlobTooSlow) else 0
            if slow_in_a_row >= SLOW_BLOBS_IN_A_ROW:
                tracker.flush()
                raise JobFailure(f"{did}: {slow_in_a_row} blobs in a row came slower than {settings.min_bytes_per_second:g} "
                                 "bytes/s from the old PDS (BLOB_MIN_BYTES_PER_SECOND): run again later") from None
            continue
        except JobFailure:
            tracker.flush()  # what was sent stays counted
            raise
        slow_in_a_row = 0
        result.transferred += 1
        result.run_bytes += sent.size
        result.acknowledged_bytes += sent.acknowledged_size or 0
        if sent.acknowledged_size != sent.size:
            result.size_mismatches.append(f"{cid} ({sent.size} sent, {sent.acknowledged_size} stored)")
        tracker.blob_done(sent.size)
        if number % settings.progress_every == 0:
            log(f"{did}: transferred blob {number}/{len(order)}: {cid} ({sent.size / MIB:.1f} MB)")
    tracker.flush()
    result.seconds = time.monotonic() - started
    return result


def verify_account(new: XrpcClient, result: TransferResult) -> list[CheckOutcome]:
    """The account's checks: nothing missing on the new PDS, no failed blob, every byte acknowledged."""
    missing = list_missing_blobs(new)
    status = new.query("com.atproto.server.checkAccountStatus", auth=True)
    expected, imported = int(status.get("expectedBlobs", 0)), int(status.get("importedBlobs", 0))
    complete = not missing and imported >= expected
    failed, failures = result.progress.failed_blobs, result.progress.failures
    return [
        CheckOutcome(
            CHECK_NOTHING_MISSING, complete,
            f"new PDS: {len(missing)} blobs missing, {imported} imported of {expected} expected"
            + (f": {listing(missing)}" if missing else ""),
            metadata={"missing": len(missing), "imported_blobs": imported, "expected_blobs": expected},
        ),
        CheckOutcome(
            CHECK_NO_FAILED_BLOBS, not failures,
            f"{failures} blobs failed" + (": " + listing([f"{f.cid} ({f.reason})" for f in failed], 5) if failed else ""),
            metadata={"failed_blobs": failures},
        ),
        CheckOutcome(
            CHECK_BYTES_VERIFIED,
            not result.size_mismatches and result.run_bytes == result.acknowledged_bytes,
            f"{result.transferred} blobs sent in this run, {result.run_bytes} bytes hashed to their CIDs, "
            f"{result.acknowledged_bytes} bytes stored by the new PDS"
            + (f"; size mismatches: {listing(result.size_mismatches)}" if result.size_mismatches else ""),
            metadata={"run_bytes": result.run_bytes, "acknowledged_bytes": result.acknowledged_bytes},
        ),
    ]
