"""Account passwords at rest: Fernet tokens under MIGRATION_SECRET_KEY, decrypted only in the process
that logs in. Nothing here ever puts a password into a message, a repr or a log line."""

import json
import os

from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, SecretStr

SECRET_KEY_VARIABLE = "MIGRATION_SECRET_KEY"
_GENERATE = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class CredentialsError(RuntimeError):
    """Credentials cannot be stored or read (key missing or wrong, record erased)."""


class AccountCredentials(BaseModel):
    """Passwords of one account on both PDSes; the DID is the login identifier on each."""

    old_password: SecretStr
    new_password: SecretStr


def secret_key() -> Fernet:
    raw = os.environ.get(SECRET_KEY_VARIABLE, "").strip()
    if not raw:
        raise CredentialsError(
            f"{SECRET_KEY_VARIABLE} is not set: it encrypts the stored PDS passwords. Generate one with "
            f"`{_GENERATE}` and set it in every process of the deployment (CLI, daemon, run workers)."
        )
    try:
        return Fernet(raw.encode())
    except ValueError:
        raise CredentialsError(
            f"{SECRET_KEY_VARIABLE} is not a Fernet key (32 url-safe base64-encoded bytes); generate one with "
            f"`{_GENERATE}`"
        ) from None


def encrypt(credentials: AccountCredentials, key: Fernet | None = None) -> bytes:
    plain = {
        "old_password": credentials.old_password.get_secret_value(),
        "new_password": credentials.new_password.get_secret_value(),
    }
    return (key or secret_key()).encrypt(json.dumps(plain).encode())


def decrypt(token: bytes | None, what: str, key: Fernet | None = None) -> AccountCredentials:
    """`what` names the migration in errors (e.g. "blob migration 7 of did:plc:...")."""
    if token is None:
        raise CredentialsError(
            f"{what} has no stored credentials (erased after completion, or never given): request it again "
            "with both passwords (ATPROTO_OLD_PASSWORD / ATPROTO_NEW_PASSWORD for the CLI)"
        )
    try:
        plain = (key or secret_key()).decrypt(bytes(token))
    except InvalidToken:
        raise CredentialsError(
            f"the credentials of {what} do not decrypt with this {SECRET_KEY_VARIABLE}: every process must "
            "use the key that stored them; otherwise request the migration again with both passwords"
        ) from None
    return AccountCredentials.model_validate_json(plain)
