"""One writer per output folder: a lock file, ``<folder>/.diffusion-pl.lock``, held while a command writes there.

The lock is the kernel's ``flock`` on that file, so a run that crashes (even ``kill -9``) releases it; the file holds
the holder's pid, host and start time, for the refusal message and for folders on storage whose ``flock`` does not
reach other hosts. A second writer is refused with one line naming the folder, the holder and the fix:

- the lock is held (flock busy): refused;
- a lock file whose flock is free, written on this host: its run is gone (crashed): taken over, with a note;
- a lock file written on another host: that run may still be going, refused; remove the file if it is gone.

Only the first process of a distributed run takes the lock (rank 0 by :func:`diffusion_pl.errors.launcher_rank`); the
processes it launches belong to the same run and write the same folder. On release the file is removed, and so are
the folders the lock itself created if they are empty.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from diffusion_pl.errors import UserRuntimeError, launcher_rank

LOCK_NAME = ".diffusion-pl.lock"


class FolderInUseError(UserRuntimeError):
    """Another run writes the output folder."""


def describe_holder(holder: dict[str, Any]) -> str:
    """The holder as "diffusion-pl sample (pid 123 on host h, started 2026-01-01 10:00:00 UTC)"."""
    if not holder:
        return "a run that has not yet written its details"
    since = holder.get("since")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, int | float) else "?"
    command, pid, host = holder.get("command", "diffusion-pl"), holder.get("pid", "?"), holder.get("host", "?")
    return f"{command} (pid {pid} on host {host}, started {since})"


class FolderLock:
    """Context manager: hold ``folder``'s lock (see the module doc). ``option`` names the folder in messages
    ("--out_dir", "the run folder"); ``advice`` says where else to write (default: another ``option``)."""

    def __init__(self, folder: str | os.PathLike, option: str = "--out_dir", command: str = "diffusion-pl",
                 advice: str | None = None) -> None:  # fmt: skip
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.option, self.command = option, command
        self.advice = advice or f"choose another {option}"
        self.fd: int | None = None
        self.created: list[str] = []

    def __enter__(self) -> FolderLock:
        if launcher_rank() == 0:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if not self._make_folder():
            return  # not a writable folder: the command's own checks say so
        for _ in range(10):  # retried only when the file was replaced between open and flock
            fd = self._open()
            if fd is None:
                return
            holder, held = self._read(fd), not _try_flock(fd)
            if not held and _same_file(fd, self.path):
                self._refuse_if_alive_elsewhere(fd, holder)
                self.fd = fd
                self._write_holder()
                return
            os.close(fd)
            if held:
                self.release()
                raise FolderInUseError(self._refusal(holder, "is writing there now"))
        raise FolderInUseError(self._refusal({}, "keeps replacing its lock file"))

    def release(self) -> None:
        if self.fd is not None:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
            os.close(self.fd)  # releases the flock
            self.fd = None
        for folder in reversed(self.created):  # only folders the lock made, only when nothing else is in them
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created = []

    def _make_folder(self) -> bool:
        missing, path = [], self.folder
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            except OSError:
                return False
            self.created.append(path)
        return os.path.isdir(self.folder) and os.access(self.folder, os.W_OK | os.X_OK)

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise FolderInUseError(
                    f"{self.option} {self.folder}: its lock file {self.path} is a symbolic link; diffusion-pl does "
                    "not write through links it did not create: remove the link"
                ) from error
            return None  # read-only or not ours: the command's own checks say so

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 4096, 0)
            holder = json.loads(data.decode()) if data.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse_if_alive_elsewhere(self, fd: int, holder: dict[str, Any]) -> None:
        """The flock is free: a holder written on this host is gone (take over); one on another host may not be."""
        if not holder:
            return
        if holder.get("host") != socket.gethostname():
            os.close(fd)
            doing = "may still be writing there (its lock file comes from another host)"
            raise FolderInUseError(self._refusal(holder, doing))
        pid = holder.get("pid")
        if isinstance(pid, int) and pid_alive(pid) and not _flock_works(self.folder):
            os.close(fd)  # flock is not enforced on this storage and the pid still runs: trust the pid
            raise FolderInUseError(self._refusal(holder, "is writing there now"))
        print(f"{self.command}: note: {self.folder} was locked by {describe_holder(holder)}, which is no longer "
              "running; taking the lock over", file=sys.stderr)  # fmt: skip

    def _write_holder(self) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                           "command": self.command})  # fmt: skip
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)
        os.fsync(self.fd)

    def _refusal(self, holder: dict[str, Any], doing: str) -> str:
        return (
            f"{self.option} {self.folder} is in use by {describe_holder(holder)}, which {doing} "
            f"(lock file {self.path}). Wait for it to finish, or {self.advice}; if that run is gone, remove the lock "
            "file"
        )


def _try_flock(fd: int) -> bool:
    """Take an exclusive flock without waiting; True if taken (or if the storage has no flock at all)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


@functools.cache
def _flock_works(folder: str) -> bool:
    """Whether flock is enforced in ``folder`` (some network file systems accept it and enforce nothing)."""
    probe = os.path.join(folder, f".diffusion-pl.flock-probe.{os.getpid()}")
    try:
        a = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    b = os.open(probe, os.O_RDWR)
    try:
        os.unlink(probe)
        return _try_flock(a) and not _try_flock(b)
    finally:
        os.close(a)
        os.close(b)


def _same_file(fd: int, path: str) -> bool:
    """``path`` still names the file open as ``fd`` (not removed or replaced by another run meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def pid_alive(pid: int) -> bool:
    """A process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def holds_output_folder(parameter: str = "out_dir") -> Callable[[Callable], Callable]:
    """Decorator for a command function: hold the lock of the folder named by its ``parameter`` while it runs."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments[parameter]
            if folder is None:
                return function(*args, **kwargs)
            with FolderLock(folder, f"--{parameter}", f"diffusion-pl {function.__name__}"):
                return function(*args, **kwargs)

        return run

    return decorate
