"""Reading chainstorage's DynamoDB items strictly (reference/chain.md).

Every attribute must have the type chainstorage writes: numbers as N holding an integer, text as S,
`skipped` as BOOL (or N 0/1). Anything else, such as a "false" string that Python would read as true,
makes the item malformed, and the error names the table, the item's key and the attribute.
"""

import re
from typing import Any

_INTEGER = re.compile(r"-?\d+")


class SourceDataError(Exception):
    """The source holds data that cannot be migrated as it is; the message names the item."""


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

    def integer(self, name: str, default: int | None = None) -> int:
        value = self._value(name, default)
        if isinstance(value, int):
            return value
        kind, raw = value
        if kind == "N" and _INTEGER.fullmatch(raw):
            return int(raw)
        raise self._wrong(name, "an integer (N)", kind, raw)

    def text(self, name: str, default: str | None = None) -> str:
        value = self._value(name, default)
        if isinstance(value, str):
            return value
        kind, raw = value
        if kind == "S":
            return raw
        raise self._wrong(name, "a string (S)", kind, raw)

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
        return self.malformed(f"attribute {name!r} must be {expected}, got {kind} {raw!r}")


def _key_text(value: dict[str, Any] | None) -> str:
    return "?" if not value else str(next(iter(value.values())))
