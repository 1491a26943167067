"""AtomicCheckpointIO: a checkpoint file is either the complete old one or the complete new one, never a truncation.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose local temporary file lives in the system temp
directory; committing it is a copy when that is another filesystem (common on clusters: /tmp is local, checkpoints are
on shared storage), so a kill during the copy can leave a truncated last.ckpt. Here the project's one atomic write
(diffusion_pl.utils.files.atomic_write) is used: a temporary file in the checkpoint's own directory, flushed and
fsync'ed, created with the user's umask, then ``os.replace``d over the target (atomic on POSIX and Windows). Remote
(non-local) paths fall back to Lightning's implementation.

A save that cannot be written (full disk, quota, read-only folder) is a one-line user error
(:func:`checkpoint_write_error`); the temporary files a killed save leaves behind are removed when the next fit starts
(:class:`InterruptedSaveCleanup`).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from diffusion_pl.errors import DiskFullError, UserError
from diffusion_pl.utils.files import NotWritableError, atomic_write, disk_fault

TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes go to a temporary file in the same directory, then os.replace().

    A write that fails for lack of room (ENOSPC / EDQUOT, also when torch reports it only as a failed write) or
    because the folder is read-only / not writable raises a one-line user error naming the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.fspath(path)
        try:  # any failure (including KeyboardInterrupt) leaves the previous checkpoint untouched
            atomic_write(path, lambda f: _save(checkpoint, f))
        except (DiskFullError, NotWritableError) as error:  # said again with the checkpoint's advice
            cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
            raise checkpoint_write_error(cause, path) or error from cause


def _save(checkpoint: dict[str, Any], f) -> None:
    try:
        torch.save(checkpoint, f)
    except RuntimeError as error:  # torch's writer reports a failed write without errno
        _raise_os_cause(f, error)


def _raise_os_cause(f, error: RuntimeError) -> None:
    """Find the OS error behind torch's failed write ("unexpected pos ...", "file write failed"): write 1 MiB more
    to the same file and fsync; a full disk raises ENOSPC / EDQUOT there. Otherwise re-raise ``error``."""
    try:
        f.write(bytes(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    except OSError as cause:
        raise cause from error
    raise error


def checkpoint_write_error(error: BaseException, path: str) -> UserError | None:
    """The one-line user error for a checkpoint that could not be written (full disk, quota, read-only or not
    writable folder), or None for any other failure."""
    directory = os.path.dirname(os.path.abspath(path))
    kept = f"it was not written and the checkpoints already in {directory} are intact"
    return write_error(error, f"the checkpoint {path}", kept)


def write_error(error: BaseException, target: str, kept: str) -> UserError | None:
    """A full disk / quota (DiskFullError) or a read-only / not writable folder (NotWritableError) while writing
    ``target``, as one line saying what is ``kept`` and how to go on; None for any other error."""
    resume = "resume with --ckpt_path set to the last checkpoint (e.g. …/checkpoints/last.ckpt)"

    def full(error: OSError) -> str:
        return (
            f"disk full: no space left on the device while writing {target} ({error.strerror}); {kept}. Free some "
            f"space (or set a ModelCheckpoint dirpath on a disk with room) and {resume}"
        )

    def not_writable(error: OSError) -> str:
        where = f" ({error.filename})" if error.filename and error.filename not in target else ""
        return (
            f"cannot write {target}{where}: {error.strerror} (a read-only or not writable folder); {kept}. Make the "
            f"folder writable, or write the run elsewhere (e.g. --trainer.logger.init_args.save_dir or a "
            f"ModelCheckpoint dirpath), and {resume}"
        )

    return disk_fault(error, full, not_writable)


def remove_interrupted_saves(directory: str) -> list[str]:
    """Delete the temporary files (``.<name>.ckpt.<random>.tmp``) that a killed AtomicCheckpointIO save left in
    ``directory``; returns their paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), f".*.ckpt.*{TMP_SUFFIX}"))):
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
            removed.append(path)
    return removed


class InterruptedSaveCleanup(Callback):
    """At the start of fit, remove what an interrupted checkpoint save left in the checkpoint folders (up to a
    checkpoint's size each) and say so. Global rank 0 only."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            directory = getattr(callback, "dirpath", None)
            if not directory or not isinstance(get_filesystem(directory), LocalFileSystem):
                continue
            removed = remove_interrupted_saves(directory)
            if removed:
                names = ", ".join(os.path.basename(p) for p in removed)
                rank_zero_info(f"Removed {len(removed)} temporary file(s) of an interrupted checkpoint save from "
                               f"{directory}: {names}")  # fmt: skip
