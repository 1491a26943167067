"""ImageNet 64x64: the official downsampled npz batches or an image folder, prepared once into a uint8 .npy memmap.

Class order: the npz release labels classes by their ILSVRC devkit id (1-based), the folder source by the sorted folder
names; released OpenAI checkpoints use the sorted WordNet IDs. ``label_order="sorted_wnid"`` (default) relabels the
npz source into that order (diffusion_pl/data/imagenet_classes.py), so both sources and the released checkpoints agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from tqdm.auto import tqdm

from diffusion_pl.data import folder
from diffusion_pl.data.cache import PreparedSplit
from diffusion_pl.data.common import ArrayImageDataset, PreparedImageDataModule, check_images
from diffusion_pl.data.imagenet_classes import devkit_to_sorted, devkit_wnids, sorted_wnids
from diffusion_pl.errors import UserFileNotFoundError, UserInputError

NPZ_LAYOUT = (
    "train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz (the official downsampled ImageNet release, "
    "directly in data_dir or one sub-folder down, e.g. Imagenet64_train_part1_npz/), each with 'data' uint8 "
    "(N, 3*S*S) in R|G|B planar order and 1-based 'labels' (N,)"
)
FOLDER_LAYOUT = "data_dir/train/<class_name>/<image files> and data_dir/val/<class_name>/<image files>"
LABEL_ORDERS = ("sorted_wnid", "devkit")
SPLITS = ("train", "val")


def planar_to_hwc(data: np.ndarray, image_size: int) -> np.ndarray:
    """Rows of R|G|B planes (N, 3*S*S), each plane row-major SxS -> uint8 NHWC (N, S, S, 3)."""
    return data.reshape(-1, 3, image_size, image_size).transpose(0, 2, 3, 1)


def list_class_folders(root: Path) -> list[str]:
    """Sorted sub-folder names of `root` (class name -> index by this order)."""
    if not root.is_dir():
        raise UserFileNotFoundError(f"ImageNet-64 (folder): no directory {root}. Expected layout: {FOLDER_LAYOUT}")
    classes = folder.list_class_folders(root, "ImageNet-64 (folder)")
    if not classes:
        raise UserFileNotFoundError(f"ImageNet-64 (folder): no class sub-folders in {root}. Expected: {FOLDER_LAYOUT}")
    return classes


def find_npz_batches(data_dir: Path) -> tuple[list[Path], Path]:
    """Train batches sorted by number, and val_data.npz, searched in data_dir and its direct sub-folders."""
    if not data_dir.is_dir():
        raise UserFileNotFoundError(f"ImageNet-64 (npz): no directory {data_dir}. Expected: {NPZ_LAYOUT}")
    found: dict[str, Path] = {}
    for path in sorted(data_dir.glob("*.npz")) + sorted(data_dir.glob("*/*.npz")):
        if re.fullmatch(r"train_data_batch_\d+\.npz|val_data\.npz", path.name):
            if path.name in found:
                raise UserInputError(f"ImageNet-64 (npz): {path.name} found twice: {found[path.name]} and {path}")
            found[path.name] = path
    train = sorted((p for n, p in found.items() if n.startswith("train")), key=lambda p: int(p.stem.split("_")[-1]))
    if not train or "val_data.npz" not in found:
        missing = [] if train else ["train_data_batch_*.npz"]
        missing += [] if "val_data.npz" in found else ["val_data.npz"]
        raise UserFileNotFoundError(
            f"ImageNet-64 (npz): missing {' '.join(missing)} under {data_dir}. Expected: {NPZ_LAYOUT}"
        )
    if len(train) != 10:
        rank_zero_warn(f"ImageNet-64 (npz): found {len(train)} train batches in {data_dir}, the full release has 10")
    return train, found["val_data.npz"]


def _read_npz(path: Path, image_size: int, load_data: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """-> (uint8 (N, 3*S*S) or None, 0-based int64 labels)."""
    try:
        with (
            open(path, "rb") as f,
            np.load(f, allow_pickle=False) as z,
        ):  # own the handle: np.load leaks it on a bad zip
            labels = np.asarray(z["labels"])
            data = np.asarray(z["data"]) if load_data else None
    except Exception as err:  # OSError, KeyError, zipfile.BadZipFile, zlib.error, ... on missing keys or corruption
        raise UserInputError(f"ImageNet-64 (npz): cannot read {path}: {err!r}. Expected {NPZ_LAYOUT}") from err
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(
            f"ImageNet-64 (npz): {path}: 'labels' must be integers (N,), got {labels.dtype}{labels.shape}"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise UserInputError(
            f"ImageNet-64 (npz): {path}: 'labels' must be 1-based class ids 1..1000, got {labels.min()}..{labels.max()}"
        )
    if data is not None:
        width = 3 * image_size * image_size
        if data.dtype != np.uint8 or data.shape != (len(labels), width):
            raise UserInputError(
                f"ImageNet-64 (npz): {path}: 'data' must be uint8 ({len(labels)}, {width}) for image_size="
                f"{image_size}, got {data.dtype} {data.shape}"
            )
    return data, labels.astype(np.int64) - 1


class ImageNet64DataModule(PreparedImageDataModule):
    """ImageNet at image_size (64): 3 channels, 1000 classes (npz) or one class per train sub-folder (folder).

    source="npz": the official downsampled batches (train_data_batch_1..10.npz, val_data.npz), whose 1-based labels
    are ILSVRC devkit class ids. label_order="sorted_wnid" (default) relabels them to the index of the class's
    WordNet ID in sorted order: the order of the folder source (ImageNet's WNID folders), of guided-diffusion and of
    its released class-conditional models and classifiers. label_order="devkit" keeps the release's order (label - 1).
    source="folder": data_dir/train/<class>/*, data_dir/val/<class>/*, classes numbered by sorted folder names, ADM
    preprocessing (BOX halving, BICUBIC, centre crop). prepare_data writes uint8 (N, S, S, 3) .npy caches under
    cache_dir (default data_dir/prepared), once and atomically; every process then maps them read-only.
    val = test = the validation split. class_cond=False: num_classes is 0 and y is all zeros (ignore it).
    The loader options (batch_size, num_workers, random_flip, prepare_data_per_node: false when cache_dir is on
    storage all nodes share) are those of PreparedImageDataModule.
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data/imagenet64",
        *,
        source: Literal["npz", "folder"] = "npz",
        cache_dir: str | None = None,
        image_size: int = 64,
        class_cond: bool = True,
        label_order: Literal["sorted_wnid", "devkit"] = "sorted_wnid",
        **kwargs: Any,
    ) -> None:
        if source not in ("npz", "folder"):
            raise UserInputError(f"ImageNet64DataModule: source must be 'npz' or 'folder', got {source!r}")
        if label_order not in LABEL_ORDERS:
            raise UserInputError(
                f"ImageNet64DataModule: label_order must be 'sorted_wnid' (sorted WordNet IDs: the folder source and "
                f"the released OpenAI checkpoints) or 'devkit' (the npz release's own order), got {label_order!r}"
            )
        if source == "folder" and label_order != "sorted_wnid":
            raise UserInputError(
                "ImageNet64DataModule: label_order 'devkit' applies to source 'npz' only; the folder source numbers "
                "classes by their sorted folder names (for ImageNet's WordNet-ID folders that is 'sorted_wnid')"
            )
        if source == "folder":
            class_names = list_class_folders(Path(data_dir) / "train")
        else:  # WordNet IDs by label (reading the devkit table also checks it)
            class_names = list(sorted_wnids() if label_order == "sorted_wnid" else devkit_wnids())
        super().__init__(**kwargs)
        self.image_size, self.num_classes = image_size, len(class_names) if class_cond else 0
        self.label_order, self.data_dir, self.source, self.cache_dir = label_order, data_dir, source, cache_dir
        self.class_cond, self.class_names, self.dataset_classes = class_cond, class_names, len(class_names)

    @property
    def prepared_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.data_dir) / "prepared"

    def split_files(self, split: str) -> PreparedSplit:
        return PreparedSplit(self.prepared_dir, self.source, split, self.image_size)

    def prepare_data(self) -> None:
        """Build the .npy caches of train and val unless complete ones exist, and the labels in ``label_order``.

        Lightning calls this on the first process of every node (``prepare_data_per_node=True``) or of the first
        node only (False). Every file is written under a temporary name and renamed, so concurrent calls on shared
        storage cannot leave a truncated cache (only duplicate work)."""
        if self.source == "npz":
            todo = [s for s in SPLITS if self.split_files(s).read_manifest() is None]
            if todo:
                train, val = find_npz_batches(Path(self.data_dir))
                inputs = {"train": train, "val": [val]}
                for split in todo:
                    self._prepare_npz(split, inputs[split])
        else:  # the folder source: prepared again when its files changed (the listing's fingerprint)
            for split in SPLITS:
                listing = self._folder_listing(split)
                manifest = self.split_files(split).read_manifest()
                if manifest is None or manifest.get("fingerprint") != listing.fingerprint:
                    self._prepare_folder(split, listing)
        if self.source == "npz" and self.label_order == "sorted_wnid":
            for split in SPLITS:
                self.split_files(split).write_ordered_labels(self.label_order, devkit_to_sorted())

    def _prepare_npz(self, split: str, paths: list[Path]) -> None:
        counts = [len(_read_npz(p, self.image_size, load_data=False)[1]) for p in paths]

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for path in tqdm(paths, desc=f"ImageNet-64 {split} npz -> npy", disable=None):
                data, labels = _read_npz(path, self.image_size)
                yield planar_to_hwc(data, self.image_size), labels

        info = {"inputs": [str(p.relative_to(self.data_dir)) for p in paths], "counts": counts, "num_classes": 1000,
                "label_order": "devkit"}  # fmt: skip
        self.split_files(split).write(sum(counts), chunks(), info)

    def _folder_listing(self, split: str) -> folder.FolderListing:
        """The image files of ``split`` with their fingerprint (names, sizes, modification times)."""
        root = Path(self.data_dir) / split
        list_class_folders(root)  # the layout's own message when the split has no class folders
        return folder.list_images(root, class_cond=True, name=f"ImageNet-64 (folder) {split}")

    def _prepare_folder(self, split: str, listing: folder.FolderListing) -> None:
        root = Path(self.data_dir) / split
        class_names = self.class_names or list_class_folders(Path(self.data_dir) / "train")
        index = {name: i for i, name in enumerate(class_names)}
        for name in listing.class_names:
            if name not in index:
                raise UserInputError(
                    f"ImageNet-64 (folder): class folder {root / name} has no counterpart in "
                    f"{Path(self.data_dir) / 'train'} (classes come from the train folders)"
                )
        labels = np.asarray([index[listing.class_names[y]] for y in listing.labels], dtype=np.int64)
        chunks = folder.decoded_chunks(
            listing.paths(),
            labels,
            self.image_size,
            3,
            name="ImageNet-64 (folder)",
            num_workers=self.num_workers,
            desc=f"ImageNet-64 {split} images -> npy",
            skippable=False,
        )
        info = {"inputs": str(root), "class_names": class_names, "num_classes": len(class_names),
                "fingerprint": listing.fingerprint}  # fmt: skip
        self.split_files(split).write(len(labels), chunks, info)

    def _open(self, split: str, random_flip: bool) -> ArrayImageDataset:
        files = self.split_files(split)
        manifest = files.read_manifest()
        if manifest is None:
            raise RuntimeError(
                f"ImageNet-64: no complete prepared {split} split in {self.prepared_dir} ({files.manifest.name}). "
                "Call prepare_data() first (Trainer does this on rank 0 before setup)."
            )
        if self.source == "folder" and manifest.get("class_names") != self.class_names:
            raise UserInputError(
                f"ImageNet-64: {files.manifest} lists other classes than {Path(self.data_dir) / 'train'}; "
                f"delete {self.prepared_dir} to rebuild the cache"
            )
        labels_file = files.labels
        if self.source == "npz" and self.label_order == "sorted_wnid":
            labels_file = files.read_ordered_labels(self.label_order)
            if labels_file is None:
                raise RuntimeError(
                    f"ImageNet-64: no current {files.ordered_labels(self.label_order)[0].name} (the {split} labels in "
                    f"label_order {self.label_order!r}) in {self.prepared_dir}. Call prepare_data() first (Trainer "
                    "does this before setup)."
                )
        labels = np.load(labels_file, mmap_mode="r")
        images = np.load(files.images, mmap_mode="r")
        check_images(
            images,
            labels,
            image_size=self.image_size,
            channels=3,
            num_classes=self.dataset_classes,
            name=str(files.images),
        )
        if not self.class_cond:
            return ArrayImageDataset(files.images, np.zeros(len(labels), dtype=np.int64), random_flip=random_flip)
        return ArrayImageDataset(files.images, labels_file, random_flip=random_flip)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = self._open("train", self.random_flip)
        if self.val_dataset is None:
            self.val_dataset = self._open("val", False)
