"""The `blob_migrations` table: the request queue and each account's progress record (`progress_data`,
shaped as the seed's migration record). Passwords go in only as Fernet tokens (see credentials.py)."""

from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field, field_validator

from migration_assets.blobs.credentials import AccountCredentials, encrypt
from migration_assets.core.lease import FENCE, Lease
from migration_assets.core.postgres import storable

Status = Literal["pending_blobs", "pending_prefs", "failed", "superseded"]
Origin = Literal["queue", "cli"]
DID_PATTERN = r"^did:(plc:[a-z2-7]{24}|web:[a-zA-Z0-9.%-]+(:[a-zA-Z0-9._%-]+)*)$"


class RequestError(ValueError):
    """A migration request that cannot be stored as given."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def normalize_pds_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"PDS URL {url!r} must be http(s)://host[:port]")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"PDS URL {url!r} must be the service root, without a path or query")
    return f"{parts.scheme}://{parts.netloc}"


class MigrationRequest(BaseModel):
    """What a caller asks for: move `did`'s blobs from `old_pds` to `new_pds`."""

    did: str = Field(pattern=DID_PATTERN)
    old_pds: str
    new_pds: str

    @field_validator("old_pds", "new_pds")
    @classmethod
    def _service_root(cls, value: str) -> str:
        return normalize_pds_url(value)


class FailedBlob(BaseModel):
    cid: str
    reason: str


FAILED_BLOBS_LISTED = 1000  # failed blobs listed with their reason; past that only counted


class ProgressData(BaseModel):
    """`progress_data`: the seed's fields, plus each failed blob's reason: the first FAILED_BLOBS_LISTED of
    them, and how many in all (progress is rewritten every few blobs: a new PDS listing a million blobs
    that the old one lacks would otherwise make each write longer than the last)."""

    blobs_started_at: str | None = None
    blobs_completed_at: str | None = None
    blob_count: int | None = None
    estimated_memory_mb: int | None = None
    blobs_completed: int = 0
    blobs_total: int | None = None
    bytes_transferred: int = 0
    last_progress_update: str | None = None
    failed_blobs: list[FailedBlob] = Field(default_factory=list)
    failed_blob_count: int = 0

    @property
    def failures(self) -> int:
        """Failed blobs in all (a row written before the count was kept has only the list)."""
        return max(self.failed_blob_count, len(self.failed_blobs))

    def add_failure(self, cid: str, reason: str) -> None:
        self.failed_blob_count = self.failures + 1
        if len(self.failed_blobs) < FAILED_BLOBS_LISTED:
            self.failed_blobs.append(FailedBlob(cid=cid, reason=reason))


class BlobMigration(BaseModel):
    id: int
    did: str
    old_pds: str
    new_pds: str
    status: Status
    origin: Origin
    progress: ProgressData
    estimated_memory_mb: int | None
    error: str | None
    has_credentials: bool

    def describe(self) -> str:
        return f"blob migration {self.id} of {self.did}"


_COLUMNS = (
    "id, did, old_pds, new_pds, status, origin, progress_data, estimated_memory_mb, error, "
    "credentials IS NOT NULL AS has_credentials"
)
_HELD = "(claim_token IS NOT NULL AND lease_expires_at > now())"  # a live run holds the row


def _migration(row: dict[str, Any]) -> BlobMigration:
    return BlobMigration(progress=ProgressData.model_validate(row.pop("progress_data")), **row)


def create_request(
    pool: ConnectionPool, request: MigrationRequest, credentials: AccountCredentials, origin: Origin = "queue"
) -> BlobMigration:
    """Store a request (insert requests only through here; see the lock). The account's open one between
    the same PDSes from the same origin (a killed run asked again) is resumed with the new credentials.
    Any other open or failed one of the account is superseded: its credentials are erased and its
    status says so, so the account never has two open rows; a failed one between the same PDSes hands
    its progress on. An open one a live run holds is refused instead (one run per account at a time)."""
    token = encrypt(credentials)
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        # One request insert at a time: ids then become visible in order, so the sensor's id cursor
        # never passes a row a slower concurrent transaction was still inserting. Requests are rare.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('blob_migrations'))")
        pending = cur.execute(
            f"SELECT {_COLUMNS}, {_HELD} AS held FROM blob_migrations WHERE did = %s AND status = 'pending_blobs'",
            (request.did,),
        ).fetchone()
        if pending and _same_request(pending, request, origin):
            cur.execute(
                f"UPDATE blob_migrations SET credentials = %s, error = NULL, updated_at = now() "
                f"WHERE id = %s RETURNING {_COLUMNS}",
                (token, pending["id"]),
            )
            return _migration(cur.fetchone())
        if pending and pending["held"]:
            raise RequestError(
                f"{request.did} already has a pending blob migration (id {pending['id']}) from {pending['old_pds']} "
                f"to {pending['new_pds']} started by the {pending['origin']}, and a run is moving its blobs now: "
                "follow that run in the Dagster UI and ask again once it has finished"
            )
        previous = cur.execute(
            "SELECT progress_data FROM blob_migrations WHERE did = %s AND old_pds = %s AND new_pds = %s "
            "AND status = 'failed' ORDER BY id DESC LIMIT 1",
            (request.did, request.old_pds, request.new_pds),
        ).fetchone()
        superseded = cur.execute(  # the lease goes too: a stalled run that wakes up writes nothing here
            "UPDATE blob_migrations SET status = 'superseded', credentials = NULL, claim_token = NULL, "
            "lease_expires_at = NULL, updated_at = now() "
            "WHERE did = %s AND status IN ('pending_blobs', 'failed') RETURNING id",
            (request.did,),
        ).fetchall()
        cur.execute(
            f"INSERT INTO blob_migrations (did, old_pds, new_pds, origin, credentials, progress_data) "
            f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (request.did, request.old_pds, request.new_pds, origin, token,
             Jsonb(previous["progress_data"] if previous else {})),
        )
        created = _migration(cur.fetchone())
        if superseded:
            cur.execute(
                "UPDATE blob_migrations SET error = concat_ws('; ', error, %s::text) WHERE id = ANY(%s)",
                (f"superseded by blob migration {created.id}", [row["id"] for row in superseded]),
            )
        return created


def _same_request(pending: dict[str, Any], request: MigrationRequest, origin: Origin) -> bool:
    return (pending["old_pds"], pending["new_pds"], pending["origin"]) == (request.old_pds, request.new_pds, origin)


def get_migration(pool: ConnectionPool, migration_id: int) -> BlobMigration | None:
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_COLUMNS} FROM blob_migrations WHERE id = %s", (migration_id,)).fetchone()
        return _migration(row) if row else None


def open_migration(pool: ConnectionPool, did: str) -> BlobMigration | None:
    """The account's migration waiting for its blobs, if any."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM blob_migrations WHERE did = %s AND status = 'pending_blobs'", (did,)
        ).fetchone()
        return _migration(row) if row else None


def queued_after(pool: ConnectionPool, after_id: int, limit: int) -> list[BlobMigration]:
    """Queued requests (not the CLI's, which runs its own) with ids above `after_id`, oldest first."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLUMNS} FROM blob_migrations WHERE id > %s AND origin = 'queue' "
            "AND status = 'pending_blobs' ORDER BY id LIMIT %s",
            (after_id, limit),
        ).fetchall()
        return [_migration(row) for row in rows]


def credentials_token(pool: ConnectionPool, migration_id: int) -> bytes | None:
    with pool.connection() as conn:
        row = conn.execute("SELECT credentials FROM blob_migrations WHERE id = %s", (migration_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None


# --- one run per account: the run that moves a migration's blobs holds its row's lease -------------------

def account_lease(ttl_seconds: float) -> Lease:
    return Lease("blob_migrations", "id", ttl_seconds)


def claim(pool: ConnectionPool, lease: Lease, migration_id: int, run_id: str) -> bool:
    """Take the migration for this run, unless another live run holds it (its lease not expired)."""
    with pool.connection() as conn:
        return bool(lease.claim(
            conn, "id = %(id)s AND status = 'pending_blobs'", {"id": migration_id, "run_id": run_id},
            set_sql="lease_run_id = %(run_id)s",
        ))


def holder(pool: ConnectionPool, migration_id: int) -> tuple[str | None, datetime | None]:
    """The run that holds the migration's lease and when the lease lapses unless renewed."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT lease_run_id, lease_expires_at FROM blob_migrations WHERE id = %s AND claim_token IS NOT NULL",
            (migration_id,),
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)


def write_progress(pool: ConnectionPool, lease: Lease, migration_id: int, progress: ProgressData) -> bool:
    """False: the lease was lost (another run took the migration over) and nothing was written."""
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE blob_migrations SET progress_data = %s, estimated_memory_mb = %s, updated_at = now() "
            f"WHERE id = %s AND {FENCE}",
            (_json(progress), progress.estimated_memory_mb, migration_id, lease.token),
        )
        return cur.rowcount == 1


def note_error(pool: ConnectionPool, lease: Lease, migration_id: int, message: str) -> bool:
    """The latest error of a migration that will be retried (its status stays pending_blobs); the lease
    is given back so the retry (or any other run) can take the migration."""
    with pool.connection() as conn, conn.cursor() as cur:
        return lease.finish(cur, migration_id, "error = %s, updated_at = now()", (storable(message),))


def mark_failed(pool: ConnectionPool, lease: Lease, migration_id: int, message: str) -> bool:
    """Failed for good (retries spent, or nothing a retry can fix): the credentials are erased; a new
    request with both passwords resumes it, sending only what is still missing."""
    with pool.connection() as conn, conn.cursor() as cur:
        return lease.finish(
            cur, migration_id, "status = 'failed', credentials = NULL, error = %s, updated_at = now()",
            (storable(message),),
        )


def mark_completed(pool: ConnectionPool, lease: Lease, migration_id: int, progress: ProgressData) -> bool:
    """Every blob is on the new PDS: advance to pending_prefs and erase the credentials."""
    with pool.connection() as conn, conn.cursor() as cur:
        return lease.finish(
            cur, migration_id,
            "status = 'pending_prefs', credentials = NULL, error = NULL, progress_data = %s, "
            "estimated_memory_mb = %s, updated_at = now()",
            (_json(progress), progress.estimated_memory_mb),
        )


def _json(progress: ProgressData) -> Jsonb:
    return Jsonb(storable(progress.model_dump(mode="json")))  # a failed blob's CID or reason comes from a host


# --- key rotation ------------------------------------------------------------------------------------

def stored_credentials(pool: ConnectionPool) -> list[tuple[int, str, bytes]]:
    """(id, did, token) of every migration that still holds credentials."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT id, did, credentials FROM blob_migrations WHERE credentials IS NOT NULL ORDER BY id"
        ).fetchall()
        return [(row[0], row[1], bytes(row[2])) for row in rows]


def replace_credentials(pool: ConnectionPool, migration_id: int, old_token: bytes, new_token: bytes) -> bool:
    """Swap the token only if it is still the one read (a request or an erasure meanwhile wins)."""
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE blob_migrations SET credentials = %s WHERE id = %s AND credentials = %s",
            (new_token, migration_id, old_token),
        )
        return cur.rowcount == 1
