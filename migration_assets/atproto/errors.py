"""One base class so callers can record any AT Protocol failure the same way (ledger `last_error`)."""


class AtprotoError(Exception):
    """Any AT Protocol failure: malformed data, identity resolution, XRPC calls, rate-limit waits."""


class AtprotoFormatError(AtprotoError, ValueError):
    """Untrusted AT Protocol data (CID, DAG-CBOR, CAR, MST, commit, key, signature) is malformed or invalid."""
