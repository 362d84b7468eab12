"""Streaming CAR v1 reader: header roots, then verified (cid, block bytes) pairs, under a hard size cap.

Memory stays at one block plus the read buffer: blocks are handed out one at a time, so only what the
caller keeps (e.g. a dict of blocks for the MST walk) grows. The cap counts bytes pulled from the source,
and a section that claims more than the remaining budget fails before it is buffered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CODEC_OF_PREFIX, CID, CidError, CidMismatch, decode_varint, read_cid, usual_link
from migration_assets.atproto.compiled import fastrepo as _fastrepo
from migration_assets.atproto.errors import AtprotoFormatError

READ_SIZE = 64 * 1024
_VARINT_MAX = 9
_FAST_BYTES = 1 << 20  # blocks read by compiled code per call: a buffer holding a whole CAR is not one list


class CarError(AtprotoFormatError):
    """The CAR stream is malformed, truncated, or holds a block that does not match its CID."""


class CarTooLarge(CarError):
    """The CAR stream is larger than the caller's cap."""


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Source:
    """Buffered reader over a file-like object or an iterator of byte chunks, counting toward a cap.

    The buffer is immutable `bytes`, so a block is one slice (one copy) of it; a refill joins the unread
    rest with as many chunks as needed in one go, so a block spanning many chunks is copied once."""

    def __init__(self, source: Readable | Iterable[bytes], max_size: int) -> None:
        if hasattr(source, "read"):  # a file-like object (isinstance on a runtime Protocol costs ~20 us)
            reader = source
            self._chunks: Iterator[bytes] = iter(lambda: reader.read(READ_SIZE), b"")
        else:
            self._chunks = iter(source)
        self.buf = b""
        self.pos = 0
        self.offset = 0  # stream offset of self.buf[self.pos], for error messages
        self.pulled = 0
        self.max_size = max_size

    def fill(self, want: int) -> bool:
        """Buffer at least `want` unread bytes; False if the stream ends first."""
        have = len(self.buf) - self.pos
        if have >= want:
            return True
        parts = [self.buf[self.pos :]]
        while have < want:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self.pulled += len(chunk)
            if self.pulled > self.max_size:
                raise CarTooLarge(
                    f"CAR is larger than the cap of {self.max_size} bytes; raise the cap or skip this repo"
                )
            parts.append(bytes(chunk))
            have += len(chunk)
        self.buf, self.pos = b"".join(parts), 0
        return have >= want

    def varint(self, what: str) -> int:
        buf, pos = self.buf, self.pos
        if pos + 1 < len(buf) and buf[pos] < 0x80:  # fast paths: the one- and two-byte varints of blocks
            value, end = buf[pos], pos + 1
        elif pos + 1 < len(buf) and 0 < buf[pos + 1] < 0x80:
            value, end = (buf[pos] & 0x7F) | (buf[pos + 1] << 7), pos + 2
        else:
            self.fill(_VARINT_MAX)  # may stop short at the end of the stream; decode_varint then says so
            try:
                value, end = decode_varint(self.buf, self.pos)
            except CidError as exc:
                raise CarError(f"bad varint for {what} at byte {self.offset}: {exc}") from None
        self.offset += end - self.pos
        self.pos = end
        return value

    def need(self, size: int, what: str) -> None:
        """Make the next `size` bytes readable at self.buf[self.pos:], or fail (cap, truncation)."""
        if self.offset + size > self.max_size:
            raise CarTooLarge(
                f"{what} at byte {self.offset} claims {size} bytes, past the cap of {self.max_size} bytes; "
                "raise the cap or skip this repo"
            )
        if not self.fill(size):
            have = len(self.buf) - self.pos
            raise CarError(f"CAR truncated: {what} at byte {self.offset} needs {size} bytes, only {have} remain")

    def section(self) -> tuple[bytes, int, int]:
        """Buffer the next CAR section whole: (buffer, where the section starts after its length,
        where it ends). Most sections are buffered already and have a one- or two-byte length: those
        are found here, without varint() and need(). An empty section, the cap and truncation raise."""
        buf, pos = self.buf, self.pos
        size = buf[pos]
        if size < 0x80:
            begin = pos + 1
        elif pos + 1 < len(buf) and 0 < buf[pos + 1] < 0x80:
            size, begin = (size & 0x7F) | (buf[pos + 1] << 7), pos + 2
        else:
            begin = len(buf)  # a longer length: the general way
        if size and begin + size <= len(buf):  # within what was pulled, so within the cap too
            return buf, begin, begin + size
        start = self.offset
        size = self.varint("section length")
        if size == 0:
            raise CarError(f"empty CAR section at byte {start}")
        self.need(size, "block")
        return self.buf, self.pos, self.pos + size

    def skip(self, size: int) -> None:
        self.pos += size
        self.offset += size

    def take(self, size: int, what: str) -> bytes:
        self.need(size, what)
        data = self.buf[self.pos : self.pos + size]
        self.skip(size)
        return data


class CarReader:
    """Read a CAR v1 stream: `roots` is read on construction; iterate for (cid, block bytes).

    Every block is checked against its CID (sha2-256); blocks may come in any order or repeated.
    """

    def __init__(self, source: Readable | Iterable[bytes], *, max_size: int) -> None:
        self._src = _Source(source, max_size)
        if not self._src.fill(1):
            raise CarError("CAR is empty: no header")
        size = self._src.varint("header length")
        if size == 0:
            raise CarError("CAR header length is 0")
        self.roots: list[CID] = self._decode_header(self._src.take(size, "header"))

    @staticmethod
    def _decode_header(data: bytes) -> list[CID]:
        roots = _usual_roots(data)
        if roots is not None:
            return roots
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
        for link, data in self.links():
            yield CID.from_bytes(link), data

    def links(self) -> Iterator[tuple[bytes, bytes]]:
        """(binary CID, block) of each block: the CID as bytes, which costs no CID object (a repo's
        parse keys its blocks by these)."""
        # The hot loop of a repo sync (one pass per block): locals only, one slice per block. Compiled
        # code reads the buffered sections of the usual kind; this loop, the reference, reads the next one
        # it leaves (cut short by the buffer's end, or unusual: it decides and words the error).
        src, sha256, prefixes, fast = self._src, hashlib.sha256, CODEC_OF_PREFIX, _fastrepo
        while src.fill(1):
            if fast is not None:
                found, end = fast.sections(src.buf, src.pos, _FAST_BYTES)
                if found:
                    src.skip(end - src.pos)
                    yield from found
                    continue
            start = src.offset
            buf, begin, end = src.section()
            src.skip(end - src.pos)
            if end - begin >= 36 and buf[begin:begin + 4] in prefixes:  # every atproto block: CIDv1, sha2-256
                link, data = buf[begin:begin + 36], buf[begin + 36:end]
                if sha256(data).digest() == link[4:]:
                    yield link, data
                    continue
                cid = CID.from_bytes(link)
            else:
                cid, data = _read_section(buf[begin:end], start)
                link = bytes(cid)
            try:
                cid.verify(data)
            except (CidMismatch, CidError) as exc:
                raise CarError(f"section at byte {start}: {exc}") from None
            yield link, data


def _read_section(section: bytes, start: int) -> tuple[CID, bytes]:
    try:
        cid, end = read_cid(section)
    except CidError as exc:
        raise CarError(f"bad CID in the section at byte {start}: {exc}") from None
    return cid, section[end:]


_HEADER_KEYS = {"roots", "version"}


def _usual_roots(header: bytes) -> list[CID] | None:
    """The roots of a CAR header of the usual shape ({version: 1, roots: [links of the usual kind]},
    canonical) through libipld; None to leave it to the reference decoding, which decides and words it.
    A canonical block holds a link exactly where its value holds CID-shaped bytes (decode_canonical)."""
    value = dagcbor.decode_canonical(header)
    if (type(value) is not dict or value.keys() != _HEADER_KEYS or type(value["version"]) is not int
            or value["version"] != 1 or type(value["roots"]) is not list or not value["roots"]):
        return None
    roots = [usual_link(root) for root in value["roots"]]
    return None if None in roots else roots


def read_blocks(data: bytes, *, max_size: int) -> dict[bytes, bytes]:
    """{binary CID: block} of a CAR held in memory (a stream event's slice), as
    `dict(CarReader(iter([data]), max_size=max_size).links())` reads it, in one call of compiled code
    (atproto/_fastrepo.c) for the usual header (one root), CIDs and section lengths. Anything else,
    including every error, is left to CarReader, which decides and words it, so both accept and refuse
    the same bytes alike. No CID object is made: a link's bytes are its key."""
    blocks = _fastrepo.blocks(data) if _fastrepo is not None and len(data) <= max_size else None
    return blocks if blocks is not None else dict(CarReader(iter([data]), max_size=max_size).links())
