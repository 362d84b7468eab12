"""For tests of inputs that used to loop without end: the call runs in a thread that must end in time, so
such a loop fails its test instead of hanging the test run."""

import threading
from collections.abc import Callable
from typing import Any


def ends_within(seconds: float, call: Callable[[], Any], doing: Callable[[], str]) -> tuple[str, Any]:
    """("returned", value) or ("raised", exception) of `call()`; fails (naming what it was still `doing`)
    if it has not ended within `seconds`."""
    ended: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            ended.append(("returned", call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            ended.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still going after {seconds} s: {doing()}"
    return ended[0]
