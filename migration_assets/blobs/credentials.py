"""Account passwords at rest: Fernet tokens under MIGRATION_SECRET_KEY, decrypted only in the process
that logs in. Nothing here ever puts a password into a message, a repr or a log line.

MIGRATION_SECRET_KEY may list several keys, newest first, comma-separated (cryptography's
MultiFernet): new tokens use the newest, any listed key decrypts, and `migration-assets secrets
rotate` re-encrypts every stored token with the newest so older keys can then be dropped."""

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, SecretStr

from migration_assets.blobs.settings import BlobSettings

SECRET_KEY_VARIABLE = "MIGRATION_SECRET_KEY"
_GENERATE = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class CredentialsError(RuntimeError):
    """Credentials cannot be stored or read (key missing or wrong, record erased)."""


class AccountCredentials(BaseModel):
    """Passwords of one account on both PDSes; the DID is the login identifier on each."""

    old_password: SecretStr
    new_password: SecretStr


def keyring(secret_key: SecretStr | None = None) -> MultiFernet:
    """The keys of MIGRATION_SECRET_KEY (or `secret_key`), newest first. Read at each use, not cached:
    a rotation must not need a restart of the process that reads it next."""
    raw = secret_key if secret_key is not None else BlobSettings.load().secret_key
    keys = [key.strip() for key in (raw.get_secret_value() if raw else "").split(",") if key.strip()]
    if not keys:
        raise CredentialsError(
            f"{SECRET_KEY_VARIABLE} is not set: it encrypts the stored PDS passwords. Generate one with "
            f"`{_GENERATE}` and set it in every process of the deployment (CLI, daemon, run workers)."
        )
    fernets = []
    for position, key in enumerate(keys, 1):
        try:
            fernets.append(Fernet(key.encode()))
        except ValueError:
            raise CredentialsError(
                f"key {position} of {len(keys)} in {SECRET_KEY_VARIABLE} is not a Fernet key (32 url-safe "
                f"base64-encoded bytes; several keys are comma-separated, newest first); generate one with "
                f"`{_GENERATE}`"
            ) from None
    return MultiFernet(fernets)


def encrypt(credentials: AccountCredentials, keys: MultiFernet | None = None) -> bytes:
    plain = {
        "old_password": credentials.old_password.get_secret_value(),
        "new_password": credentials.new_password.get_secret_value(),
    }
    return (keys or keyring()).encrypt(json.dumps(plain).encode())


def undecryptable(what: str) -> CredentialsError:
    return CredentialsError(
        f"the credentials of {what} decrypt with none of the keys in {SECRET_KEY_VARIABLE}: add the key that "
        "stored them to the list (after the newest) in every process, or request the migration again with "
        "both passwords (ATPROTO_OLD_PASSWORD / ATPROTO_NEW_PASSWORD for the CLI)"
    )


def decrypt(token: bytes | None, what: str, keys: MultiFernet | None = None) -> AccountCredentials:
    """`what` names the migration in errors (e.g. "blob migration 7 of did:plc:...")."""
    if token is None:
        raise CredentialsError(
            f"{what} has no stored credentials (erased when it completed, failed for good or was superseded): "
            "request it again with both passwords (ATPROTO_OLD_PASSWORD / ATPROTO_NEW_PASSWORD for the CLI)"
        )
    try:
        plain = (keys or keyring()).decrypt(bytes(token))
    except InvalidToken:
        raise undecryptable(what) from None
    return AccountCredentials.model_validate_json(plain)


def reencrypt(token: bytes, what: str, keys: MultiFernet) -> bytes:
    """The same credentials under the newest key (a token it made already is made again: harmless)."""
    try:
        return keys.rotate(bytes(token))
    except InvalidToken:
        raise undecryptable(what) from None
