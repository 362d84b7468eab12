"""`migration-assets status`: every pipeline's progress, failures and stuck work, in the terminal."""

import argparse

from migration_assets.core.instance import project_instance
from migration_assets.core.resources import PostgresResource
from migration_assets.status import report
from migration_assets.status.collect import collect


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="progress, rate, ETA, failures and stuck work of every pipeline")
    parser.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    instance = project_instance()
    with PostgresResource().connection() as conn:
        statuses = collect(instance, conn)
    print(report.text(statuses))
    return 0
