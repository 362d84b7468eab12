"""A `com.atproto.sync.subscribeRepos` client: read a host's (a PDS's or a relay's) event stream from a
cursor and yield typed events.

Each WebSocket frame is two DAG-CBOR values: a header `{op, t}` (op 1: a message of type `t`; op -1:
an error) and a body. Bodies are decoded with the project's strict DAG-CBOR decoder and checked into
pydantic models here, at the boundary; message types this client does not know are skipped (the
spec lets hosts add them). Pure core: no Dagster, no database.
"""

from __future__ import annotations

import io
import time
from contextlib import ExitStack
from typing import Annotated, Literal, Union

import cbor2
import libipld
from pydantic import (
    AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictBytes, StrictStr, StringConstraints,
    ValidationError,
)
from websockets.exceptions import WebSocketException
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from migration_assets.atproto import dagcbor
from migration_assets.atproto.cid import CID, NOT_A_CID_START, usual_link
from migration_assets.atproto.errors import AtprotoFormatError
from migration_assets.atproto.syntax import DID_MAX, DID_PATTERN, TID_PATTERN

NSID = "com.atproto.sync.subscribeRepos"
MAX_FRAME_BYTES = 8 * 1024 * 1024  # a #commit's blocks are capped far below this by hosts


class StreamFormatError(AtprotoFormatError):
    """A frame is not a valid subscribeRepos message."""


class StreamError(Exception):
    """The host sent an error frame (FutureCursor, ConsumerTooSlow, ...) or refused the subscription."""

    def __init__(self, host: str, error: str, message: str = "") -> None:
        super().__init__(f"{host} subscribeRepos: {error}{': ' + message if message else ''}")
        self.host, self.error = host, error


# What an event names is checked against the AT Protocol syntax (atproto/syntax.py) here, at the boundary:
# the follower writes it to PostgreSQL, where a DID with U+0000 or a seq past bigint would fail the whole
# batch, and every run after it, at the same frame. An account status is a short word (the lexicon's
# values are open: deactivated, takendown, ...).
Did = Annotated[str, StringConstraints(strict=True, max_length=DID_MAX, pattern=f"^{DID_PATTERN}$")]
Tid = Annotated[str, StringConstraints(strict=True, pattern=f"^{TID_PATTERN}$")]
Seq = Annotated[int, Field(strict=True, ge=0, lt=1 << 63)]
_Status = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-zA-Z][a-zA-Z0-9_-]{0,63}$")]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="ignore")


class RepoOp(_Event):
    action: Literal["create", "update", "delete"]
    path: StrictStr
    cid: CID | None = None
    prev: CID | None = None

    @property
    def collection_rkey(self) -> tuple[str, str]:
        collection, _, rkey = self.path.partition("/")
        return collection, rkey


class CommitEvent(_Event):
    type: Literal["#commit"] = "#commit"
    seq: Seq
    repo: Did
    rev: Tid
    since: Tid | None = None
    commit: CID
    blocks: StrictBytes  # a CAR slice: the new commit, changed MST nodes and the new records
    ops: list[RepoOp]
    too_big: StrictBool = Field(default=False, alias="tooBig")
    prev_data: CID | None = Field(default=None, alias="prevData")
    time: AwareDatetime  # with its zone, as atproto datetimes are: the lag is measured against UTC


class SyncEvent(_Event):
    type: Literal["#sync"] = "#sync"
    seq: Seq
    did: Did
    rev: Tid
    blocks: StrictBytes
    time: AwareDatetime


class IdentityEvent(_Event):
    type: Literal["#identity"] = "#identity"
    seq: Seq
    did: Did
    handle: str | None = None
    time: AwareDatetime


class AccountEvent(_Event):
    type: Literal["#account"] = "#account"
    seq: Seq
    did: Did
    active: StrictBool
    status: _Status | None = None
    time: AwareDatetime


class InfoEvent(_Event):
    """Not sequenced: `OutdatedCursor` says the cursor is older than the host keeps."""

    type: Literal["#info"] = "#info"
    name: StrictStr
    message: str | None = None


StreamEvent = Union[CommitEvent, SyncEvent, IdentityEvent, AccountEvent, InfoEvent]
_MODELS: dict[str, type[_Event]] = {
    "#commit": CommitEvent, "#sync": SyncEvent, "#identity": IdentityEvent, "#account": AccountEvent, "#info": InfoEvent,
}


def _split_frame(frame: bytes) -> tuple[object, bytes]:
    """(decoded header, body bytes). read_size=1 keeps the file position exactly after the header."""
    source = io.BytesIO(frame)
    try:
        cbor2.CBORDecoder(source, read_size=1).decode()
    except cbor2.CBORDecodeError as exc:
        raise StreamFormatError(f"frame header is not CBOR: {exc}") from None
    end = source.tell()
    return dagcbor.decode(frame[:end]), frame[end:]


_COMMIT_HEADER = {"op": 1, "t": "#commit"}
_NONE = type(None)
_COMMIT_FIELDS = {  # the #commit lexicon's fields and the Python types libipld decodes them to
    "blobs": {list}, "blocks": {bytes}, "commit": {bytes}, "ops": {list}, "prevData": {bytes, _NONE},
    "rebase": {bool}, "repo": {str}, "rev": {str}, "seq": {int}, "since": {str, _NONE}, "time": {str}, "tooBig": {bool},
}
_OP_FIELDS = {"action", "cid", "path", "prev"}


def _compiled_commit_frame(frame: bytes) -> tuple[dict, dict] | None:
    """A #commit frame's header and body through libipld, as the reference decoding (_split_frame, then
    dagcbor.decode) gives them; None to leave the frame to that. libipld returns links and byte strings
    alike as bytes; a frame that is the canonical encoding of its two values holds a link exactly where
    they hold CID-shaped bytes (dagcbor.decode_canonical), so with every field of the lexicon's type
    (and no other field) the links are known: `commit`, `prevData`, `blobs`' items, the ops' `cid` and
    `prev`, each a CID of the usual kind; and `blocks`, which must not look like a CID, is bytes."""
    try:
        values = libipld.decode_dag_cbor_multi(frame)
        if len(values) != 2 or values[0] != _COMMIT_HEADER or type(values[0]["op"]) is not int:
            return None
        header, body = values
        if libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body) != frame:
            return None
    except Exception:  # noqa: BLE001 - ValueError, RecursionError: the reference decides and explains
        return None
    if type(body) is not dict:
        return None
    for name, value in body.items():  # known fields of known types: no bytes where a link could be
        kinds = _COMMIT_FIELDS.get(name)
        if kinds is None or type(value) not in kinds:
            return None
    if body.get("blocks", b"")[:1] in NOT_A_CID_START:
        return None
    for op in body.get("ops", ()):
        if type(op) is not dict or not op.keys() <= _OP_FIELDS:
            return None
        for name, value in op.items():
            if name == "action" or name == "path":
                if type(value) is not str:
                    return None
            elif value is not None:
                if (cid := usual_link(value)) is None:
                    return None
                op[name] = cid
    for name in ("commit", "prevData"):
        if (value := body.get(name)) is not None:
            if (cid := usual_link(value)) is None:
                return None
            body[name] = cid
    if "blobs" in body:
        links = [usual_link(item) for item in body["blobs"]]
        if None in links:
            return None
        body["blobs"] = links
    return header, body


def decode_frame(frame: bytes, host: str = "") -> StreamEvent | None:
    """One frame as a typed event; None for a message type this client does not know. An error frame
    raises StreamError; a malformed one StreamFormatError."""
    if not isinstance(frame, bytes):
        raise StreamFormatError("a text frame on subscribeRepos; only binary DAG-CBOR frames are valid")
    compiled = _compiled_commit_frame(frame)  # most frames: #commit, decoded about 4 times faster
    if compiled is not None:
        header, body = compiled
    else:
        try:
            header, body_bytes = _split_frame(frame)
            body = dagcbor.decode(body_bytes)
        except dagcbor.DagCborError as exc:
            raise StreamFormatError(f"frame is not two DAG-CBOR values: {exc}") from None
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise StreamFormatError("frame header and body must be DAG-CBOR maps")
    if header.get("op") == -1:
        raise StreamError(host, str(body.get("error", "unknown")), str(body.get("message") or ""))
    if header.get("op") != 1 or not isinstance(header.get("t"), str):
        raise StreamFormatError(f"frame header {header!r} is neither a message (op 1 with t) nor an error")
    model = _MODELS.get(header["t"])
    if model is None:
        return None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise StreamFormatError(f"{header['t']} message does not match the lexicon: {exc}") from None


def frame_too_big(error: BaseException) -> bool:
    """Whether the connection closed because a frame was over MAX_FRAME_BYTES (we closed it with 1009)."""
    sent = getattr(error, "sent", None)
    return isinstance(error, WebSocketException) and sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG


def websocket_url(host: str, cursor: int | None) -> str:
    base = host.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}/xrpc/{NSID}" + (f"?cursor={cursor}" if cursor is not None else "")


class Subscription:
    """One connection to a host's stream from `cursor` (the last seq already applied; None: live only).
    Up to `max_queue` frames are read ahead while the caller is busy (past that, the host waits).
    `next(timeout)` returns the next event, None when `timeout` passed first; raises WebSocketException
    (ConnectionClosed) when the host hung up: reconnect from the stored cursor."""

    def __init__(self, host: str, cursor: int | None, open_timeout: float = 30.0, max_queue: int = 16) -> None:
        self.host = host
        self.malformed = 0  # frames skipped because they don't decode (one bad frame fails only itself)
        self.last_problem: str | None = None
        self._resources = ExitStack()
        self._ws: ClientConnection = self._resources.enter_context(connect(
            websocket_url(host, cursor), open_timeout=open_timeout, max_size=MAX_FRAME_BYTES,
            max_queue=max_queue, user_agent_header="migration-assets",
        ))

    def next(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event; None once `timeout` has passed, also while frames that are skipped (malformed,
        or of a type this client does not know) keep coming: a flood of them can't hold the caller."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frame = self._ws.recv(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None
            try:
                event = decode_frame(frame, self.host)
            except StreamFormatError as exc:
                self.malformed += 1
                self.last_problem = str(exc)
                continue
            if event is not None:
                return event
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        self._resources.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "AccountEvent", "CommitEvent", "IdentityEvent", "InfoEvent", "RepoOp", "StreamError",
    "StreamEvent", "StreamFormatError", "Subscription", "SyncEvent", "WebSocketException", "decode_frame",
    "frame_too_big", "websocket_url",
]
