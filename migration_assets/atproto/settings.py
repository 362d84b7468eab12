"""ATPROTO_*: the AT Protocol library's settings (PLC directory, private hosts, rate limits, identity).

Read when a client, resolver or limiter is built (`AtprotoSettings.load()`), so a test or the demo that
points the environment elsewhere is seen; callers may pass any of these in explicitly instead.
"""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from migration_assets.core.settings import EnvBool, EnvSettings


class AtprotoSettings(EnvSettings):
    model_config = SettingsConfigDict(env_prefix="ATPROTO_", env_ignore_empty=True, extra="ignore")

    plc_url: str = Field(default="https://plc.directory", description="PLC directory that resolves did:plc")
    allow_private_hosts: EnvBool = Field(
        default=False, description="allow loopback/private PDS, did:web and login addresses, and plain http:// "
        "logins (tests, local demo only)")
    max_pause_seconds: float = Field(
        default=3600.0, gt=0, description="cap on any pause a host's rate-limit headers ask for, on arrival "
        "and when read back from the database")
    default_pause_seconds: float = Field(
        default=10.0, gt=0, description="pause after a 429 whose Retry-After/RateLimit-Reset is missing or unusable")
    rate_limit: int = Field(default=3000, ge=1, description="requests per host and window, shared by every process")
    rate_window_seconds: float = Field(default=300.0, gt=0, description="length of a host's rate-limit window")
    identity_ttl_seconds: float = Field(
        default=3600.0, ge=0, description="how long a resolved DID document is reused before it is resolved again")
    did_document_max_bytes: int = Field(
        default=256 * 1024, gt=0, description="a larger DID document (PLC or did:web) is refused")
    request_deadline_seconds: float = Field(
        default=120.0, gt=0, description="whole-request deadline of one XRPC request (headers and body; a slow "
        "drip is cut); a repo download's and a blob's grow with their size")
    did_fetch_deadline_seconds: float = Field(
        default=15.0, gt=0, description="whole-request deadline of one DID document fetch (a slow drip is cut)")
