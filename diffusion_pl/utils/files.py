"""Writing the project's files: one atomic write, the user's umask, links never written through, disk faults as one
line.

:func:`atomic_write` is the only way the project writes a whole file (checkpoints, configs, samples, grids,
settings, shards, tables): a temporary file in the same folder is written, flushed and fsync'ed, given the mode a
plain ``open(path, "w")`` would give (``0o666 & ~umask``), then ``os.replace``d over ``path``. Readers see the old
file or the new one, never a truncation. When ``path`` is a symbolic link the link itself is replaced and its target
is left untouched. A full disk, an exceeded quota, a read-only file system or a missing permission raises a user
error naming ``path``; the temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import IO

from diffusion_pl.errors import DiskFullError, UserError, UserFileExistsError, UserRuntimeError, is_disk_full

NOT_WRITABLE_ERRNOS = frozenset(e for e in (getattr(errno, "EROFS", None), errno.EACCES, errno.EPERM) if e)


class NotWritableError(UserRuntimeError, OSError):
    """A file cannot be written: read-only file system, or no permission. ``errno`` is the original error number."""

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status), else by os.umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence the /proc path first
    os.umask(mask)
    return mask


def creation_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 & ~umask (0o644 under umask 022, 0o664 under 002)."""
    return 0o666 & ~current_umask()


def disk_fault(
    error: BaseException, full: Callable[[OSError], str], not_writable: Callable[[OSError], str]
) -> DiskFullError | NotWritableError | None:
    """The one-line user error for a write that failed with a disk fault, or None for any other error (and for one that
    already is a user error): ENOSPC / EDQUOT -> DiskFullError(full(error)); EROFS / EACCES / EPERM ->
    NotWritableError(not_writable(error)). The callers word the message (what was written, what is kept, the fix)."""
    if isinstance(error, UserError) or not isinstance(error, OSError):
        return None
    if is_disk_full(error):
        return DiskFullError(full(error), error.errno)
    if error.errno in NOT_WRITABLE_ERRNOS:
        return NotWritableError(not_writable(error), error.errno)
    return None


def _full(path: str) -> Callable[[OSError], str]:
    return lambda error: (
        f"no space left on the device while writing {path} ({error.strerror}); nothing was written under that name "
        "(the partial temporary file was removed)"
    )


def _not_writable(path: str) -> Callable[[OSError], str]:
    folder = os.path.dirname(os.path.abspath(path))
    return lambda error: (
        f"cannot write {path} ({error.strerror}); nothing was written under that name: make {folder} writable (a "
        "read-only file system or a folder of another user?) or write elsewhere"
    )


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], overwrite: bool = True) -> str:
    """Call ``write(f)`` on a temporary file next to ``path``, then ``os.replace`` it into place (see the module doc).

    With ``overwrite=False`` an existing ``path`` (or a link of that name) raises UserFileExistsError before anything
    is written. Returns ``path``.
    """
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise UserFileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), creation_mode())  # mkstemp creates 0o600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        fault = disk_fault(error, _full(path), _not_writable(path))
        if fault is not None:
            raise fault from error
        raise
    fsync_directory(directory)
    return path


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> str:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()), overwrite=overwrite)


def replace_link_with_copy(path: str | os.PathLike) -> str | None:
    """If ``path`` is a symbolic link, replace the link itself by a regular copy of what it points to (atomically; a
    dangling link is removed), so that later writes at ``path`` (e.g. a library appending to it) never reach the
    link's target. Returns the old target, or None when ``path`` is not a link."""
    path = os.fspath(path)
    if not os.path.islink(path):
        return None
    target = os.readlink(path)
    if os.path.isfile(path):
        with open(path, "rb") as source:
            atomic_write(path, lambda f: shutil.copyfileobj(source, f))
    else:
        os.unlink(path)
    return target


def remove_folder(path: str | os.PathLike, why: str) -> None:
    """Remove a folder the project made (e.g. shards for --overwrite). A symbolic link there is removed itself, never
    the files of its target (a note on stderr says so, with ``why``)."""
    path = os.fspath(path)
    if os.path.islink(path):
        target = os.readlink(path)
        os.unlink(path)
        print(f"diffusion-pl: note: {path} was a symbolic link to {target}; {why} removed the link only, the files in "
              f"{target} are untouched", file=sys.stderr)  # fmt: skip
    elif os.path.isdir(path):
        shutil.rmtree(path)


def fsync_directory(directory: str) -> None:
    """Persist a rename in ``directory`` (POSIX); a no-op where directories cannot be opened or synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
