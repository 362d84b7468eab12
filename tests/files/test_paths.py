"""file_uri forms and the root's boundary: the pure mapping, opening, and a range end to end
(real PostgreSQL and moto) where files outside the root are refused with nothing opened."""

import errno
import os
import threading
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pytest

from migration_assets.files import store
from migration_assets.files.paths import SourceRefused, open_under_root, relative_path
from migration_assets.files.worker import migrate_claimed_range
from tests.files.conftest import make_job

ROOT = Path("/srv/share")


def claim_first_range(job) -> store.Claim:
    with job.pool.connection() as conn:
        return store.claim_range(conn, "test-worker", 0, 100, job.settings.stale_minutes)


@pytest.mark.parametrize("file_uri, expected", [
    ("a/b.txt", "a/b.txt"),
    ("./a//b.txt", "a/b.txt"),
    ("a\\b.txt", "a/b.txt"),
    ("/srv/share/a/b.txt", "a/b.txt"),
    ("file:///srv/share/a/b.txt", "a/b.txt"),
    ("file://localhost/srv/share/a/b.txt", "a/b.txt"),
    ("FILE://LOCALHOST/srv/share/a/b.txt", "a/b.txt"),
    ("file:/srv/share/a/b.txt", "a/b.txt"),
    ("file:///srv/share/caf%C3%A9%20%231%3F.txt", "café #1?.txt"),
])
def test_the_three_forms_map_to_the_path_under_the_root(file_uri, expected):
    assert relative_path(file_uri, ROOT) == PurePosixPath(expected)


@pytest.mark.parametrize("file_uri, reason", [
    ("../etc/passwd", "'..'"),
    ("a/../../etc/passwd", "'..'"),
    ("/srv/share/../etc/passwd", "'..'"),
    ("file:///srv/share/%2E%2E/etc/passwd", "'..'"),
    ("/srv/shared/a.txt", "not under the root"),
    ("/etc/passwd", "not under the root"),
    ("file:///etc/passwd", "not under the root"),
    ("file://fileserver/srv/share/a.txt", "names the host 'fileserver'"),
    ("file:///srv/share/a.txt#frag", "percent-encode"),
    ("file:relative.txt", "without an absolute path"),
    ("file:///srv/share/caf%E9.txt", "not UTF-8"),
    ("file://[::1/srv/share/a.txt", "not a valid URI"),
    ("a/b%00.txt\0", "NUL"),
    ("/srv/share", "names no file"),
    ("", "names no file"),
])
def test_paths_leaving_the_root_or_naming_no_local_file_are_refused_with_the_reason(file_uri, reason):
    with pytest.raises(SourceRefused, match=reason) as refused:
        relative_path(file_uri, ROOT)
    assert repr(file_uri) in str(refused.value) and str(ROOT) in str(refused.value)


class ReaderWatch:
    """A FIFO that notices being opened for reading: a writer keeps trying a non-blocking open,
    which succeeds only while some process holds the FIFO open to read (a plain open of it for
    reading blocks until then, so a reader that should not be there is caught, not hung)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path, self.opened, self._stop = path, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
                self.opened.set()
            except OSError as error:
                assert error.errno == errno.ENXIO
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def test_open_refuses_symlinks_leading_out_and_fifos_without_opening_them(tmp_path, outside):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "ok.txt").write_bytes(b"ok")
    (root / "alias.txt").symlink_to(root / "inner" / "ok.txt")  # a symlink staying inside is fine
    watch = ReaderWatch(outside / "secret")
    (root / "escape.txt").symlink_to(outside / "secret")
    (root / "escape-dir").symlink_to(outside)
    os.mkfifo(root / "inner" / "pipe")
    try:
        with open_under_root(root, PurePosixPath("alias.txt"), "alias.txt") as handle:
            assert handle.read() == b"ok"
        for uri in ("escape.txt", "escape-dir/secret"):
            with pytest.raises(SourceRefused, match="outside FILES_SOURCE_ROOT"):
                open_under_root(root, PurePosixPath(uri), uri)
        with pytest.raises(SourceRefused, match="not a regular file"):
            open_under_root(root, PurePosixPath("inner/pipe"), "inner/pipe")  # O_NONBLOCK: no hang
        with pytest.raises(FileNotFoundError):
            open_under_root(root, PurePosixPath("inner/missing"), "inner/missing")
    finally:
        watch.stop()
    assert not watch.opened.is_set()


def test_a_directory_swapped_for_a_symlink_after_resolving_is_not_followed(tmp_path, outside, monkeypatch):
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "secret").write_bytes(b"inside")
    (root / "link").symlink_to(root / "inner")  # a symlink inside the root: the path must be resolved
    watch = ReaderWatch(outside / "secret")
    resolve = os.path.realpath

    def resolve_then_swap(path, *, strict=False):  # the race: the swap lands between check and open
        resolved = resolve(path, strict=strict)
        if resolved.endswith("secret"):
            (root / "inner").rename(root / "moved")
            (root / "inner").symlink_to(outside)
        return resolved

    monkeypatch.setattr(os.path, "realpath", resolve_then_swap)
    try:
        with pytest.raises(SourceRefused, match="changed while being opened"):
            open_under_root(root, PurePosixPath("link/secret"), "link/secret")
    finally:
        watch.stop()
    assert not watch.opened.is_set()


def test_a_range_copies_all_three_forms_and_refuses_files_outside_the_root_unread(
    files_env, target, target_url, s3, bucket, source_root, outside
):
    contents = {"plain/rel.txt": b"relative", "abs dir/abs.txt": b"absolute",
                "uri dir/caf\u00e9 #1.txt": b"file uri", "host/local.txt": b"localhost uri"}
    for relative, data in contents.items():
        (source_root / relative).parent.mkdir(parents=True, exist_ok=True)
        (source_root / relative).write_bytes(data)
    watch = ReaderWatch(outside / "secret")
    (source_root / "escape.txt").symlink_to(outside / "secret")
    (source_root / "escape-dir").symlink_to(outside)
    uris = {
        "plain/rel.txt": "plain/rel.txt",
        "abs dir/abs.txt": str(source_root / "abs dir/abs.txt"),
        "uri dir/caf\u00e9 #1.txt": "file://" + quote(str(source_root / "uri dir/caf\u00e9 #1.txt")),
        "host/local.txt": "file://localhost" + quote(str(source_root / "host/local.txt")),
        "escape.txt": "escape.txt",
        "escape-dir": "escape-dir/secret",
        "dotdot": "../outside/secret",
        "dotdot-abs": f"{source_root}/../outside/secret",
    }
    ids = {name: target.execute("INSERT INTO source_files (file_uri, file_name) VALUES (%s, %s) RETURNING file_id",
                                (uri, name)).fetchone()[0] for name, uri in uris.items()}
    store.expand_ranges(target, 100)
    target.commit()
    job = make_job(files_env, target_url)
    try:
        progress = migrate_claimed_range(job, claim_first_range(job))
    finally:
        watch.stop()

    assert not watch.opened.is_set(), "a file outside FILES_SOURCE_ROOT was opened"
    assert (progress.copied, progress.failed) == (4, 4)
    for relative, data in contents.items():
        assert s3.get_object(Bucket=bucket, Key=f"archive/{relative}")["Body"].read() == data
    errors = dict(target.execute("SELECT file_id, error FROM migration_files WHERE status = 'FAIL'"))
    for name in ("escape.txt", "escape-dir"):
        assert "outside FILES_SOURCE_ROOT" in errors[ids[name]] and uris[name] in errors[ids[name]]
    for name in ("dotdot", "dotdot-abs"):
        assert "'..'" in errors[ids[name]] and str(source_root) in errors[ids[name]]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"archive/{relative}" for relative in contents}
