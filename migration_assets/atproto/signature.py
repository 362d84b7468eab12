"""Commit signatures: did:key public keys (secp256k1, P-256) and low-S ECDSA over SHA-256.

secp256k1 signatures (most of the network's keys) are checked with libsecp256k1 through coincurve,
several times faster than OpenSSL's generic code for that curve; P-256 ones with OpenSSL, whose code
for that curve is fast. Both get the same checks first (length, range, low-S)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from migration_assets.atproto import dagcbor
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.mst import CommitError

# Multicodec varint prefixes of compressed public keys (atproto cryptography spec).
_SECP256K1_PREFIX = b"\xe7\x01"  # secp256k1-pub, 0xe7
_P256_PREFIX = b"\x80\x24"  # p256-pub, 0x1200
# Group orders: low-S means s <= n / 2 (atproto rejects the malleable high-S twin of a signature).
_ORDERS = {
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


class DidKeyError(AtprotoFormatError):
    """A did:key or publicKeyMultibase string is not a supported public key."""


class SignatureError(AtprotoFormatError):
    """A signature does not verify, is malformed, or is high-S."""


# base58btc by hand: a dozen lines for short key strings, not worth a dependency (`base58` on PyPI has
# had no release since 2021).
def b58decode(text: str) -> bytes:
    num = 0
    for char in text:
        if char not in _B58_INDEX:
            raise DidKeyError(f"{char!r} is not a base58btc character")
        num = num * 58 + _B58_INDEX[char]
    zeros = len(text) - len(text.lstrip("1"))
    return b"\x00" * zeros + num.to_bytes((num.bit_length() + 7) // 8, "big")


def b58encode(data: bytes) -> str:
    num = int.from_bytes(data, "big")
    out = []
    while num:
        num, rem = divmod(num, 58)
        out.append(_B58[rem])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


@dataclass(frozen=True)
class PublicKey:
    """A repo signing key; `curve` is "secp256k1" or "secp256r1" (P-256)."""

    key: ec.EllipticCurvePublicKey
    _secp256k1: coincurve.PublicKey | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.curve == "secp256k1":
            point = self.key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
            object.__setattr__(self, "_secp256k1", coincurve.PublicKey(point))

    @property
    def curve(self) -> str:
        return self.key.curve.name

    def verifies(self, message: bytes, der_signature: bytes) -> bool:
        """Plain ECDSA over sha256(message) (no low-S check: see `verify_signature`)."""
        if self._secp256k1 is not None:
            return self._secp256k1.verify(der_signature, message)
        try:
            self.key.verify(der_signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def did_key(self) -> str:
        """`did:key:z...` for this key (compressed point with its multicodec prefix)."""
        point = self.key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        prefix = _SECP256K1_PREFIX if self.curve == "secp256k1" else _P256_PREFIX
        return "did:key:z" + b58encode(prefix + point)


@functools.lru_cache(maxsize=100_000)  # a stream checks many commits by the same keys
def parse_did_key(text: str) -> PublicKey:
    """Parse `did:key:zQ3sh...` (secp256k1) or `did:key:zDn...` (P-256), with or without `did:key:`."""
    multibase = text.removeprefix("did:key:")
    if not multibase.startswith("z"):
        raise DidKeyError(f"key {text!r} is not base58btc multibase (prefix 'z')")
    raw = b58decode(multibase[1:])
    prefix, point = raw[:2], raw[2:]
    curve: ec.EllipticCurve
    if prefix == _SECP256K1_PREFIX:
        curve = ec.SECP256K1()
    elif prefix == _P256_PREFIX:
        curve = ec.SECP256R1()
    else:
        raise DidKeyError(f"key {text!r} is neither secp256k1 (0xe7) nor P-256 (0x1200); atproto uses only these")
    if len(point) != 33:
        raise DidKeyError(f"key {text!r} is not a 33-byte compressed point")
    try:
        return PublicKey(ec.EllipticCurvePublicKey.from_encoded_point(curve, point))
    except ValueError:
        raise DidKeyError(f"key {text!r} is not a point on {curve.name}") from None


# Older DID documents (and did-plc servers still in use) name the curve in the method's type and
# give the bare point, compressed or not, with no multicodec prefix.
_LEGACY_KEY_TYPES: dict[str, ec.EllipticCurve] = {
    "EcdsaSecp256k1VerificationKey2019": ec.SECP256K1(),
    "EcdsaSecp256r1VerificationKey2019": ec.SECP256R1(),
}


def parse_verification_method(method_type: str, multibase: str) -> PublicKey:
    """The key of a DID document verification method: `Multikey` (multicodec-prefixed, as did:key)
    or a legacy `EcdsaSecp256{k,r}1VerificationKey2019` (bare point)."""
    curve = _LEGACY_KEY_TYPES.get(method_type)
    if curve is None:
        return parse_did_key(multibase)
    if not multibase.startswith("z"):
        raise DidKeyError(f"key {multibase!r} is not base58btc multibase (prefix 'z')")
    try:
        return PublicKey(ec.EllipticCurvePublicKey.from_encoded_point(curve, b58decode(multibase[1:])))
    except ValueError:
        raise DidKeyError(f"{method_type} key {multibase!r} is not a point on {curve.name}") from None


def verify_signature(key: PublicKey | str, message: bytes, sig: bytes) -> None:
    """Check a compact (r||s, 64 bytes) low-S ECDSA signature over sha256(message); raise SignatureError."""
    public = parse_did_key(key) if isinstance(key, str) else key
    if len(sig) != 64:
        raise SignatureError(f"signature is {len(sig)} bytes; atproto signatures are 64 (r||s)")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    order = _ORDERS[public.curve]
    if not (0 < r < order and 0 < s < order):
        raise SignatureError("signature r or s is out of range")
    if s > order // 2:
        raise SignatureError("signature is high-S; atproto requires low-S signatures")
    if not public.verifies(message, encode_dss_signature(r, s)):
        raise SignatureError(f"signature does not verify against {public.curve} key {public.did_key()}")


def unsigned_commit_bytes(commit_block: bytes) -> tuple[bytes, bytes]:
    """(DAG-CBOR of the commit without `sig`, sig): what the repo's signing key signed."""
    obj = dagcbor.decode(commit_block)
    if not isinstance(obj, dict) or not isinstance(obj.get("sig"), bytes):
        raise CommitError("commit has no `sig` bytes")
    sig = obj.pop("sig")
    return dagcbor.encode(obj), sig


def verify_commit(commit_block: bytes, key: PublicKey | str, *, signed: tuple[bytes, bytes] | None = None) -> None:
    """Verify a commit block's signature against the DID document's `#atproto` key. `signed`: what
    unsigned_commit_bytes would return, when the caller has it already (mst.parse_signed_commit).

    Raises SignatureError naming the key; the caller should re-resolve the DID (the key may have been
    rotated: only the latest commit is sure to verify against the current key).
    """
    message, sig = signed if signed is not None else unsigned_commit_bytes(commit_block)
    try:
        verify_signature(key, message, sig)
    except SignatureError as exc:
        hint = "if the repo's key was rotated, re-resolve the DID document and verify the latest commit"
        raise SignatureError(f"commit signature rejected: {exc}; {hint}") from None
