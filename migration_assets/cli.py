"""The `migration-assets` command: runs the project's assets in-process against the Dagster instance
in DAGSTER_HOME (the runs show in the UI), prints a summary, exits non-zero on failure."""

import argparse
import sys

from migration_assets.blobs import cli as blobs_cli
from migration_assets.blobs import rotation
from migration_assets.chain import cli as chain_cli
from migration_assets.core.runs import freeze_loaded_objects
from migration_assets.devstack import demo
from migration_assets.files import cli as files_cli
from migration_assets.repos import cli as repos_cli
from migration_assets.status import cli as status_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migration-assets", description=__doc__)
    commands = parser.add_subparsers(dest="pipeline", required=True)
    chain_cli.add_commands(commands)
    repos_cli.add_commands(commands)
    blobs_cli.add_commands(commands)
    files_cli.add_commands(commands)
    rotation.add_commands(commands)  # `secrets rotate`
    status_cli.add_commands(commands)
    demo.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    freeze_loaded_objects()  # every pipeline is loaded: the runs below add only their own objects
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
