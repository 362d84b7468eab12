"""`migration-assets blobs migrate`: one account's blobs, as a run of the `atproto/blobs` asset."""

import argparse
import sys

import dagster as dg
from pydantic import ValidationError

from migration_assets.blobs import store
from migration_assets.blobs.assets import REQUEST_TAG, SKIPPED, accounts, blobs
from migration_assets.blobs.credentials import AccountCredentials, CredentialsError
from migration_assets.blobs.resources import BlobMigrationResource
from migration_assets.blobs.settings import BlobSettings
from migration_assets.core.runs import root_cause
from migration_assets.core.settings import SettingsError
from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource

OLD_PASSWORD = "ATPROTO_OLD_PASSWORD"
NEW_PASSWORD = "ATPROTO_NEW_PASSWORD"
CLI_TAG = "migration-assets/cli"


def add_commands(commands: argparse._SubParsersAction) -> None:
    blobs_parser = commands.add_parser("blobs", help="AT Protocol blobs from an account's old PDS to its new PDS")
    actions = blobs_parser.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser(
        "migrate", help=f"move an account's blobs (passwords from {OLD_PASSWORD} and {NEW_PASSWORD})"
    )
    migrate.add_argument("--did", required=True, help="the account's DID")
    migrate.add_argument("--old-pds", required=True, help="URL of the PDS the account leaves")
    migrate.add_argument("--new-pds", required=True, help="URL of the PDS the account's repo was imported into")
    migrate.set_defaults(handler=migrate_command)


def read_credentials() -> AccountCredentials | None:
    try:
        settings = BlobSettings.load()
    except SettingsError as error:
        print(f"error: {error}")
        return None
    missing = [name for name, value in ((OLD_PASSWORD, settings.old_password), (NEW_PASSWORD, settings.new_password))
               if value is None]
    if missing:
        print(f"error: set {' and '.join(missing)} (the account's passwords on the old and new PDS; "
              "they are never read from the command line)")
        return None
    return AccountCredentials(old_password=settings.old_password, new_password=settings.new_password)


def migrate_command(args: argparse.Namespace) -> int:
    credentials = read_credentials()
    if credentials is None:
        return 2
    try:
        request = store.MigrationRequest(did=args.did, old_pds=args.old_pds, new_pds=args.new_pds)
    except ValidationError as error:
        print(f"error: {'; '.join(e['msg'] for e in error.errors())} (--did must be a did:plc or did:web)")
        return 2
    instance = project_instance()
    postgres = PostgresResource()
    try:
        migration = store.create_request(postgres.pool(), request, credentials, origin="cli")
    except (store.RequestError, CredentialsError) as error:
        print(f"error: {error}")
        return 2
    if not instance.has_dynamic_partition(accounts.name, request.did):
        instance.add_dynamic_partitions(accounts.name, [request.did])
    print(f"{migration.describe()}: {request.old_pds} -> {request.new_pds}")
    result = dg.materialize(
        [blobs], partition_key=request.did, instance=instance, raise_on_error=False,
        resources={"postgres": postgres, "blob_migration": BlobMigrationResource()},
        tags={CLI_TAG: "blobs migrate", REQUEST_TAG: str(migration.id)},
    )
    return print_summary(postgres, migration.id, result)


def print_summary(postgres: PostgresResource, migration_id: int, result: dg.ExecuteInProcessResult) -> int:
    stored = store.get_migration(postgres.pool(), migration_id)
    assert stored is not None
    progress = stored.progress
    print(f"{stored.did}: {stored.status}; blobs {progress.blobs_completed}/{progress.blobs_total}, "
          f"{progress.bytes_transferred} bytes transferred in all, {progress.failures} failed")
    for failed in progress.failed_blobs[:20]:
        print(f"  failed blob {failed.cid}: {failed.reason}")
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            print(f"  check {evaluation.check_name} FAILED: {evaluation.description}")
    for event in result.all_events:
        if event.is_step_failure:
            print(f"FAILED: {root_cause(event.step_failure_data.error)}")
        observation = event.asset_observation_data.asset_observation if event.is_asset_observation else None
        if observation is not None and SKIPPED in observation.metadata:
            print(f"nothing done: {observation.metadata[SKIPPED].value}")
            return 1
    if stored.status == "pending_prefs" and result.success:
        print("all blobs are on the new PDS and verified; the migration is now pending_prefs")
        return 0
    print("next step: fix the cause named above and run the same command again: blobs already on the new "
          "PDS are not sent again")
    return 1


def main(argv: list[str] | None = None) -> int:
    """The blobs commands alone (`python -m migration_assets.blobs.cli blobs migrate ...`)."""
    parser = argparse.ArgumentParser(prog="migration-assets")
    add_commands(parser.add_subparsers(dest="pipeline", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
