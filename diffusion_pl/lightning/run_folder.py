"""The run folder of ``diffusion-pl fit`` / ``validate`` / ``test``: one writer, and no logger file written through a
link.

:func:`claim_run_folder` is called by the CLI as soon as the Trainer is built, before any process is launched or any
logger has touched the folder: the first process of the run takes the folder's lock (diffusion_pl/utils/folder_lock.py;
another run writing there is refused in one line with the logger-specific way to log elsewhere) and replaces a
symbolic link at a name the logger writes (``hparams.yaml``, ``metrics.csv``) by a copy of its target, since Lightning's
loggers open those names for writing and would write into the target. The lock is released when the run ends
(:class:`RunFolderLock`: teardown, or an exception; the CLI releases it too when it stops before the run starts).
"""

from __future__ import annotations

import os
import sys

import lightning as L
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback

from diffusion_pl.errors import launcher_rank
from diffusion_pl.utils.files import replace_link_with_copy
from diffusion_pl.utils.folder_lock import FolderLock

#: the files Lightning's CSV / TensorBoard loggers (re)write by name in their log folder
LOGGER_FILES = ("hparams.yaml", "metrics.csv")


class RunFolderLock(Callback):
    """Holds the run folder's lock until the run ends (released at teardown or on an exception)."""

    def __init__(self, lock: FolderLock) -> None:
        self.lock = lock

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.lock.release()


def claim_run_folder(trainer: L.Trainer, run_dir: str, command: str, advice: str) -> FolderLock | None:
    """On the first process of the run: lock ``run_dir`` for this run (adds a :class:`RunFolderLock` to the trainer's
    callbacks) and replace links at the logger's file names; returns the lock (None on other processes: release it
    if the run never starts). ``advice``: how to log elsewhere (the refusal's fix)."""
    if launcher_rank() != 0 or not isinstance(get_filesystem(run_dir), LocalFileSystem):
        return None
    lock = FolderLock(run_dir, "the run folder", command, advice[:1].lower() + advice[1:])
    lock.acquire()
    if lock.fd is None:
        return None  # not a writable folder: Lightning's own error says so
    trainer.callbacks.append(RunFolderLock(lock))
    for name in LOGGER_FILES:
        path = os.path.join(run_dir, name)
        target = replace_link_with_copy(path)
        if target is not None:
            print(f"{command}: note: {path} was a symbolic link to {target}; it is replaced by a copy so that the "
                  "logger never writes into the link's target", file=sys.stderr)  # fmt: skip
    return lock
