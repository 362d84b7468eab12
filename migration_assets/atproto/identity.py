"""DID resolution (did:plc, did:web) to the two facts a backfill needs: the PDS endpoint and the signing key.

DID documents are untrusted input: the document must name the DID we asked for, the PDS endpoint must be
an http(s) origin, the `#atproto` key must parse as a secp256k1/P-256 key. A fetch has a whole-request
deadline and a size cap (a host dripping bytes holds no thread). did:web hosts go through the same
private-host guard as XRPC calls; the PLC directory is operator configuration and is trusted. Every
fetch takes a token from the shared per-host rate limiter, as XRPC calls do.

Caching: a document is reused for `identity_ttl_seconds`. Callers re-resolve when what they did with it
failed in a way a stale document explains (the signature does not verify: the key rotated; the PDS no
longer has the repo: the account moved): `resolve(did, fresh=True)` or `invalidate(did)`. With a
`StoredDocuments`, the cache is shared through PostgreSQL by every process: what a backfill run resolved,
the stream follower after it reuses, and so does the next follower run; an invalidation reaches them all.
A backfill stores a fetched document in the transaction of the repo it synced (`resolve(save=False)`,
`save_fetched`), not in one of its own: a transaction less per repo. Until a repo is stored with it
(one that failed leaves it waiting for the retry), only this process has it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httpx
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from migration_assets.atproto.deadline import Deadline, DeadlineBackend, within
from migration_assets.atproto.errors import AtprotoError
from migration_assets.atproto.ratelimit import LimiterWaitExceeded, pause_end
from migration_assets.atproto.settings import AtprotoSettings
from migration_assets.atproto.signature import DidKeyError, PublicKey, parse_did_key, parse_verification_method
from migration_assets.atproto.xrpc import (
    ALLOW_PRIVATE_ENV,
    DeadlineTransport,
    PrivateHostRefused,
    RateLimited,
    ReplyTooLarge,
    guarded_http_client,
    host_key,
    read_at_most,
    send_following,
    untrusted_json,
)
from migration_assets.core.backoff import Backoff
from migration_assets.core.postgres import storable

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from migration_assets.atproto.ratelimit import HostRateLimiter

_PLC_DID = re.compile(r"^did:plc:[a-z2-7]{24}$")
_WEB_DID = re.compile(r"^did:web:[A-Za-z0-9.\-]+(%3[Aa][0-9]{1,5})?$")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1"}


class IdentityError(AtprotoError):
    """Resolving `did` failed."""

    def __init__(self, did: str, message: str) -> None:
        super().__init__(f"{did}: {message}")
        self.did = did
        self.detail = message

    def __reduce__(self):
        return (type(self), (self.did, self.detail))


class InvalidDid(IdentityError, ValueError):
    """Not a DID we can resolve (malformed, or did:web with a path)."""


class UnsupportedDidMethod(IdentityError):
    """A DID method other than plc and web."""


class DidNotFound(IdentityError):
    """The directory or host has no document for the DID (404)."""


class DidTombstoned(IdentityError):
    """The DID was deleted (PLC answers 410)."""


class InvalidDidDocument(IdentityError):
    """The document is malformed or lacks the PDS service / #atproto key; the message says what."""


class DidResolutionFailed(IdentityError):
    """The directory or host could not be reached, answered with an unexpected status, or took longer
    than the deadline (transient)."""


class DidDocument(BaseModel):
    """The atproto view of a DID document."""

    id: str
    also_known_as: list[str] = Field(default_factory=list)
    pds_endpoint: str
    signing_key: str  # publicKeyMultibase of the #atproto verification method ("z...")

    @property
    def handle(self) -> str | None:
        """The claimed handle (first at:// alias); unverified."""
        for alias in self.also_known_as:
            if alias.startswith("at://"):
                return alias.removeprefix("at://")
        return None

    def public_key(self) -> PublicKey:
        return parse_did_key(self.signing_key)


# --- raw W3C document (only the fields atproto uses) ---


class _VerificationMethod(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: str = ""
    publicKeyMultibase: str | None = None


class _Service(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: str | list[str] = ""
    serviceEndpoint: str | dict | list


class _RawDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    alsoKnownAs: list[str] = Field(default_factory=list)
    verificationMethod: list[_VerificationMethod] = Field(default_factory=list)
    service: list[_Service] = Field(default_factory=list)


def _matches_fragment(item_id: str, did: str, fragment: str) -> bool:
    return item_id == fragment or item_id == did + fragment


def parse_document(did: str, raw: object, *, allow_http_endpoint: bool = False) -> DidDocument:
    """Validate a fetched document for `did`; InvalidDidDocument says what is wrong."""
    try:
        doc = _RawDocument.model_validate(raw)
    except ValidationError as exc:
        raise InvalidDidDocument(did, f"not a DID document: {_first_error(exc)}") from None
    if doc.id != did:
        raise InvalidDidDocument(did, f"document is for {doc.id!r}, not the DID requested")
    if any(storable(alias) != alias for alias in doc.alsoKnownAs):  # no handle or URI holds these
        raise InvalidDidDocument(did, "an alsoKnownAs entry contains U+0000 or a lone surrogate, which jsonb "
                                      "can't store")
    return DidDocument(
        id=doc.id,
        also_known_as=doc.alsoKnownAs,
        pds_endpoint=_pds_endpoint(did, doc, allow_http_endpoint),
        signing_key=_signing_key(did, doc),
    )


def _pds_endpoint(did: str, doc: _RawDocument, allow_http: bool) -> str:
    for service in doc.service:
        if not _matches_fragment(service.id, did, "#atproto_pds"):
            continue
        if service.type != "AtprotoPersonalDataServer":
            raise InvalidDidDocument(did, f"#atproto_pds has type {service.type!r}, not AtprotoPersonalDataServer")
        endpoint = service.serviceEndpoint
        if not isinstance(endpoint, str):
            raise InvalidDidDocument(did, "#atproto_pds serviceEndpoint is not a URL string")
        try:
            url = httpx.URL(endpoint)
        except httpx.InvalidURL:
            raise InvalidDidDocument(did, f"#atproto_pds endpoint {endpoint!r} is not a URL") from None
        schemes = ("https", "http") if allow_http else ("https",)
        if url.scheme not in schemes or not url.host or url.query or url.path not in ("", "/"):
            raise InvalidDidDocument(did, f"#atproto_pds endpoint {endpoint!r:.300} is not an {'/'.join(schemes)} origin")
        if len(url.host) > 253 or url.userinfo or url.fragment:  # a DNS name's limit; the host keys rate limits
            raise InvalidDidDocument(did, f"#atproto_pds endpoint {endpoint!r:.300} is not a plain origin (a host "
                                          "name of at most 253 characters, no user or fragment)")
        return endpoint.rstrip("/")
    raise InvalidDidDocument(did, "no #atproto_pds service of type AtprotoPersonalDataServer: the DID has no PDS")


def _signing_key(did: str, doc: _RawDocument) -> str:
    for method in doc.verificationMethod:
        if not _matches_fragment(method.id, did, "#atproto"):
            continue
        if not method.publicKeyMultibase:
            raise InvalidDidDocument(did, "#atproto verification method has no publicKeyMultibase")
        try:
            key = parse_verification_method(method.type, method.publicKeyMultibase)
        except DidKeyError as exc:
            raise InvalidDidDocument(did, f"#atproto key: {exc}") from None
        return key.did_key().removeprefix("did:key:")  # one form for every document format
    raise InvalidDidDocument(did, "no #atproto verification method: the repo signing key is unknown")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}"


class StoredDocuments:
    """Resolved DID documents in PostgreSQL (`did_documents`, with when they were resolved), shared by
    every process that resolves with them."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def load(self, dids: list[str], max_age_seconds: float) -> dict[str, tuple[DidDocument, float]]:
        """{did: (document, seconds since it was resolved)} of those resolved less than `max_age_seconds` ago."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT did, document, extract(epoch FROM now() - resolved_at)::float8 FROM did_documents"
                " WHERE did = ANY(%s) AND resolved_at > now() - make_interval(secs => %s)",
                (dids, max_age_seconds)).fetchall()
        return {did: (DidDocument.model_validate(document), age) for did, document, age in rows}

    def save(self, did: str, document: DidDocument) -> None:
        with self.pool.connection() as conn:
            self.save_in(conn, did, document)

    @staticmethod
    def save_in(conn: psycopg.Connection, did: str, document: DidDocument, age: float = 0.0) -> None:
        """Save in the caller's transaction (it commits), as resolved `age` seconds ago."""
        conn.execute("INSERT INTO did_documents (did, document, resolved_at) VALUES (%s, %s,"
                     " now() - make_interval(secs => %s)) ON CONFLICT (did) DO UPDATE"
                     " SET document = excluded.document, resolved_at = excluded.resolved_at",
                     (did, Jsonb(document.model_dump()), age))

    def forget(self, did: str) -> None:
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM did_documents WHERE did = %s", (did,))


class IdentityResolver:
    """Resolves and caches DID documents (see the module docstring). Thread-safe. Arguments left None come
    from AtprotoSettings (ATPROTO_*)."""

    def __init__(self, plc_url: str | None = None, ttl_seconds: float | None = None,
                 allow_private_hosts: bool | None = None, *, limiter: HostRateLimiter | None = None,
                 max_rate_limit_wait: float = 60.0, deadline_seconds: float | None = None,
                 max_document_bytes: int | None = None, retries: int = 2,
                 settings: AtprotoSettings | None = None, store: StoredDocuments | None = None) -> None:
        settings = settings or AtprotoSettings.load()
        self.plc_url = (plc_url or settings.plc_url).rstrip("/")
        self.ttl_seconds = settings.identity_ttl_seconds if ttl_seconds is None else ttl_seconds
        self.deadline_seconds = deadline_seconds or settings.did_fetch_deadline_seconds
        self.max_document_bytes = max_document_bytes or settings.did_document_max_bytes
        self.settings = settings
        self.limiter = limiter
        self.max_rate_limit_wait = max_rate_limit_wait
        self.retries = retries
        self._backoff = Backoff(base=0.5, cap=5.0, floor=0.5)
        self._allow_private = settings.allow_private_hosts if allow_private_hosts is None else allow_private_hosts
        # Both keep each fetch to its whole deadline (atproto.deadline), however the host drips its answer.
        self._web = guarded_http_client(timeout=self.deadline_seconds, allow_private=self._allow_private,
                                        user_agent="migration-assets")
        self._plc = httpx.Client(timeout=httpx.Timeout(self.deadline_seconds), trust_env=False, follow_redirects=False,
                                 transport=DeadlineTransport(DeadlineBackend()))
        self._cache: dict[str, tuple[float, DidDocument]] = {}
        self._lock = threading.Lock()
        self.store = store if self.ttl_seconds > 0 else None  # a TTL of 0 caches nothing, here or there
        self._unstored: set[str] = set()  # asked of the store by `load` and not there: fetched without asking again
        # fetched by resolve(save=False) and not stored yet, with when (monotonic): for save_fetched
        self._unsaved: dict[str, tuple[DidDocument, float]] = {}

    def close(self) -> None:
        self._web.close()
        self._plc.close()

    def __enter__(self) -> IdentityResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, did: str, *, fresh: bool = False, save: bool = True) -> DidDocument:
        """The DID's document: from the cache (this process's, else the stored one) while its TTL lasts,
        else (or with `fresh`) fetched again and stored. With `save=False` a fetched document waits for
        `save_fetched` instead: the caller stores it in the transaction that records what it verified
        (a backfill's repo), rather than in a transaction of its own; until then it is served from this
        process's cache only."""
        if not fresh:
            cached = self.cached(did)
            if cached is None and did not in self._unstored:
                cached = self.load([did]).get(did)
            if cached is not None:
                return cached
        document = self._resolve_uncached(did)
        self._remember(did, document, age=0.0)
        if self.store is None:
            return document
        with self._lock:  # a newer document than one waiting replaces it, stored or waiting in its turn
            self._unsaved.pop(did, None)
            if not save:
                self._unsaved[did] = (document, time.monotonic())
        if save:
            self.store.save(did, document)
        return document

    def save_fetched(self, conn: psycopg.Connection, did: str) -> None:
        """Store, in `conn`'s transaction, the document of `did` that `resolve(save=False)` fetched and
        no repo has been stored with yet (one that failed leaves it waiting for the next), as resolved
        when it was fetched."""
        with self._lock:
            waiting = self._unsaved.pop(did, None)
        if waiting is not None:
            document, fetched = waiting
            self.store.save_in(conn, did, document, age=time.monotonic() - fetched)

    def load(self, dids: Iterable[str]) -> dict[str, DidDocument]:
        """The stored documents of `dids` still within the TTL, now in this process's cache too: one
        query for many DIDs (a follower's batch, a backfill's claim). Empty without a store."""
        if self.store is None:
            return {}
        dids = list(dids)
        found = self.store.load(dids, self.ttl_seconds)
        for did, (document, age) in found.items():
            self._remember(did, document, age)
        with self._lock:
            self._unstored.update(did for did in dids if did not in found)
        return {did: document for did, (document, _) in found.items()}

    def _remember(self, did: str, document: DidDocument, age: float) -> None:
        with self._lock:
            self._cache[did] = (time.monotonic() + self.ttl_seconds - age, document)
            self._unstored.discard(did)

    def cached(self, did: str) -> DidDocument | None:
        """The cached document while its TTL lasts, else None (nothing is fetched)."""
        with self._lock:
            entry = self._cache.get(did)
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def invalidate(self, did: str) -> None:
        """Forget `did`: the next resolve fetches it again (its signature failed: the key may have rotated;
        its PDS no longer has the repo: the account may have moved)."""
        with self._lock:
            self._cache.pop(did, None)
            self._unsaved.pop(did, None)
        if self.store is not None:
            self.store.forget(did)

    def _resolve_uncached(self, did: str) -> DidDocument:
        if did.startswith("did:plc:"):
            if not _PLC_DID.match(did):
                raise InvalidDid(did, "a did:plc is 'did:plc:' + 24 base32 characters")
            raw = self._fetch(did, self._plc, f"{self.plc_url}/{did}")
        elif did.startswith("did:web:"):
            raw = self._fetch(did, self._web, self._web_url(did))
        elif did.startswith("did:"):
            method = did.split(":", 2)[1]
            raise UnsupportedDidMethod(did, f"DID method {method!r} is not supported by atproto (plc, web)")
        else:
            raise InvalidDid(did, "not a DID (expected did:plc:... or did:web:...)")
        return parse_document(did, raw, allow_http_endpoint=self._allow_private)

    def _web_url(self, did: str) -> str:
        if not _WEB_DID.match(did):
            raise InvalidDid(did, "atproto supports host-level did:web only: did:web:<host>[%3A<port>]")
        host = unquote(did.removeprefix("did:web:")).lower()
        hostname = host.rsplit(":", 1)[0]
        if hostname in _LOOPBACK_NAMES:
            if not self._allow_private:
                raise PrivateHostRefused(f"{did} names a loopback host; set {ALLOW_PRIVATE_ENV}=true "
                                         "only for local networks", host=host)
            return f"http://{host}/.well-known/did.json"
        return f"https://{host}/.well-known/did.json"

    def _fetch(self, did: str, client: httpx.Client, url: str) -> object:
        attempt = 0
        while True:
            try:
                return self._fetch_once(did, client, url)
            except DidResolutionFailed:
                if attempt >= self.retries:
                    raise
                attempt += 1
                self._backoff.sleep(attempt)

    def _acquire(self, host: str) -> None:
        if self.limiter is None:
            return
        try:
            self.limiter.acquire(host, max_wait=self.max_rate_limit_wait)
        except LimiterWaitExceeded as exc:
            raise RateLimited("DID resolution: host paused or out of budget", host=host,
                              error="RateLimitExceeded", retry_at=exc.retry_at) from None

    def _fetch_once(self, did: str, client: httpx.Client, url: str) -> object:
        host = host_key(url)
        self._acquire(host)
        deadline = Deadline(self.deadline_seconds, "the DID document fetch (ATPROTO_DID_FETCH_DEADLINE_SECONDS)")
        request = client.build_request("GET", url, headers={"Accept": "application/did+ld+json, application/json"})
        try:
            with within(deadline):
                reply = send_following(client, request)
                try:
                    if self.limiter is not None:
                        self.limiter.observe(host, reply.headers)
                    self._check_status(did, url, host, reply)
                    body = read_at_most(reply, self.max_document_bytes)
                finally:
                    reply.close()
        except httpx.TooManyRedirects:
            raise InvalidDidDocument(did, f"{url} redirects too many times") from None
        except httpx.TransportError as exc:
            raise DidResolutionFailed(did, f"{url}: {type(exc).__name__}: {exc}") from None
        except ReplyTooLarge:
            raise InvalidDidDocument(did, f"document at {url} is larger than {self.max_document_bytes} bytes "
                                          "(ATPROTO_DID_DOCUMENT_MAX_BYTES)") from None
        except httpx.DecodingError:
            raise InvalidDidDocument(did, f"document at {url} does not decode as its Content-Encoding") from None
        try:
            return untrusted_json(body)
        except ValueError:
            raise InvalidDidDocument(did, f"document at {url} is not JSON") from None

    def _check_status(self, did: str, url: str, host: str, reply: httpx.Response) -> None:
        if reply.status_code == 200:
            return
        if reply.status_code == 404:
            raise DidNotFound(did, f"{url} answered 404: no such DID")
        if reply.status_code == 410:
            raise DidTombstoned(did, f"{url} answered 410: the DID was deleted (tombstoned)")
        if reply.status_code == 429:
            retry_at = pause_end(reply.headers, time.time(), self.settings)
            if self.limiter is not None:
                self.limiter.pause_until(host, retry_at)
            raise RateLimited(f"resolving {did}", host=host, status=429, error="RateLimitExceeded", retry_at=retry_at)
        raise DidResolutionFailed(did, f"{url} answered HTTP {reply.status_code}")
