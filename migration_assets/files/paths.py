"""Where a source_files row's file lives, and opening it without ever leaving FILES_SOURCE_ROOT.

`file_uri` may be a path relative to the root, an absolute path under it, or a `file://` URI
(RFC 8089: `file:///abs/path`, `file://localhost/abs/path`, `file:/abs/path`; percent-encoded).
`relative_path` maps it to the path under the root (which, under FILES_S3_PREFIX, is the S3 key)
without touching the disk. `open_under_root` opens the path one component at a time with O_NOFOLLOW
from a handle on the root; only when that meets a symlink does it resolve the path, refuse it if it
leads out of the root, and open the resolved path the same way: a directory swapped for a symlink
after the check makes the open fail, so nothing outside the root is ever opened, let alone read.
"""

import errno
import os
import stat
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a regular file).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SourceRefused(Exception):
    """This file_uri does not name a regular file under the root; the message says why and what to fix."""


def relative_path(file_uri: str, root: Path, backslash_separates: bool = True) -> PurePosixPath:
    """The path under `root` that `file_uri` names (relative, absolute under the root, or file://).
    Pure (no disk access): `..` components are refused outright, never resolved. An absolute path
    must start with `root` as given (FilesSettings resolves FILES_SOURCE_ROOT's own symlinks)."""
    refuse = lambda why: SourceRefused(  # noqa: E731
        f"file_uri {file_uri!r} {why} (FILES_SOURCE_ROOT is {root}): fix its source_files row")
    path = file_uri
    if file_uri[:5].lower() == "file:":
        try:
            parts = urlsplit(file_uri)
        except ValueError as error:
            raise refuse(f"is not a valid URI ({error})") from None
        if parts.netloc.lower() not in {"", "localhost"}:
            raise refuse(f"names the host {parts.netloc!r}; only local file:// URIs can be read")
        if parts.query or parts.fragment:
            raise refuse("has a query or fragment: percent-encode '?' and '#' in file names")
        try:
            path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:
            raise refuse("is not UTF-8 once percent-decoded (S3 keys are UTF-8)") from None
        if not path.startswith("/"):
            raise refuse("is a file: URI without an absolute path")
    posix = PurePosixPath(path.replace("\\", "/") if backslash_separates else path)
    if "\0" in path or ".." in posix.parts:
        raise refuse("contains '..' or a NUL byte; paths must stay under the root")
    if posix.is_absolute():
        if not posix.is_relative_to(root):
            raise refuse("is not under the root")
        posix = posix.relative_to(root)
    if not posix.parts:
        raise refuse("names no file")
    return posix


def source_path(file_uri: str, root: Path) -> PurePosixPath:
    """`relative_path`, a backslash read as a separator (a Windows inventory's `dir\\file`) unless the
    name as written exists under the root (a POSIX name may hold one). When both exist, which file the
    row means can't be told: refused (before, `dir\\x` was copied, and recorded, from `dir/x`)."""
    relative = relative_path(file_uri, root)
    if "\\" not in file_uri:
        return relative
    literal = relative_path(file_uri, root, backslash_separates=False)
    if not os.path.lexists(root / literal):
        return relative
    if os.path.lexists(root / relative):
        raise SourceRefused(f"file_uri {file_uri!r} names both {literal} (a backslash in its name) and {relative} "
                            f"(a backslash as a separator) under {root}: rename one of them, then retry")
    return literal


def open_under_root(root: Path, relative: PurePosixPath, file_uri: str) -> BinaryIO:
    """Open `root / relative` for reading once it is known to resolve (symlinks included) to a
    regular file under the root. FileNotFoundError when it does not exist."""
    real_root = _real_root(root)
    try:  # the usual case, no symlink on the way: every component opened with O_NOFOLLOW, no resolving
        fd = _open_components(real_root, relative.parts)
    except OSError as error:
        if error.errno not in {errno.ELOOP, errno.ENOTDIR}:
            raise
        fd = _open_resolved(real_root, relative, file_uri)  # a symlink: resolve it, then check where it leads
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceRefused(f"file_uri {file_uri!r} resolves to {os.path.join(real_root, relative)}, not a regular "
                            "file: refused; fix the source_files row")
    return os.fdopen(fd, "rb")


@lru_cache(maxsize=8)
def _real_root(root: Path) -> str:
    return os.path.realpath(root)


def _open_components(real_root: str, components: tuple[str, ...]) -> int:
    """Open `components` under `real_root` one at a time from a handle on the root, refusing to follow a
    symlink at any of them (ELOOP or ENOTDIR): nothing outside the root can be reached this way."""
    directory = os.open(real_root, _DIR_FLAGS)
    try:
        for name in components[:-1]:
            inner = os.open(name, _DIR_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = inner
        return os.open(components[-1], _FILE_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)


def _open_resolved(real_root: str, relative: PurePosixPath, file_uri: str) -> int:
    """The path has a symlink: resolve it, refuse it if it leads out of the root, open what it resolves to
    (a directory swapped for a symlink after the check makes the open fail)."""
    resolved = os.path.realpath(os.path.join(real_root, relative), strict=True)
    if not Path(resolved).is_relative_to(real_root) or resolved == real_root:
        raise SourceRefused(f"file_uri {file_uri!r} resolves to {resolved}, outside FILES_SOURCE_ROOT {real_root} "
                            "(a symlink leads out of it): refused, nothing read; fix the link or the source_files row")
    try:
        return _open_components(real_root, PurePosixPath(resolved).relative_to(real_root).parts)
    except OSError as error:
        if error.errno not in {errno.ELOOP, errno.ENOTDIR}:
            raise
        raise SourceRefused(f"file_uri {file_uri!r}: {resolved} changed while being opened ({error.strerror}); "
                            "refused, the retry tries again") from None
