"""The `blob_migrations` table: the request queue and each account's progress record (`progress_data`,
shaped as the seed's migration record). Passwords go in only as Fernet tokens (see credentials.py)."""

import json
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field, field_validator

from migration_assets.blobs.credentials import AccountCredentials, encrypt

Status = Literal["pending_blobs", "pending_prefs", "failed"]
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


class ProgressData(BaseModel):
    """`progress_data`: the seed's fields, plus each failed blob's reason."""

    blobs_started_at: str | None = None
    blobs_completed_at: str | None = None
    blob_count: int | None = None
    estimated_memory_mb: int | None = None
    blobs_completed: int = 0
    blobs_total: int | None = None
    bytes_transferred: int = 0
    last_progress_update: str | None = None
    failed_blobs: list[FailedBlob] = Field(default_factory=list)


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


def _migration(row: dict[str, Any]) -> BlobMigration:
    return BlobMigration(progress=ProgressData.model_validate(row.pop("progress_data")), **row)


def create_request(
    pool: ConnectionPool, request: MigrationRequest, credentials: AccountCredentials, origin: Origin = "queue"
) -> BlobMigration:
    """Store a request (insert requests only through here; see the lock). The account's pending one between the same PDSes (a killed run) is kept, with
    the new credentials; after a failed one, the new request carries its progress over."""
    token = encrypt(credentials)
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        # One request insert at a time: ids then become visible in order, so the sensor's id cursor
        # never passes a row a slower concurrent transaction was still inserting. Requests are rare.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('blob_migrations'))")
        pending = cur.execute(
            f"SELECT {_COLUMNS} FROM blob_migrations WHERE did = %s AND status = 'pending_blobs'", (request.did,)
        ).fetchone()
        if pending:
            _check_can_resume(pending, request, origin)
            cur.execute(
                f"UPDATE blob_migrations SET credentials = %s, error = NULL, updated_at = now() "
                f"WHERE id = %s RETURNING {_COLUMNS}",
                (token, pending["id"]),
            )
            return _migration(cur.fetchone())
        previous = cur.execute(
            "SELECT progress_data FROM blob_migrations WHERE did = %s AND old_pds = %s AND new_pds = %s "
            "AND status = 'failed' ORDER BY id DESC LIMIT 1",
            (request.did, request.old_pds, request.new_pds),
        ).fetchone()
        cur.execute(
            f"INSERT INTO blob_migrations (did, old_pds, new_pds, origin, credentials, progress_data) "
            f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (request.did, request.old_pds, request.new_pds, origin, token,
             Jsonb(previous["progress_data"] if previous else {})),
        )
        return _migration(cur.fetchone())


def _check_can_resume(pending: dict[str, Any], request: MigrationRequest, origin: Origin) -> None:
    if (pending["old_pds"], pending["new_pds"]) != (request.old_pds, request.new_pds):
        raise RequestError(
            f"{request.did} already has a pending blob migration (id {pending['id']}) from {pending['old_pds']} "
            f"to {pending['new_pds']}: let it finish (or fail) before asking for another"
        )
    if pending["origin"] != origin:
        raise RequestError(
            f"{request.did} already has a pending blob migration (id {pending['id']}) started by the "
            f"{pending['origin']}: follow its run in the Dagster UI instead of starting a second one"
        )


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


def write_progress(pool: ConnectionPool, migration_id: int, progress: ProgressData) -> None:
    with pool.connection() as conn:
        conn.execute(
            "UPDATE blob_migrations SET progress_data = %s, estimated_memory_mb = %s, updated_at = now() "
            "WHERE id = %s",
            (Jsonb(json.loads(progress.model_dump_json())), progress.estimated_memory_mb, migration_id),
        )


def note_error(pool: ConnectionPool, migration_id: int, message: str) -> None:
    """The latest error of a migration that will be retried (its status stays pending_blobs)."""
    with pool.connection() as conn:
        conn.execute("UPDATE blob_migrations SET error = %s, updated_at = now() WHERE id = %s", (message, migration_id))


def mark_failed(pool: ConnectionPool, migration_id: int, message: str) -> None:
    """Failed for good (retries spent, or nothing a retry can fix). The credentials stay, encrypted, so
    the migration can be resumed; a completed one loses them."""
    with pool.connection() as conn:
        conn.execute(
            "UPDATE blob_migrations SET status = 'failed', error = %s, updated_at = now() WHERE id = %s",
            (message, migration_id),
        )


def mark_completed(pool: ConnectionPool, migration_id: int, progress: ProgressData) -> None:
    """Every blob is on the new PDS: advance to pending_prefs and erase the credentials."""
    with pool.connection() as conn:
        conn.execute(
            "UPDATE blob_migrations SET status = 'pending_prefs', credentials = NULL, error = NULL, "
            "progress_data = %s, estimated_memory_mb = %s, updated_at = now() WHERE id = %s",
            (Jsonb(json.loads(progress.model_dump_json())), progress.estimated_memory_mb, migration_id),
        )
