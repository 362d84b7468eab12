"""The Dagster instance the CLI and the demo use: DAGSTER_HOME, or a project-local one on the embedded
PostgreSQL, configured by the package's dagster.yaml."""

import os
import shutil
from pathlib import Path

import dagster as dg

from migration_assets.core import embedded
from migration_assets.core.pools import ensure_pool_limits
from migration_assets.core.settings import data_dir

# The instance config (package data, so an installed package has it too).
INSTANCE_CONFIG = Path(__file__).with_name("dagster.yaml")


def prepare_dagster_environment() -> Path:
    """Set DAGSTER_HOME (default: the data folder's) and DAGSTER_POSTGRES_URL (default:
    MIGRATION_DATABASE_URL, else the embedded server);
    give the home the package's dagster.yaml if it has none. Returns DAGSTER_HOME."""
    os.environ["MIGRATION_DATA_DIR"] = str(data_dir())  # absolute, for child processes
    project_home = "DAGSTER_HOME" not in os.environ
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(data_dir() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if project_home or not config.exists():  # the project's own home follows the project's file
        shutil.copyfile(INSTANCE_CONFIG, config)
    if not os.environ.get("DAGSTER_POSTGRES_URL"):
        # One server hosts both: Dagster's tables do not collide with the migration's.
        shared = os.environ.get("MIGRATION_DATABASE_URL")
        os.environ["DAGSTER_POSTGRES_URL"] = (
            embedded.dagster_storage_url(shared) if shared else embedded.embedded_dagster_url()
        )
    return home


def project_instance() -> dg.DagsterInstance:
    prepare_dagster_environment()
    instance = dg.DagsterInstance.get()
    ensure_pool_limits(instance)
    return instance
