"""Reading chainstorage's DynamoDB items strictly (reference/chain.md).

Every attribute must have the type chainstorage writes: numbers as N holding an integer, text as S,
`skipped` as BOOL (or N 0/1). Anything else, such as a "false" string that Python would read as true,
makes the item malformed, and the error names the table, the item's key and the attribute. So does a
value its PostgreSQL column can't hold (DynamoDB takes it): an integer past the column's bits, text
longer than its VARCHAR, U+0000 or a lone surrogate. It would otherwise fail the range's COPY with an
error naming only a line of it; a hash is never stored altered.
"""

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from migration_assets.core.postgres import is_storable

_INTEGER = re.compile(r"-?\d+")
HASH_LENGTH = 66  # hash and parent_hash: VARCHAR(66) in chainstorage's schema (0x and 64 hex digits)
OBJECT_KEY_LENGTH = 255  # object_key_main: VARCHAR(255)


class SourceDataError(Exception):
    """The source holds data that cannot be migrated as it is; the message names the item."""


class NothingToRead(SourceDataError):
    """The range lies past the source's watermark: there is nothing in it to read yet."""


class ItemReader:
    """The attributes of one raw DynamoDB item of `table`, read by type. An absent or NULL attribute
    takes the default given; without one it is missing, and the item malformed."""

    def __init__(self, table: str, kind: str, item: dict[str, Any], key: tuple[str, ...]):
        self.table, self.kind, self.item = table, kind, item
        self.key = "/".join(_key_text(item.get(name)) for name in key)

    def malformed(self, problem: str) -> SourceDataError:
        return SourceDataError(
            f"malformed {self.kind} item {self.key} in table {self.table}: {problem}; "
            "fix the item (or its writer), then re-run the range"
        )

    def integer(self, name: str, default: int | None = None, bits: int = 64) -> int:
        """An integer that a signed `bits`-bit column holds (BIGINT: 64, INT: 32)."""
        value = self._value(name, default)
        if isinstance(value, int):
            return value
        kind, raw = value
        if kind != "N" or len(raw) > 21 or not _INTEGER.fullmatch(raw):
            raise self._wrong(name, "an integer (N)", kind, raw)
        number = int(raw)
        if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
            raise self.malformed(f"attribute {name!r} is {number}, past what a {bits}-bit integer column holds")
        return number

    def text(self, name: str, default: str | None = None, max_length: int | None = None) -> str:
        """Text that PostgreSQL holds as it is, at most `max_length` characters (its VARCHAR)."""
        value = self._value(name, default)
        if isinstance(value, str):
            return value
        kind, raw = value
        if kind != "S":
            raise self._wrong(name, "a string (S)", kind, raw)
        if max_length is not None and len(raw) > max_length:
            raise self.malformed(f"attribute {name!r} is {len(raw)} characters, over the {max_length} its column holds")
        if not is_storable(raw):
            raise self.malformed(f"attribute {name!r} holds U+0000 or a lone surrogate, which PostgreSQL text can't hold")
        return raw

    def flag(self, name: str, default: bool | None = None) -> bool:
        value = self._value(name, default)
        if isinstance(value, bool):
            return value
        kind, raw = value
        if kind == "BOOL" and isinstance(raw, bool):
            return raw
        if kind == "N" and raw in ("0", "1"):
            return raw == "1"
        raise self._wrong(name, "a boolean (BOOL, or N 0 or 1)", kind, raw)

    def _value(self, name: str, default: Any) -> Any:
        """The default, or the attribute's (DynamoDB type, raw value)."""
        value = self.item.get(name)
        if value is None or "NULL" in value:
            if default is None:
                raise self.malformed(f"missing attribute {name!r}")
            return default
        if len(value) != 1:
            raise self.malformed(f"attribute {name!r} is not one DynamoDB value: {value!r}")
        return next(iter(value.items()))

    def _wrong(self, name: str, expected: str, kind: str, raw: Any) -> SourceDataError:
        shown = repr(raw) if len(repr(raw)) <= 100 else f"{repr(raw)[:100]}... ({len(repr(raw))} characters)"
        return self.malformed(f"attribute {name!r} must be {expected}, got {kind} {shown}")


class PageKeys:
    """The LastEvaluatedKeys of one Query or Scan: a key that comes back a second time (a proxy or an
    emulator gone wrong; DynamoDB never does) would page round without end, so it raises instead."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._seen: set[str] = set()

    def next(self, page: dict[str, Any]) -> dict[str, Any] | None:
        key = page.get("LastEvaluatedKey")
        if not key:
            return None
        marker = json.dumps(key, sort_keys=True)
        if marker in self._seen:
            raise SourceDataError(f"table {self.table} answered the page key {marker[:200]} a second time: its "
                                  "paging goes round, so the read stops; check the endpoint (AWS_ENDPOINT_URL_DYNAMODB)")
        self._seen.add(marker)
        return key


def pages(call: Callable[..., dict[str, Any]], request: dict[str, Any], table: str) -> Iterator[dict[str, Any]]:
    """Every page of a Query (`call`: client.query), following LastEvaluatedKey (PageKeys)."""
    keys = PageKeys(table)
    while True:
        page = call(**request)
        yield page
        key = keys.next(page)
        if key is None:
            return
        request = {**request, "ExclusiveStartKey": key}


def _key_text(value: dict[str, Any] | None) -> str:
    return "?" if not value else str(next(iter(value.values())))
