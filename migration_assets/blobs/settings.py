"""Every environment variable the blob migration reads: the key of the stored passwords, the CLI's
passwords and the BLOB_* tuning values (resources take their defaults from here)."""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import EnvSettings


class BlobSettings(EnvSettings):
    """BLOB_*: how one account's blobs move; secrets are SecretStr, never shown in errors or metadata."""

    model_config = SettingsConfigDict(env_prefix="BLOB_", env_ignore_empty=True, extra="ignore")

    secret_key: SecretStr | None = Field(
        default=None, validation_alias="MIGRATION_SECRET_KEY",
        description="Fernet keys that encrypt the stored PDS passwords, newest first, comma-separated "
        "(older keys only decrypt; `migration-assets secrets rotate` re-encrypts with the newest) (secret)")
    old_password: SecretStr | None = Field(
        default=None, validation_alias="ATPROTO_OLD_PASSWORD",
        description="the account's password on its old PDS, for `migration-assets blobs migrate` (secret)")
    new_password: SecretStr | None = Field(
        default=None, validation_alias="ATPROTO_NEW_PASSWORD",
        description="the account's password on its new PDS, for `migration-assets blobs migrate` (secret)")
    work_dir: Path | None = Field(
        default=None, description="staging folder for blobs in flight; unset: {MIGRATION_DATA_DIR}/tmp/atproto-blobs")
    attempts: int = Field(default=3, ge=1, description="tries per blob before it goes to progress_data.failed_blobs")
    backoff_base_seconds: float = Field(
        default=2.0, gt=0, description="longest first wait between a blob's tries (exponential, full jitter)")
    backoff_cap_seconds: float = Field(default=60.0, gt=0, description="longest wait between a blob's tries")
    progress_every: int = Field(default=10, ge=1, description="write progress_data every N blobs")
    max_blob_bytes: int = Field(default=1 << 30, gt=0, description="a bigger download is cut off and that blob fails")
    request_timeout_seconds: float = Field(default=120.0, gt=0, description="per XRPC request (connect, each read)")
    min_bytes_per_second: float = Field(
        default=16 * 1024, gt=0, description="a blob's download or upload may take ATPROTO_REQUEST_DEADLINE_SECONDS "
        "plus 1 s per this many bytes; slower (a host dripping bytes), the try is cut")
    job_retries: int = Field(
        default=3, ge=0, description="Dagster retries of a whole account's step before the migration fails for good")
    job_retry_delay_seconds: float = Field(
        default=30.0, gt=0, description="base wait before retrying an account's step (exponential, full jitter)")
    lease_seconds: float = Field(
        default=120.0, gt=0, description="a run's hold on its account lapses this long after its last heartbeat (renewed every third of it)")
