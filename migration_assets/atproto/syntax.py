"""AT Protocol string syntax (atproto.com/specs): what a host may name, checked where the project takes
it in (repo exports, the event stream, listRepos) before it reaches PostgreSQL, so a hostile name fails
its own item rather than the statement, the batch or the run that would write it.

- NSID (/specs/nsid): a reversed domain of at least two segments, then a name (letters and digits, not
  starting with a digit); 317 characters at most.
- Record key (/specs/record-key): 1-512 of [A-Za-z0-9._~:-], but not "." or "..".
- DID (/specs/did): `did:`, a lower-case method, `:`, then [a-zA-Z0-9._:%-] not ending in `:` or `%`;
  2 KB at most.
- TID (/specs/tid): 13 characters of base32-sortable, the first at most `j` (a rev, a `since`).
"""

import re

NSID_PATTERN = (
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
NSID_MAX = 317
RECORD_KEY_PATTERN = r"[A-Za-z0-9._~:-]{1,512}"
DID_PATTERN = r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]"
DID_MAX = 2048
TID_PATTERN = r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}"

_NSID, _RECORD_KEY = re.compile(NSID_PATTERN), re.compile(RECORD_KEY_PATTERN)
_DID, _TID = re.compile(DID_PATTERN), re.compile(TID_PATTERN)


def is_valid_nsid(text: str) -> bool:
    return len(text) <= NSID_MAX and _NSID.fullmatch(text) is not None


def is_valid_record_key(text: str) -> bool:
    return text not in (".", "..") and _RECORD_KEY.fullmatch(text) is not None


def is_did(value: object) -> bool:
    return type(value) is str and len(value) <= DID_MAX and _DID.fullmatch(value) is not None


def is_tid(value: object) -> bool:
    return type(value) is str and _TID.fullmatch(value) is not None
