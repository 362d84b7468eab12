"""Work for process-pool tests (importable by spawned workers)."""

import os
import time


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()
