"""CIFAR-10 from torchvision's on-disk layout (the python pickles of cifar-10-python.tar.gz)."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from diffusion_pl.data.common import (
    ArrayImageDataset,
    check_images,
    make_dataloader,
    missing_files,
    use_pin_memory,
)
from diffusion_pl.errors import UserFileNotFoundError, UserInputError

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"


def _str_keys(d: dict) -> dict:
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 NHWC (N, 32, 32, 3) and int64 labels.

    `data` rows are 3072 bytes: the 1024 red, then green, then blue values of a 32x32 image, row-major (CHW planar).
    """
    try:
        with open(path, "rb") as f:
            entry = _str_keys(pickle.load(f, encoding="latin1"))
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise UserInputError(f"CIFAR-10: {path} is not a CIFAR-10 python pickle batch: {err}") from err
    if "data" not in entry or ("labels" not in entry and "fine_labels" not in entry):
        raise UserInputError(f"CIFAR-10: {path} must hold keys 'data' and 'labels', found {sorted(map(str, entry))}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserInputError(f"CIFAR-10: {path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    check_images(images, labels, image_size=32, channels=3, num_classes=10, name=str(path))
    return images, labels


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10: 3x32x32, 10 classes; train = the 5 training batches, val = test = test_batch.

    Expects `data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` (torchvision's layout).
    download=True fetches it into a temporary folder that is renamed into place when complete.
    prepare_data_per_node: Lightning calls prepare_data on the first process of every node (True) or only on global
    rank 0 (False): set it false when data_dir is on storage all nodes share.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        random_flip: bool = True,
        download: bool = False,
        prepare_data_per_node: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prepare_data_per_node = prepare_data_per_node  # Lightning's attribute
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.download = download
        self.image_size = 32
        self.in_channels = 3
        self.num_classes = 10
        self.class_names: list[str] | None = None
        self.train_dataset: ArrayImageDataset | None = None
        self.test_dataset: ArrayImageDataset | None = None

    @property
    def batches_dir(self) -> Path:
        return Path(self.data_dir) / BASE_FOLDER

    def _check_files(self) -> None:
        missing = missing_files(self.batches_dir, TRAIN_FILES + TEST_FILES + [META_FILE])
        if missing:
            raise UserFileNotFoundError(
                f"CIFAR-10: missing {missing} in {self.batches_dir}. Expected layout: "
                f"{self.data_dir}/{BASE_FOLDER}/{{data_batch_1..data_batch_5, test_batch, batches.meta}} "
                "(the extracted cifar-10-python.tar.gz). Fix: pass download=True (needs network), or extract the "
                f"archive from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {self.data_dir}."
            )

    def _complete(self) -> bool:
        return not missing_files(self.batches_dir, TRAIN_FILES + TEST_FILES + [META_FILE])

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
                        missing = missing_files(self.batches_dir, TRAIN_FILES + TEST_FILES + [META_FILE])
                        raise UserInputError(
                            f"CIFAR-10: downloaded, but {self.batches_dir} already exists without {missing}, so the "
                            f"download cannot be put there ({err.strerror}): move that folder away and run again"
                        ) from err
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self._check_files()

    def _read_meta(self) -> list[str] | None:
        with open(self.batches_dir / META_FILE, "rb") as f:
            meta = _str_keys(pickle.load(f, encoding="latin1"))
        names = meta.get("label_names")
        if names is None:
            return None
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        if len(names) != 10:
            raise UserInputError(
                f"CIFAR-10: {self.batches_dir / META_FILE} lists {len(names)} label_names, expected 10"
            )
        return names

    def _read_split(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_batch(self.batches_dir / n) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def setup(self, stage: str | None = None) -> None:
        self._check_files()
        if self.class_names is None:
            self.class_names = self._read_meta()
        if self.train_dataset is None and stage in (None, "fit"):
            images, labels = self._read_split(TRAIN_FILES)
            self.train_dataset = ArrayImageDataset(images, labels, random_flip=self.random_flip)
        if self.test_dataset is None:
            images, labels = self._read_split(TEST_FILES)
            self.test_dataset = ArrayImageDataset(images, labels, random_flip=False)

    def _loader(self, dataset: ArrayImageDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("CIFAR10DataModule: call setup() before requesting a dataloader")
        return make_dataloader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            train=train,
            pin_memory=use_pin_memory(self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)
