"""AtomicCheckpointIO: a checkpoint file is either the complete old one or the complete new one, never a truncation.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose local temporary file lives in the system temp
directory; committing it is a copy when that is another filesystem (common on clusters: /tmp is local, checkpoints are
on shared storage), so a kill during the copy can leave a truncated last.ckpt. Here the temporary file is created in
the checkpoint's own directory, flushed and fsync'ed, then ``os.replace``d over the target (atomic on POSIX and
Windows). Remote (non-local) paths fall back to Lightning's implementation.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_pl.errors import DiskFullError, is_disk_full


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local writes go to a temporary file in the same directory, then os.replace()."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except BaseException as error:
            # Any failure (including KeyboardInterrupt) leaves the previous checkpoint untouched.
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            if is_disk_full(error):
                raise DiskFullError(
                    f"disk full: no space left on the device while writing the checkpoint {path} ({error.strerror}); "
                    f"it was not written and the checkpoints already in {directory} are intact. Free some space (or "
                    "set a ModelCheckpoint dirpath on a disk with room) and resume with --ckpt_path set to the last "
                    "checkpoint (e.g. last.ckpt)",
                    error.errno,
                ) from error
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
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
