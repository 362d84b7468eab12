"""Streaming CAR v1 reader: header roots, then verified (cid, block bytes) pairs, under a hard size cap.

Memory stays at one block plus the read buffer: blocks are handed out one at a time, so only what the
caller keeps (e.g. a dict of blocks for the MST walk) grows. The cap counts bytes pulled from the source,
and a section that claims more than the remaining budget fails before it is buffered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID, CidError, CidMismatch, decode_varint, read_cid
from migration_assets.atproto.errors import AtprotoFormatError

READ_SIZE = 64 * 1024
_VARINT_MAX = 9


class CarError(AtprotoFormatError):
    """The CAR stream is malformed, truncated, or holds a block that does not match its CID."""


class CarTooLarge(CarError):
    """The CAR stream is larger than the caller's cap."""


@runtime_checkable
class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Source:
    """Buffered reader over a file-like object or an iterator of byte chunks, counting toward a cap."""

    def __init__(self, source: Readable | Iterable[bytes], max_size: int) -> None:
        if isinstance(source, Readable):
            reader = source
            self._chunks: Iterator[bytes] = iter(lambda: reader.read(READ_SIZE), b"")
        else:
            self._chunks = iter(source)
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0  # stream offset of self._buf[self._pos], for error messages
        self.pulled = 0
        self.max_size = max_size

    def _fill(self, want: int) -> bool:
        """Buffer at least `want` unread bytes; False if the stream ends first."""
        while len(self._buf) - self._pos < want:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self.pulled += len(chunk)
            if self.pulled > self.max_size:
                raise CarTooLarge(
                    f"CAR is larger than the cap of {self.max_size} bytes; raise the cap or skip this repo"
                )
            if self._pos:  # drop consumed bytes before growing, so the buffer holds one section at most
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += chunk
        return True

    def at_eof(self) -> bool:
        return not self._fill(1)

    def varint(self, what: str) -> int:
        self._fill(_VARINT_MAX)  # may stop short at the end of the stream; decode_varint then says so
        try:
            value, end = decode_varint(self._buf, self._pos)
        except CidError as exc:
            raise CarError(f"bad varint for {what} at byte {self.offset}: {exc}") from None
        self.offset += end - self._pos
        self._pos = end
        return value

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > self.max_size:
            raise CarTooLarge(
                f"{what} at byte {self.offset} claims {size} bytes, past the cap of {self.max_size} bytes; "
                "raise the cap or skip this repo"
            )
        if not self._fill(size):
            have = len(self._buf) - self._pos
            raise CarError(f"CAR truncated: {what} at byte {self.offset} needs {size} bytes, only {have} remain")
        with memoryview(self._buf) as view:  # one copy; the view is released before the buffer resizes
            data = bytes(view[self._pos : self._pos + size])
        self._pos += size
        self.offset += size
        return data


class CarReader:
    """Read a CAR v1 stream: `roots` is read on construction; iterate for (cid, block bytes).

    Every block is checked against its CID (sha2-256); blocks may come in any order or repeated.
    """

    def __init__(self, source: Readable | Iterable[bytes], *, max_size: int) -> None:
        self._src = _Source(source, max_size)
        if self._src.at_eof():
            raise CarError("CAR is empty: no header")
        size = self._src.varint("header length")
        if size == 0:
            raise CarError("CAR header length is 0")
        self.roots: list[CID] = self._decode_header(self._src.take(size, "header"))

    @staticmethod
    def _decode_header(data: bytes) -> list[CID]:
        try:
            header = dagcbor.decode(data)
        except AtprotoFormatError as exc:
            raise CarError(f"CAR header is not DAG-CBOR: {exc}") from None
        version = header.get("version") if isinstance(header, dict) else None
        if version != 1:
            raise CarError(f"unsupported CAR header (version {version!r}); only CAR v1 is read")
        roots = header.get("roots")
        if not isinstance(roots, list) or not roots or not all(isinstance(r, CID) for r in roots):
            raise CarError("CAR header has no valid roots list; expected at least one CID (the commit)")
        return roots

    def __iter__(self) -> Iterator[tuple[CID, bytes]]:
        src = self._src
        while not src.at_eof():
            start = src.offset
            size = src.varint("section length")
            if size == 0:
                raise CarError(f"empty CAR section at byte {start}")
            section = src.take(size, "block")
            try:
                cid, end = read_cid(section)
            except CidError as exc:
                raise CarError(f"bad CID in the section at byte {start}: {exc}") from None
            data = section[end:]
            try:
                cid.verify(data)
            except (CidMismatch, CidError) as exc:
                raise CarError(f"section at byte {start}: {exc}") from None
            yield cid, data
