"""One demo stack (README's demo command: embedded PostgreSQL, dynalite, PLC + two PDSes, `dagster dev`)
for the whole end-to-end suite: starting it costs a minute, and every test drives it like a user."""

import pytest

from tests.e2e.stack import start_stack, stop_stack

BLOB_ACCOUNTS = 16  # one more than the atproto_blobs pool allows at once


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    running = start_stack(
        tmp_path_factory.mktemp("e2e"), heights=25_000,
        extra_env={"CHAIN_SYNC_INTERVAL_SECONDS": "5"},
        args=["--repo-accounts", "5", "--blob-accounts", str(BLOB_ACCOUNTS)],
    )
    yield running
    stop_stack(running)
