"""For tests of inputs that used to loop without end: the call runs in a thread that must end in time, so
such a loop fails its test instead of hanging the test run."""

import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any


def ends_within(seconds: float, call: Callable[[], Any], doing: Callable[[], str]) -> tuple[str, Any]:
    """("returned", value) or ("raised", exception) of `call()`; fails (naming what it was still `doing`,
    and where its thread and the threads it started stand) if it has not ended within `seconds`."""
    ended: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            ended.append(("returned", call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            ended.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still going after {seconds} s: {doing()}\n{stacks(thread)}"
    return ended[0]


def stacks(first: threading.Thread) -> str:
    """Every live thread's stack, `first`'s first: where a call that did not end is waiting."""
    frames = sys._current_frames()
    threads = sorted(threading.enumerate(), key=lambda t: t is not first)
    return "\n".join(f"--- thread {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
                     for t in threads if t.ident in frames)
