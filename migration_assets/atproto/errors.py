"""One base class so callers can record any malformed-repo failure the same way (ledger `last_error`)."""


class AtprotoFormatError(ValueError):
    """Untrusted AT Protocol data (CID, DAG-CBOR, CAR, MST, commit, key, signature) is malformed or invalid."""
