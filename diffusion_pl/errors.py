"""Errors a user fixes from the message alone: a bad option or config value, a missing or corrupt file, a checkpoint
that does not fit, a full disk.

Their messages name the option / file / key / shape and the fix. ``diffusion-pl`` prints such an error as one
``diffusion-pl <command>: error: <message>`` line on stderr and exits with status 2 (``DIFFUSION_PL_DEBUG=1`` shows
the traceback instead); any other exception is a bug and keeps its traceback.

Each class also derives from the builtin that callers would catch (ValueError, FileNotFoundError, ...), so
``except ValueError`` keeps working. This module imports nothing from the package: every layer may raise these.
"""

from __future__ import annotations

import errno
import os
import sys

#: set (to anything but 0/false/no) to get tracebacks and jsonargparse's full reports instead of one-line errors
DEBUG_ENV = "DIFFUSION_PL_DEBUG"


def debug_requested() -> bool:
    """True when the user asked for tracebacks (``DIFFUSION_PL_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class UserError(Exception):
    """Base class: a problem in what the user gave, with a message that says how to fix it."""


class UserInputError(UserError, ValueError):
    """A value (option, config key, file content, checkpoint) that cannot work."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named (or the expected layout of a data set) is missing."""


class UserFileExistsError(UserError, FileExistsError):
    """Writing would replace the user's file; the message names the flag that allows it."""


class UserRuntimeError(UserError, RuntimeError):
    """A run cannot go on for a reason the user can fix (e.g. a log directory holding another run's config)."""


class DiskFullError(UserError, OSError):
    """No space left on the device (or quota exceeded) while writing a file; nothing partial is left behind.

    ``str()`` is the message alone; ``errno`` is the original error number (ENOSPC / EDQUOT)."""

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


DISK_FULL_ERRNOS = frozenset(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if e)


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError meaning 'no space left on device' or 'disk quota exceeded'."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def find_in_chain(error: BaseException | None, match, contexts: bool = False) -> BaseException | None:
    """The first exception in ``error``'s chain for which ``match(exception)`` is true: ``error`` itself, then its
    explicit causes (``raise ... from``), with ``contexts`` also the exceptions being handled when it was raised."""
    seen = set()
    while error is not None and id(error) not in seen:
        if match(error):
            return error
        seen.add(id(error))
        error = error.__cause__ or (error.__context__ if contexts else None)
    return None


def find_user_error(error: BaseException | None) -> UserError | None:
    """``error`` itself or the first UserError among its explicit causes (``raise ... from``), else None.

    Libraries that wrap exceptions (jsonargparse instantiating a config's classes) chain the original as the cause.
    """
    return find_in_chain(error, lambda e: isinstance(e, UserError))  # type: ignore[return-value]


class OtherRankError(RuntimeError):
    """Raised on the ranks of a distributed run that stop because another rank failed (which reports the cause)."""


# What torch.distributed (gloo / NCCL / TCPStore) says when the process at the other end went away.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crash")


def launcher_rank() -> int:
    """This process's rank as its launcher set it, readable before any process group exists (the one place the package
    reads it from the environment): torchrun ``RANK``, SLURM ``SLURM_PROCID``, else Lightning's own launcher
    ``LOCAL_RANK`` on node ``NODE_RANK`` (torchrun: ``GROUP_RANK``). 0 for the first process of the whole run and
    outside a distributed run; on node n > 0 Lightning's first process gets n (its global rank needs the devices per
    node). Lightning's ``rank_zero_only.rank`` is not used: before Lightning's launcher has run it is read from
    ``RANK`` / ``LOCAL_RANK`` / ``SLURM_PROCID`` without ``NODE_RANK``, so it is 0 on the first process of every node
    of a multi-node run that Lightning launches, and it is read once, when lightning is imported."""
    values = [os.environ.get(name, "").strip() for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK")]
    rank = next((int(v) for v in values if v.isdigit()), 0)
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "")).strip()
    return rank or (int(node) if node.isdigit() else 0)


def in_distributed_run() -> bool:
    """True in a process of a run with more than one process: torch.distributed is initialised, or the launcher set
    ``WORLD_SIZE`` / ``SLURM_NTASKS`` > 1 (Lightning removes ``WORLD_SIZE`` again when it tears down after an error)."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return True
    dist = sys.modules.get("torch.distributed")  # never imported here: only asked if the run imported it
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def find_lost_peer_error(error: BaseException | None) -> BaseException | None:
    """The exception in ``error``'s chain (causes and contexts) that says another process of the run went away, e.g.
    gloo's "Connection closed by peer" in a rank that waited at a barrier for a rank that had failed; else None."""

    def lost(e: BaseException) -> bool:
        return isinstance(e, OtherRankError) or any(marker in str(e) for marker in PEER_LOST_MARKERS)

    return find_in_chain(error, lost, contexts=True)
