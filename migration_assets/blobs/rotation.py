"""`migration-assets secrets rotate`: every stored PDS password re-encrypted with the newest key of
MIGRATION_SECRET_KEY, so the older keys can then be removed from it."""

import argparse
from dataclasses import dataclass, field

from cryptography.fernet import MultiFernet
from psycopg_pool import ConnectionPool

from migration_assets.blobs import store
from migration_assets.blobs.credentials import SECRET_KEY_VARIABLE, CredentialsError, keyring, reencrypt
from migration_assets.core.embedded import target_database_url
from migration_assets.core.postgres import shared_pool
from migration_assets.core.settings import SettingsError


@dataclass
class Rotation:
    rotated: int = 0
    changed_meanwhile: int = 0  # requested again or erased while we rotated: already current or gone
    errors: list[str] = field(default_factory=list)  # one per token no key decrypts


def rotate_credentials(pool: ConnectionPool, keys: MultiFernet) -> Rotation:
    """Re-encrypt each stored token with the newest key; one that no key decrypts is reported and left
    as it is (the others are still rotated)."""
    rotation = Rotation()
    for migration_id, did, token in store.stored_credentials(pool):
        try:
            fresh = reencrypt(token, f"blob migration {migration_id} of {did}", keys)
        except CredentialsError as error:
            rotation.errors.append(str(error))
            continue
        if store.replace_credentials(pool, migration_id, token, fresh):
            rotation.rotated += 1
        else:
            rotation.changed_meanwhile += 1
    return rotation


def rotate_command(args: argparse.Namespace) -> int:
    try:
        keys = keyring()
    except (CredentialsError, SettingsError) as error:
        print(f"error: {error}")
        return 2
    rotation = rotate_credentials(shared_pool(target_database_url()), keys)
    print(f"re-encrypted {rotation.rotated} stored credentials with the newest key of {SECRET_KEY_VARIABLE}"
          + (f" ({rotation.changed_meanwhile} changed meanwhile, left as they are)" if rotation.changed_meanwhile else ""))
    for error in rotation.errors:
        print(f"error: {error}")
    if rotation.errors:
        print(f"{len(rotation.errors)} could not be re-encrypted: keep the older keys in {SECRET_KEY_VARIABLE} "
              "until they are dealt with as said above")
        return 1
    print(f"every stored credential now needs only the newest key: the older keys can leave {SECRET_KEY_VARIABLE}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    secrets = commands.add_parser("secrets", help="stored secrets (the blob migrations' encrypted PDS passwords)")
    actions = secrets.add_subparsers(dest="action", required=True)
    rotate = actions.add_parser(
        "rotate", help=f"re-encrypt every stored credential with the newest key of {SECRET_KEY_VARIABLE} "
        "(keys comma-separated, newest first) and print how many")
    rotate.set_defaults(handler=rotate_command)
