"""CIDv1 as atproto uses it: base32 text form, binary form (CAR, DAG-CBOR tag 42), block verification.

Hand-written on purpose: atproto needs only CIDv1 with base32 and sha2-256, which is a few varints and
base32 (the text form is libipld's, the project's compiled DAG-CBOR decoder). The generic multiformats
libraries on PyPI (`multiformats`, `py-multiformats-cid`) have had no release since 2022-2023 and
resolve codecs through registries on every parse; this is the hot path of a repo walk (one CID per
block), so a small exact implementation is cheaper and clearer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import libipld

from migration_assets.atproto.errors import AtprotoFormatError

DAG_CBOR = 0x71
RAW = 0x55
SHA2_256 = 0x12
_MAX_VARINT_BYTES = 9  # the multiformats unsigned-varint spec caps varints at 9 bytes (63 bits)


class CidError(AtprotoFormatError):
    """A CID could not be parsed."""


class CidMismatch(AtprotoFormatError):
    """A block's bytes do not hash to the CID it was stored under."""

    def __init__(self, cid: CID, actual: CID) -> None:
        super().__init__(f"block {cid} does not match its bytes (they hash to {actual}); the data is corrupt")
        self.cid = cid
        self.actual = actual


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Read an unsigned LEB128 varint at `pos`; returns (value, position after it). Minimal form only."""
    value = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT_BYTES, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > pos:
                raise CidError(f"non-minimal varint at byte {pos}")
            return value, i + 1
        shift += 7
    if len(data) - pos >= _MAX_VARINT_BYTES:
        raise CidError(f"varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")
    raise CidError(f"varint at byte {pos} is truncated")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class CID:
    """A CIDv1. `codec` is the multicodec of the content, `hash_code` the multihash function."""

    codec: int
    digest: bytes
    hash_code: int = SHA2_256

    @classmethod
    def for_block(cls, data: bytes, codec: int = DAG_CBOR) -> CID:
        """The sha2-256 CID of `data`."""
        return cls(codec, hashlib.sha256(data).digest())

    @classmethod
    def decode(cls, text: str) -> CID:
        """Parse the text form, e.g. `bafyrei...` (base32 lower-case, multibase prefix `b`)."""
        if not text.startswith("b") or text != text.lower():
            raise CidError(f"CID {text!r} is not lower-case base32 (prefix 'b'), the only form atproto uses")
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raise CidError(f"CID {text!r} is not valid base32") from None
        cid = cls.from_bytes(raw)
        if str(cid) != text:  # refuse non-canonical spellings (stray trailing bits) of the same CID
            raise CidError(f"CID {text!r} is not in canonical form")
        return cid

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> CID:
        """Parse a binary CID that spans all of `data`."""
        if (cid := usual_link(data)) is not None:  # fast path: every atproto CID (a link of a decoded block)
            return cid
        cid, end = read_cid(data)
        if end != len(data):
            raise CidError(f"{len(data) - end} stray bytes after CID {cid}")
        return cid

    def __bytes__(self) -> bytes:
        """Binary form: version, codec, multihash."""
        head = (1, self.codec, self.hash_code, len(self.digest))
        prefix = _PREFIX_OF.get(head)
        return (prefix if prefix is not None else b"".join(map(encode_varint, head))) + self.digest

    def __str__(self) -> str:
        try:
            return libipld.encode_cid(bytes(self))  # base32 in Rust: the stdlib's is pure Python in 3.11
        except ValueError:  # a multihash libipld refuses (a digest over 64 bytes)
            return "b" + base64.b32encode(bytes(self)).decode("ascii").lower().rstrip("=")

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    def __reduce__(self) -> tuple:
        # Pickled as a constructor call: half the cost of the frozen dataclass's __getstate__/__setstate__
        # (commit checks send CIDs to worker processes and back, several per event).
        return CID, (self.codec, self.digest, self.hash_code)

    def verify(self, data: bytes | bytearray | memoryview) -> None:
        """Raise CidMismatch unless `data` hashes to this CID."""
        if self.hash_code != SHA2_256:
            raise CidError(f"CID {self} uses multihash 0x{self.hash_code:x}; only sha2-256 can be verified")
        digest = hashlib.sha256(data).digest()
        if digest != self.digest:
            raise CidMismatch(self, CID(self.codec, digest))


CODEC_OF_PREFIX = {bytes((1, codec, SHA2_256, 32)): codec for codec in (DAG_CBOR, RAW)}
_PREFIX_OF = {(1, codec, SHA2_256, 32): prefix for prefix, codec in CODEC_OF_PREFIX.items()}
NOT_A_CID_START = (b"\x00", b"\x01", b"\x12")  # every binary CID starts so (v0: sha2-256; v1)


def usual_link(value: object) -> CID | None:
    """CID-shaped bytes of the usual kind (CIDv1, sha2-256, DAG-CBOR or raw) as a CID; else None. In a
    canonical block decoded by libipld (links and byte strings alike as bytes), such bytes were a link
    where the schema allows one (dagcbor.decode_canonical)."""
    if type(value) is bytes and len(value) == 36:
        codec = CODEC_OF_PREFIX.get(value[:4])
        if codec is not None:
            return CID(codec, value[4:])
    return None


def link_text(link: bytes) -> str:
    """A binary CID's text ("bafy..."), as CID.__str__ writes it, without making a CID (libipld's
    base32, with CID's own for a multihash libipld refuses)."""
    try:
        return libipld.encode_cid(link)
    except ValueError:
        return str(CID.from_bytes(link))


def read_cid(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[CID, int]:
    """Read a binary CIDv1 at `pos` (as in a CAR section); returns (cid, position after it)."""
    prefix = bytes(data[pos : pos + 4])
    codec = CODEC_OF_PREFIX.get(prefix)
    if codec is not None and len(data) >= pos + 36:  # fast path: every atproto CID
        return CID(codec, bytes(data[pos + 4 : pos + 36])), pos + 36
    if prefix[:2] == b"\x12\x20":
        raise CidError("CIDv0 found; atproto uses CIDv1 only")
    version, i = decode_varint(data, pos)
    if version != 1:
        raise CidError(f"unsupported CID version {version}; atproto uses CIDv1")
    codec, i = decode_varint(data, i)
    hash_code, i = decode_varint(data, i)
    size, i = decode_varint(data, i)
    if len(data) < i + size:
        raise CidError(f"CID digest truncated: needs {size} bytes, has {len(data) - i}")
    return CID(codec, bytes(data[i : i + size]), hash_code), i + size


def link_from_tag42(value: object) -> CID:
    """The CID inside a DAG-CBOR tag 42: a byte string of 0x00 (identity multibase) + binary CID."""
    if type(value) is bytes and len(value) == 37 and value[0] == 0:  # fast path: MST nodes hold many
        codec = CODEC_OF_PREFIX.get(value[1:5])
        if codec is not None:
            return CID(codec, value[5:])
    if not isinstance(value, bytes) or not value.startswith(b"\x00"):
        raise CidError("CBOR tag 42 must wrap a byte string starting with 0x00")
    return CID.from_bytes(memoryview(value)[1:])
