"""One demo stack (README's demo command: embedded PostgreSQL, dynalite, PLC + two PDSes, `dagster dev`)
for the whole end-to-end suite: starting it costs a minute, and every test drives it like a user."""

import pytest
from cryptography.fernet import Fernet

from tests.e2e.stack import start_stack, stop_stack

# The stack's key for stored PDS passwords: the blobs test queues its own requests from this process.
SECRET_KEY = Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    running = start_stack(
        tmp_path_factory.mktemp("e2e"), heights=25_000,
        extra_env={"CHAIN_SYNC_INTERVAL_SECONDS": "5", "MIGRATION_SECRET_KEY": SECRET_KEY},
        # No blob migrations from the demo: the blobs test queues its own, behind a gate it controls.
        args=["--repo-accounts", "5", "--blob-accounts", "0"],
    )
    yield running
    stop_stack(running)
