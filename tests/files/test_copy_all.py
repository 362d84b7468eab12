"""copy_all's scheduling on its own (no S3, no database): every file once, stops, errors."""

import threading

import pytest

from migration_assets.files.store import FileResult, SourceFile
from migration_assets.files.worker import copy_all


def sources(n: int) -> list[SourceFile]:
    return [SourceFile(i, f"f{i}", f"f{i}", None) for i in range(n)]


def ok(source: SourceFile) -> FileResult:
    return FileResult(source.file_id, source.file_uri, source.file_name, None, "SUCCESS", uploaded=True)


def test_every_file_is_copied_once_and_recorded_in_batches():
    batches: list[list[FileResult]] = []
    stopped = copy_all(sources(1000), ok, 8, lambda: None, batches.append)
    ids = [r.file_id for batch in batches for r in batch]
    assert stopped is None and sorted(ids) == list(range(1000))
    assert max(len(b) for b in batches) <= 200 + 8  # flushed every 200 files


def test_a_stop_starts_nothing_more_and_lets_files_in_flight_finish():
    """Four copies block in flight; the stop is given; one copy ends and its thread is told to stop;
    only then do the other three end. They must be recorded, and no fifth file started."""
    stop, stop_told = threading.Event(), threading.Event()
    in_flight = threading.Semaphore(0)
    finish = {i: threading.Event() for i in range(4)}  # the first four block; a fifth would not
    started: list[int] = []
    lock = threading.Lock()

    def window() -> str | None:
        if stop.is_set():
            stop_told.set()
            return "window closed"
        return None

    def blocking(source: SourceFile) -> FileResult:
        with lock:
            started.append(source.file_id)
        if source.file_id in finish:
            in_flight.release()
            assert finish[source.file_id].wait(30), f"file {source.file_id} was never let finish"
        return ok(source)

    recorded: list[FileResult] = []
    outcome: list[str | None] = []
    run = threading.Thread(target=lambda: outcome.append(copy_all(sources(100), blocking, 4, window, recorded.extend)))
    run.start()
    assert all(in_flight.acquire(timeout=30) for _ in range(4)), "four copies should be in flight"
    stop.set()
    finish[0].set()  # its thread asks for the next file and is told to stop
    assert stop_told.wait(30)
    for file_id in (1, 2, 3):
        finish[file_id].set()
    run.join(30)

    assert sorted(started) == [0, 1, 2, 3], "files were started after the stop"
    assert not run.is_alive() and outcome == ["window closed"]
    assert sorted(r.file_id for r in recorded) == [0, 1, 2, 3]  # the three still in flight at the stop too


def test_an_upload_thread_failing_stops_the_others_and_raises():
    started: list[int] = []

    def broken(source: SourceFile) -> FileResult:
        started.append(source.file_id)
        if source.file_id == 5:
            raise RuntimeError("bug in copy")
        return ok(source)

    recorded: list[FileResult] = []
    with pytest.raises(RuntimeError, match="bug in copy"):
        copy_all(sources(10_000), broken, 4, lambda: None, recorded.extend)
    assert len(started) < 10_000 and 5 not in {r.file_id for r in recorded}
    assert len(recorded) == len(started) - 1  # every file that finished was recorded


def test_recording_failing_stops_the_uploads_and_raises():
    started: list[int] = []

    def record(batch: list[FileResult]) -> None:
        if batch:
            raise ConnectionError("database went away")

    def copy(source: SourceFile) -> FileResult:
        started.append(source.file_id)
        return ok(source)

    with pytest.raises(ConnectionError, match="database went away"):
        copy_all(sources(100_000), copy, 4, lambda: None, record)
    assert len(started) < 100_000
    assert not [t for t in threading.enumerate() if t.name.startswith("s3-copy-")]
