"""Copying files to S3: SHA-256 computed while reading, stored with the object, verified after upload.

Checksum design. A single PUT (files up to FILES_MULTIPART_THRESHOLD_MB) carries the file's SHA-256
as ChecksumSHA256: S3 checks the bytes it received against it and stores it, and the object's
ChecksumSHA256 is the file's SHA-256. Files up to IN_MEMORY_MAX are read once into memory and hashed;
larger ones are hashed in a first pass, then streamed from disk (memory stays flat) through a reader
that hashes what is actually sent, so a file that changed in between is caught even by a server that
does not check (real S3 refuses it with BadDigest). A multipart upload's stored checksum is a
composite (the SHA-256 of the parts' digests, "-N"), never the file's, so a file above the threshold
is hashed first and its whole-file SHA-256 set as object metadata (`sha256`) when the upload starts;
the upload pass hashes again, part by part (each part's checksum checked by S3), and a file whose
second digest differs (changed while uploading) is aborted, not recorded. Reading twice costs little
(the page cache serves the second pass) and every object carries its file's SHA-256 in its `sha256`
metadata; migration_files records both it and S3's stored checksum, and the checks compare them to
the object's. boto3's managed transfer is not used: it cannot give a whole-file digest before the
upload starts, nor stop a part loop when the file changes.
"""

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from migration_assets.files.bandwidth import SharedLimiter, throttled
from migration_assets.files.paths import SourceRefused, open_under_root, source_path
from migration_assets.files.s3client import FastPut
from migration_assets.files.settings import FilesSettings
from migration_assets.files.store import FileResult, SourceFile

READ_CHUNK = 1024 * 1024
IN_MEMORY_MAX = 8 * READ_CHUNK  # single PUTs up to this size send bytes read once; larger ones stream
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class FileFailed(Exception):
    """This file cannot be copied now; the message names the file and the next step."""


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class S3Target:
    client: Any
    bucket: str
    prefix: str  # "" or ending in "/"
    limiter: SharedLimiter | None = None  # FILES_BANDWIDTH: every body sent is paid for here first
    fast_puts: bool = True  # single PUTs of bodies in memory through s3client.FastPut when the client allows
    _fast: FastPut | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fast_puts:
            fast = FastPut(self.client, self.bucket)
            object.__setattr__(self, "_fast", fast if fast.available else None)

    def key_for(self, relative: PurePosixPath) -> str:
        """The key of the file at `relative` under FILES_SOURCE_ROOT (paths.source_path)."""
        return self.prefix + relative.as_posix()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _s3_error(operation: str, uri: str, error: Exception) -> FileFailed:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        detail = f"{info.get('Code', '?')}: {info.get('Message', '')}".strip()
    else:
        detail = f"{type(error).__name__}: {error}"
    return FileFailed(f"S3 {operation} of {uri} failed ({detail}); the retry schedule tries it again")


def _existing_copy(target: S3Target, key: str, size: int, sha256: str) -> tuple[str, str] | None:
    """(stored checksum, ETag) of an object already holding exactly this file (a copy made before a
    crash, not yet recorded), else None."""
    try:
        head = target.client.head_object(Bucket=target.bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise
    if head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == sha256:
        return head.get("ChecksumSHA256") or "", head.get("ETag")
    return None


def _put_object(target: S3Target, key: str, body: Any, size: int, sha: bytes) -> tuple[str, str]:
    """One PUT of `body` (bytes, or a reader of `size` bytes) with its SHA-256; (stored checksum, ETag).
    Bytes go the lean way first (FastPut); whatever it does not settle (an error, a retry) goes through
    the client, which sends them again with its retries and error handling."""
    metadata = {"sha256": sha.hex()}
    response = None
    if target._fast is not None and target._fast.available and isinstance(body, bytes):
        response = target._fast.put(key, throttled(body, target.limiter), sha, metadata)
    if response is None:
        response = target.client.put_object(
            Bucket=target.bucket, Key=key, Body=throttled(body, target.limiter), ContentLength=size,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=b64(sha), Metadata=metadata,
        )
    stored = response.get("ChecksumSHA256")
    if stored is None:  # some S3-API servers do not echo it: read what was stored
        stored = target.client.head_object(Bucket=target.bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
    if stored != b64(sha):
        raise FileFailed(f"{target.uri(key)}: S3 stored checksum {stored!r}, expected {b64(sha)!r}; the retry copies it again")
    return stored, response["ETag"]


class _HashedBody:
    """A file as a PUT body: reads stop at the size it had when hashed, and every byte handed to the
    connection is hashed again, so what was sent can be compared with what was announced. A file that
    shrank ends the read with an error rather than leaving the server waiting for the missing bytes.
    botocore rewinds (seek 0) to send it again on a retry."""

    def __init__(self, handle: BinaryIO, path: Path, size: int, sha: bytes) -> None:
        self._handle, self._path, self._size, self._sha = handle, path, size, sha
        self.seek(0)

    def read(self, amount: int | None = -1) -> bytes:
        left = self._size - self._sent
        chunk = self._handle.read(left if amount is None or amount < 0 else min(amount, left))
        if not chunk and left:
            self._shrank = True
            raise OSError(f"{self._path} ended {left} bytes early: it shrank while uploading")
        self._sent += len(chunk)
        self._digest.update(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0):
            raise OSError("only a rewind to the start is supported")
        self._handle.seek(0)
        self._sent, self._digest, self._shrank = 0, hashlib.sha256(), False
        return 0

    def tell(self) -> int:
        return self._sent

    @property
    def changed(self) -> bool:
        """The last attempt sent other bytes than those hashed (a body not sent whole proves nothing)."""
        return self._shrank or (self._sent == self._size and self._digest.digest() != self._sha)


def _put_streamed(target: S3Target, key: str, path: Path, handle: BinaryIO, size: int, sha: bytes) -> tuple[str, str]:
    """One PUT streamed from disk. When the bytes sent are not the ones hashed, the file changed: S3
    refused them (BadDigest) or, on a server that does not check, they are deleted again."""
    body = _HashedBody(handle, path, size, sha)
    try:
        stored = _put_object(target, key, body, size, sha)
    except (ClientError, BotoCoreError, FileFailed, OSError):
        if not body.changed:
            raise
        stored = None
    if body.changed:
        if stored is not None:
            target.client.delete_object(Bucket=target.bucket, Key=key)
        raise FileFailed(f"{path} changed while uploading (it no longer has the SHA-256 {sha.hex()} it was sent "
                         "with); nothing was recorded and the retry copies it again")
    return stored


def _put_multipart(target: S3Target, key: str, path: Path, handle: BinaryIO, sha_hex: str, part_size: int) -> tuple[str, str]:
    upload = target.client.create_multipart_upload(
        Bucket=target.bucket, Key=key, ChecksumAlgorithm="SHA256", Metadata={"sha256": sha_hex},
    )
    upload_id = upload["UploadId"]
    try:
        whole, part_digests, parts = hashlib.sha256(), [], []
        handle.seek(0)
        while chunk := handle.read(part_size):
            whole.update(chunk)
            digest = hashlib.sha256(chunk).digest()
            number = len(parts) + 1
            reply = target.client.upload_part(
                Bucket=target.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=throttled(chunk, target.limiter),
                ChecksumAlgorithm="SHA256", ChecksumSHA256=b64(digest),
            )
            if reply.get("ChecksumSHA256", b64(digest)) != b64(digest):
                raise FileFailed(f"{target.uri(key)}: part {number} stored with another checksum; retry copies it again")
            part_digests.append(digest)
            parts.append({"PartNumber": number, "ETag": reply["ETag"], "ChecksumSHA256": b64(digest)})
        if whole.hexdigest() != sha_hex:
            raise FileFailed(f"{path} changed while uploading (SHA-256 {sha_hex} before, {whole.hexdigest()} after); "
                             "the upload was aborted and the retry copies it again")
        composite = b64(hashlib.sha256(b"".join(part_digests)).digest())
        done = target.client.complete_multipart_upload(
            Bucket=target.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
        )
    except BaseException:
        try:
            target.client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass  # an incomplete upload left behind is only storage; a bucket lifecycle rule expires it
        raise
    stored = done.get("ChecksumSHA256") or target.client.head_object(
        Bucket=target.bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
    if stored is None or stored.split("-")[0] != composite:
        raise FileFailed(f"{target.uri(key)}: S3 stored checksum {stored!r}, expected composite {composite!r}; "
                         "the retry copies it again")
    return f"{composite}-{len(parts)}", done["ETag"]


def _upload(target: S3Target, key: str, path: Path, handle: BinaryIO, data: bytes | None, size: int, sha: bytes,
            settings: FilesSettings) -> tuple[str, str]:
    if data is not None:
        return _put_object(target, key, data, size, sha)
    if size <= settings.multipart_threshold:
        return _put_streamed(target, key, path, handle, size, sha)
    return _put_multipart(target, key, path, handle, sha.hex(), part_size_for(size, settings.part_size))


MAX_PARTS = 10_000  # S3's limit on a multipart upload's parts


def part_size_for(size: int, configured: int) -> int:
    """The configured part size, or more for a file that would need more than MAX_PARTS parts of it
    (past ~78 GiB at 8 MiB: every try sent that much, then S3 refused part 10,001)."""
    return max(configured, -(-size // MAX_PARTS))


def _hash_file(handle: BinaryIO) -> tuple[int, str]:
    """(bytes read, SHA-256 hex) to the file's end: its size as hashed, should it have grown meanwhile."""
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    handle.seek(0)
    return size, digest.hexdigest()


def _check_listing(source: SourceFile, path: Path, size: int, sha_hex: str | None) -> None:
    if source.sha256 is not None and not _SHA256_HEX.fullmatch(source.sha256):
        raise FileFailed(f"source_files.sha256 of file_id {source.file_id} is {source.sha256[:80]!r}, not a SHA-256 "
                         "digest in hex; correct it (or set it NULL to have it computed), then retry")
    if source.size is not None and source.size != size:
        raise FileFailed(f"{path} changed since it was listed: source_files says {source.size} bytes, the disk has "
                         f"{size}; restore the file or update its source_files row (size, sha256), then retry")
    if sha_hex is not None and source.sha256 is not None and source.sha256 != sha_hex:
        raise FileFailed(f"{path} changed since it was listed: source_files says SHA-256 {source.sha256}, the disk "
                         f"has {sha_hex}; restore the file or update its source_files row, then retry")


def _unchanged(source: SourceFile) -> FileResult:
    return FileResult(source.file_id, source.file_uri, source.file_name, source.create_date, "SUCCESS",
                      sha256=source.copied_sha256, unchanged=True)


def copy_file(target: S3Target, root: Path, source: SourceFile, settings: FilesSettings, probe: bool) -> FileResult:
    """Copy one file and verify it; never raises for a per-file problem (it becomes a FAIL result).
    `probe`: first look for an object already holding this file (a previous attempt may have copied
    it and died before recording it), so a resumed range copies nothing twice."""
    if source.copied_sha256 is not None and source.copied_sha256 == source.sha256:
        return _unchanged(source)  # SUCCESS with the listed checksum: not even read
    try:
        relative = source_path(source.file_uri, root)
        path = root / relative
        try:
            handle = open_under_root(root, relative, source.file_uri)
        except FileNotFoundError:
            raise FileFailed(f"source file missing: {path} (file_id {source.file_id}, file_uri {source.file_uri!r}); "
                             "restore it or fix source_files.file_uri, and the retry schedule copies it") from None
        with handle:
            return _copy_open_file(target, target.key_for(relative), path, handle, source, settings, probe)
    except (FileFailed, SourceRefused) as error:
        return _failed(source, str(error))
    except (ClientError, BotoCoreError) as error:
        return _failed(source, str(_s3_error("upload", f"file_id {source.file_id} ({source.file_uri})", error)))
    except OSError as error:
        return _failed(source, f"reading {source.file_uri} (file_id {source.file_id}) failed: {error}; fix access and retry")


def _failed(source: SourceFile, message: str) -> FileResult:
    return FileResult(source.file_id, source.file_uri, source.file_name, source.create_date, "FAIL", error=message)


def _copy_open_file(target: S3Target, key: str, path: Path, handle: BinaryIO, source: SourceFile,
                    settings: FilesSettings, probe: bool) -> FileResult:
    size = os.fstat(handle.fileno()).st_size
    _check_listing(source, path, size, None)
    data = None
    if size <= min(IN_MEMORY_MAX, settings.multipart_threshold):
        data = handle.read()
        size, sha_hex = len(data), hashlib.sha256(data).hexdigest()
    else:
        size, sha_hex = _hash_file(handle)
    _check_listing(source, path, size, sha_hex)
    if source.copied_sha256 == sha_hex:  # already SUCCESS with this content: nothing to send
        return _unchanged(source)
    existing = _existing_copy(target, key, size, sha_hex) if probe else None
    stored, etag = existing or _upload(target, key, path, handle, data, size, bytes.fromhex(sha_hex), settings)
    return FileResult(source.file_id, source.file_uri, source.file_name, source.create_date, "SUCCESS",
                      target.uri(key), size, sha_hex, stored or None, etag, uploaded=existing is None)
