"""CIFAR-10 read by torchvision.datasets.CIFAR10 from its on-disk layout (the pickles of cifar-10-python.tar.gz)."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_pl.data.common import ArrayImageDataset, PreparedImageDataModule, check_images, missing_files
from diffusion_pl.errors import UserFileNotFoundError, UserInputError

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
ALL_FILES = TRAIN_FILES + TEST_FILES + [META_FILE]


def read_cifar(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 NHWC images (N, 32, 32, 3), int64 labels, the 10 class names) of a split under ``root``, read by
    torchvision.datasets.CIFAR10, which checks every file against the archive's MD5 checksums first."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / BASE_FOLDER
    try:
        dataset = CIFAR10(root=str(root), train=train)
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        checksums = dict(CIFAR10.train_list + CIFAR10.test_list) | {META_FILE: CIFAR10.meta["md5"]}
        bad = [name for name in ALL_FILES if not check_integrity(folder / name, checksums[name])]
        raise UserInputError(
            f"CIFAR-10: {bad or ALL_FILES} in {folder} are not the files of cifar-10-python.tar.gz (MD5 checksum "
            f"differs or unreadable: {err}); move that folder away and extract the archive again (or download=True)"
        ) from err
    images, labels = np.asarray(dataset.data), np.asarray(dataset.targets, dtype=np.int64)
    check_images(images, labels, image_size=32, channels=3, num_classes=10, name=str(folder))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in dataset.classes]
    return images, labels, names


class CIFAR10DataModule(PreparedImageDataModule):
    """CIFAR-10: 3x32x32, 10 classes; train = the 5 training batches, val = test = test_batch (``val_dataset``).

    Expects `data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` (torchvision's layout).
    download=True fetches it into a temporary folder that is renamed into place when complete. The loader options
    (num_workers, random_flip, prepare_data_per_node) are those of PreparedImageDataModule.
    """

    image_size, in_channels, num_classes = 32, 3, 10

    def __init__(
        self, data_dir: str = "data/cifar10", batch_size: int = 128, *, download: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_dir, self.download = data_dir, download
        self.class_names: list[str] | None = None

    @property
    def batches_dir(self) -> Path:
        return Path(self.data_dir) / BASE_FOLDER

    def _check_files(self) -> None:
        missing = missing_files(self.batches_dir, ALL_FILES)
        if missing:
            raise UserFileNotFoundError(
                f"CIFAR-10: missing {missing} in {self.batches_dir}. Expected layout: "
                f"{self.data_dir}/{BASE_FOLDER}/{{data_batch_1..data_batch_5, test_batch, batches.meta}} "
                "(the extracted cifar-10-python.tar.gz). Fix: pass download=True (needs network), or extract the "
                f"archive from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {self.data_dir}."
            )

    def _complete(self) -> bool:
        return not missing_files(self.batches_dir, ALL_FILES)

    def prepare_data(self) -> None:
        """With download=True and files missing: torchvision downloads and extracts the archive into a temporary
        folder in data_dir, which is renamed to cifar-10-batches-py once complete, so processes downloading at once
        (one per node on shared storage) cannot leave a partial folder: the first rename wins, the others are
        discarded."""
        if self._complete():
            return
        if self.download:
            from torchvision.datasets import CIFAR10

            os.makedirs(self.data_dir, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=self.data_dir))
            try:
                CIFAR10(root=str(staging), train=True, download=True)
                try:
                    os.rename(staging / BASE_FOLDER, self.batches_dir)
                except OSError as err:
                    if not self._complete():  # not a concurrent download that finished first
                        missing = missing_files(self.batches_dir, ALL_FILES)
                        raise UserInputError(
                            f"CIFAR-10: downloaded, but {self.batches_dir} already exists without {missing}, so the "
                            f"download cannot be put there ({err.strerror}): move that folder away and run again"
                        ) from err
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        self._check_files()
        if self.train_dataset is None and stage in (None, "fit"):
            images, labels, self.class_names = read_cifar(Path(self.data_dir), train=True)
            self.train_dataset = ArrayImageDataset(images, labels, random_flip=self.random_flip)
        if self.val_dataset is None:
            images, labels, self.class_names = read_cifar(Path(self.data_dir), train=False)
            self.val_dataset = ArrayImageDataset(images, labels, random_flip=False)
