"""Shared data pieces: a uint8 NHWC array dataset (memmap-friendly), shape checks, the DataModule base with its
train/val/test loaders."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.data.resumable import ResumableDataLoader
from diffusion_pl.errors import UserInputError
from diffusion_pl.utils.images import from_uint8


def check_images(
    images: np.ndarray, labels: np.ndarray, *, image_size: int, channels: int, num_classes: int, name: str
) -> None:
    """Raise ValueError naming `name` unless images are uint8 (N, S, S, C) and labels are integers in 0..K-1."""
    expected = f"(N, {image_size}, {image_size}, {channels})"
    if images.dtype != np.uint8:
        raise UserInputError(f"{name}: images must be uint8 {expected}, got dtype {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (image_size, image_size, channels):
        raise UserInputError(f"{name}: images must have shape {expected}, got {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserInputError(f"{name}: expected {len(images)} labels of shape (N,), got shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if len(labels) and num_classes > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserInputError(f"{name}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")


def _array(source: np.ndarray | str) -> np.ndarray:
    """An array as given, or a .npy file memory-mapped read-only."""
    return source if isinstance(source, np.ndarray) else np.load(source, mmap_mode="r")


class ArrayImageDataset(Dataset):
    """Items (x, y): x float32 CHW in [-1, 1] from uint8 NHWC images, y an int64 label.

    `images`/`labels` are arrays or paths to .npy files. Paths are opened lazily with mmap_mode="r" in each process
    (and not pickled), so DDP processes and DataLoader workers share the page cache instead of holding copies.
    The optional horizontal flip draws from torch's global RNG, which DataLoader seeds per worker.
    """

    def __init__(
        self, images: np.ndarray | str | os.PathLike, labels: np.ndarray | str | os.PathLike, random_flip: bool = False
    ) -> None:
        self._images_src = images if isinstance(images, np.ndarray) else str(images)
        self._labels_src = labels if isinstance(labels, np.ndarray) else str(labels)
        self.random_flip = random_flip
        if len(self.images) != len(self.labels):
            raise UserInputError(f"{len(self.images)} images but {len(self.labels)} labels")

    @functools.cached_property
    def images(self) -> np.ndarray:
        return _array(self._images_src)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return _array(self._labels_src)

    def __getstate__(self) -> dict:
        """Without the memory maps of .npy paths: each process (DataLoader worker) opens its own."""
        state = self.__dict__.copy()
        for name in ("images", "labels"):
            if not isinstance(state[f"_{name}_src"], np.ndarray):
                state.pop(name, None)
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        hwc = np.array(self.images[index], dtype=np.uint8, copy=True)
        if self.random_flip and torch.rand(()) < 0.5:
            hwc = hwc[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        return from_uint8(chw), torch.tensor(int(self.labels[index]), dtype=torch.int64)


def make_dataloader(
    dataset: Dataset, *, batch_size: int, num_workers: int, train: bool, pin_memory: bool = False
) -> DataLoader:
    """Train: a ResumableDataLoader (shuffled, drop_last; a resumed run continues its exact batches). Otherwise a
    DataLoader in order. persistent_workers whenever num_workers > 0."""
    return (ResumableDataLoader if train else DataLoader)(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


class ImageDataModule(L.LightningDataModule):
    """Base of the DataModules of diffusion_pl.data: ``setup`` fills ``train_dataset`` and ``val_dataset``; the
    training loader shuffles and drops the last partial batch; validation and test both read ``val_dataset`` in
    order. Subclasses set ``image_size``, ``in_channels`` and ``num_classes`` (the images, checked against the
    network).

    The loader options are declared once, here. A subclass lists only those whose default it changes and passes the
    rest on with ``**kwargs``, which jsonargparse follows into this signature: configs (``data.init_args.*``) and
    ``--data.help`` show them with their types and defaults. ``save_hyperparameters`` here also records the
    subclass's arguments (Lightning reads every ``__init__`` of the call chain)."""

    image_size: int
    in_channels: int
    num_classes: int

    def __init__(self, *, batch_size: int = 64, num_workers: int = 4, random_flip: bool = True) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.save_hyperparameters()

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before requesting a dataloader")
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
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)


class PreparedImageDataModule(ImageDataModule):
    """An ImageDataModule whose ``prepare_data`` downloads or writes files. prepare_data_per_node: Lightning calls
    prepare_data on the first process of every node (True) or only on global rank 0 (False): set it false when the
    files (data_dir, or the cache) are on storage all nodes share."""

    def __init__(self, *, prepare_data_per_node: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prepare_data_per_node = prepare_data_per_node  # Lightning's attribute


# Goes into the cache key of reference features computed from evaluation_dataloader, so that caches made before it
# existed (from the shuffled, randomly flipped training loader without its last batch) are not reused.
EVALUATION_LOADER_VERSION = "complete-unflipped"


def evaluation_dataloader(
    datamodule: object, split: Literal["train", "val"], batch_size: int | None = None
) -> DataLoader:
    """A deterministic loader over ALL images of a split of a set-up DataModule, for reference statistics (FID
    references) and bits/dim: sample order, no shuffling, no random flip, the last partial batch kept.

    The dataset is the one of the DataModule's own ``train_dataloader()`` / ``val_dataloader()``; a dataset with a
    ``random_flip`` attribute (ArrayImageDataset, the datasets of diffusion_pl.data) is used through a copy with the
    flip turned off, and one with a ``random_crop`` attribute (RandomCropDataset) with centre crops instead. A
    training split that flips in some other way (the DataModule has ``random_flip`` true but its
    dataset has no such attribute) is refused. Batch size: ``batch_size``, else the DataModule loader's.
    """
    if split not in ("train", "val"):
        raise UserInputError(f"split must be 'train' or 'val', got {split!r}")
    loader = getattr(datamodule, f"{split}_dataloader")()
    dataset = getattr(loader, "source_dataset", loader.dataset)  # ResumableDataLoader wraps its dataset
    if getattr(dataset, "random_flip", False) or getattr(dataset, "random_crop", False):
        dataset = copy.copy(dataset)  # shares the (memory-mapped) arrays
        dataset.random_flip = False
        if hasattr(dataset, "random_crop"):
            dataset.random_crop = False
    elif split == "train" and getattr(datamodule, "random_flip", False) and not hasattr(dataset, "random_flip"):
        raise UserInputError(
            f"the train split of {type(datamodule).__name__} is randomly flipped by its {type(dataset).__name__}, "
            "which has no random_flip attribute to turn off for evaluation: set the DataModule's random_flip false"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size or loader.batch_size or 64,
        shuffle=False,
        drop_last=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def use_pin_memory(trainer: object | None) -> bool:
    """Pin host memory only when batches go to a CUDA device."""
    if trainer is not None:
        try:
            return trainer.strategy.root_device.type == "cuda"  # type: ignore[attr-defined]
        except Exception:
            pass
    return torch.cuda.is_available()


def missing_files(directory: Path, names: Sequence[str]) -> list[str]:
    """Names from `names` that are not files in `directory`."""
    return [n for n in names if not (directory / n).is_file()]
