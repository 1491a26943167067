"""ImageNet 64x64: the official downsampled npz batches or an image folder, prepared once into a uint8 .npy memmap.

Class order: the npz release labels classes by their ILSVRC devkit id (1-based), the folder source by the sorted folder
names; released OpenAI checkpoints use the sorted WordNet IDs. ``label_order="sorted_wnid"`` (default) relabels the
npz source into that order (diffusion_pl/data/imagenet_classes.py), so both sources and the released checkpoints agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusion_pl.data.common import ArrayImageDataset, check_images, make_dataloader, use_pin_memory
from diffusion_pl.data.imagenet_classes import devkit_to_sorted, devkit_wnids, sorted_wnids
from diffusion_pl.errors import UserFileNotFoundError, UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
NPZ_LAYOUT = (
    "train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz (the official downsampled ImageNet release, "
    "directly in data_dir or one sub-folder down, e.g. Imagenet64_train_part1_npz/), each with 'data' uint8 "
    "(N, 3*S*S) in R|G|B planar order and 1-based 'labels' (N,)"
)
FOLDER_LAYOUT = "data_dir/train/<class_name>/<image files> and data_dir/val/<class_name>/<image files>"
MANIFEST_VERSION = 1
LABEL_ORDERS = ("sorted_wnid", "devkit")
SPLITS = ("train", "val")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM preprocessing: halve with BOX while min side >= 2*size, BICUBIC so min side = size, centre crop -> HWC."""
    image = image.convert("RGB")
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _load_folder_image(args: tuple[str, int]) -> np.ndarray:
    path, image_size = args
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image, image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserInputError(f"ImageNet-64: cannot read image {path}: {err}") from err


def planar_to_hwc(data: np.ndarray, image_size: int) -> np.ndarray:
    """Rows of R|G|B planes (N, 3*S*S), each plane row-major SxS -> uint8 NHWC (N, S, S, 3)."""
    return data.reshape(-1, 3, image_size, image_size).transpose(0, 2, 3, 1)


def list_class_folders(root: Path) -> list[str]:
    """Sorted sub-folder names of `root` (class name -> index by this order)."""
    if not root.is_dir():
        raise UserFileNotFoundError(f"ImageNet-64 (folder): no directory {root}. Expected layout: {FOLDER_LAYOUT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


class PreparedSplit:
    """The cache files of one split: <prefix>_images.npy (N,S,S,3) uint8, <prefix>_labels.npy (N,) int64, manifest.

    Written atomically (temporary names, then renames; the manifest last), so processes preparing the same cache at
    once (one per node on shared storage) can only leave a complete cache. The labels are the source's own: npz =
    devkit order (release label - 1), folder = sorted folder names. Other class orders are derived label files,
    <prefix>_labels_<order>.npy with their own manifest (see :meth:`ordered_labels`), sharing the images.
    """

    def __init__(self, cache_dir: Path, source: str, split: str, image_size: int) -> None:
        self.source, self.split, self.image_size = source, split, image_size
        self.prefix = f"{source}{image_size}_{split}"
        self.images = cache_dir / f"{self.prefix}_images.npy"
        self.labels = cache_dir / f"{self.prefix}_labels.npy"
        self.manifest = cache_dir / f"{self.prefix}_manifest.json"

    def ordered_labels(self, label_order: str) -> tuple[Path, Path]:
        """(labels .npy, manifest .json) of this split's labels in ``label_order``, derived from :attr:`labels`."""
        stem = self.images.parent / f"{self.prefix}_labels_{label_order}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def read_ordered_labels(self, label_order: str) -> Path | None:
        """The derived labels file of ``label_order`` if it is complete and derived from the current :attr:`labels`
        (their digest is in its manifest), else None."""
        path, manifest_path = self.ordered_labels(label_order)
        try:
            manifest = json.loads(manifest_path.read_text())
            raw = np.load(self.labels, mmap_mode="r")
            ordered = np.load(path, mmap_mode="r")
            expected = (MANIFEST_VERSION, label_order, len(raw), _digest(raw))
            if (manifest["version"], manifest["label_order"], manifest["count"], manifest["from_sha1"]) != expected:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return path if ordered.shape == (len(raw),) and ordered.dtype == np.int64 else None

    def write_ordered_labels(self, label_order: str, mapping: np.ndarray) -> Path:
        """Derive the labels of ``label_order`` (``mapping[own label]``) unless a current file exists."""
        current = self.read_ordered_labels(label_order)
        if current is not None:
            return current
        path, manifest_path = self.ordered_labels(label_order)
        raw = np.load(self.labels)
        _atomic_save_npy(path, mapping[raw].astype(np.int64))
        manifest = {"version": MANIFEST_VERSION, "label_order": label_order, "count": len(raw),
                    "from": self.labels.name, "from_sha1": _digest(raw)}  # fmt: skip
        _atomic_write_json(manifest_path, manifest)
        return path

    def read_manifest(self) -> dict | None:
        """The manifest if the split is complete and consistent with its .npy files, else None."""
        try:
            manifest = json.loads(self.manifest.read_text())
            count = manifest["count"]
            expected = (self.source, self.split, self.image_size, MANIFEST_VERSION)
            if (manifest["source"], manifest["split"], manifest["image_size"], manifest["version"]) != expected:
                return None
            images = np.load(self.images, mmap_mode="r")
            labels = np.load(self.labels, mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        s = self.image_size
        if images.shape != (count, s, s, 3) or images.dtype != np.uint8 or labels.shape != (count,):
            return None
        return manifest

    def write(self, count: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]], info: dict) -> None:
        """Stream (images NHWC, labels) chunks into temporary .npy files, then rename them; manifest last."""
        self.images.parent.mkdir(parents=True, exist_ok=True)
        tmp_images, tmp_labels = _tmp_name(self.images), _tmp_name(self.labels)
        s = self.image_size
        try:
            images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(count, s, s, 3))
            labels = np.empty(count, dtype=np.int64)
            offset = 0
            for chunk_images, chunk_labels in chunks:
                n = len(chunk_labels)
                if offset + n > count:
                    raise UserInputError(f"ImageNet-64: more than the {count} expected images for split {self.split!r}")
                images[offset : offset + n] = chunk_images
                labels[offset : offset + n] = chunk_labels
                offset += n
            if offset != count:
                raise UserInputError(f"ImageNet-64: got {offset} images for split {self.split!r}, expected {count}")
            images.flush()
            del images
            with open(tmp_labels, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
                np.save(f, labels, allow_pickle=False)
            os.replace(tmp_images, self.images)
            os.replace(tmp_labels, self.labels)
        finally:
            for tmp in (tmp_images, tmp_labels):
                tmp.unlink(missing_ok=True)
        manifest = {
            "version": MANIFEST_VERSION,
            "source": self.source,
            "split": self.split,
            "image_size": s,
            "count": count,
            "images": self.images.name,
            "labels": self.labels.name,
            **info,
        }
        _atomic_write_json(self.manifest, manifest)


class ImageNet64DataModule(L.LightningDataModule):
    """ImageNet at image_size (64): 3 channels, 1000 classes (npz) or one class per train sub-folder (folder).

    source="npz": the official downsampled batches (train_data_batch_1..10.npz, val_data.npz), whose 1-based labels
    are ILSVRC devkit class ids. label_order="sorted_wnid" (default) relabels them to the index of the class's
    WordNet ID in sorted order: the order of the folder source (ImageNet's WNID folders), of guided-diffusion and of
    its released class-conditional models and classifiers. label_order="devkit" keeps the release's order (label - 1).
    source="folder": data_dir/train/<class>/*, data_dir/val/<class>/*, classes numbered by sorted folder names, ADM
    preprocessing (BOX halving, BICUBIC, centre crop). prepare_data writes uint8 (N, S, S, 3) .npy caches under
    cache_dir (default data_dir/prepared), once and atomically; every process then maps them read-only.
    val = test = the validation split. class_cond=False: num_classes is 0 and y is all zeros (ignore it).
    prepare_data_per_node: Lightning calls prepare_data on the first process of every node (True) or only on global
    rank 0 (False): set it false when cache_dir is on storage all nodes share.
    """

    def __init__(
        self,
        data_dir: str = "data/imagenet64",
        batch_size: int = 64,
        num_workers: int = 4,
        random_flip: bool = True,
        source: Literal["npz", "folder"] = "npz",
        cache_dir: str | None = None,
        image_size: int = 64,
        class_cond: bool = True,
        label_order: Literal["sorted_wnid", "devkit"] = "sorted_wnid",
        prepare_data_per_node: bool = True,
    ) -> None:
        super().__init__()
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
        self.save_hyperparameters()
        self.prepare_data_per_node = prepare_data_per_node  # Lightning's attribute
        self.label_order = label_order
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.source = source
        self.cache_dir = cache_dir
        self.image_size = image_size
        self.in_channels = 3
        self.class_cond = class_cond
        self.class_names: list[str] | None = None
        if source == "folder":
            self.class_names = list_class_folders(Path(data_dir) / "train")
        else:  # WordNet IDs by label (reading the devkit table also checks it)
            self.class_names = list(sorted_wnids() if label_order == "sorted_wnid" else devkit_wnids())
        self.dataset_classes = len(self.class_names) if self.class_names is not None else 1000
        self.num_classes = self.dataset_classes if class_cond else 0
        self.train_dataset: ArrayImageDataset | None = None
        self.val_dataset: ArrayImageDataset | None = None

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
        todo = [s for s in SPLITS if self.split_files(s).read_manifest() is None]
        if todo and self.source == "npz":
            train, val = find_npz_batches(Path(self.data_dir))
            inputs = {"train": train, "val": [val]}
            for split in todo:
                self._prepare_npz(split, inputs[split])
        elif todo:
            for split in todo:
                self._prepare_folder(split)
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

    def _prepare_folder(self, split: str) -> None:
        root = Path(self.data_dir) / split
        class_names = self.class_names or list_class_folders(Path(self.data_dir) / "train")
        index = {name: i for i, name in enumerate(class_names)}
        files: list[str] = []
        labels: list[int] = []
        for name in list_class_folders(root):
            if name not in index:
                raise UserInputError(
                    f"ImageNet-64 (folder): class folder {root / name} has no counterpart in "
                    f"{Path(self.data_dir) / 'train'} (classes come from the train folders)"
                )
            found = sorted(str(p) for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            labels += [index[name]] * len(found)
        if not files:
            raise UserFileNotFoundError(
                f"ImageNet-64 (folder): no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}. "
                f"Expected: {FOLDER_LAYOUT}"
            )
        label_array = np.asarray(labels, dtype=np.int64)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            jobs = [(f, self.image_size) for f in files]
            bar = dict(total=len(files), desc=f"ImageNet-64 {split} images -> npy", disable=None)
            if self.num_workers > 0:
                import multiprocessing

                with multiprocessing.get_context().Pool(self.num_workers) as pool:
                    for i, arr in enumerate(tqdm(pool.imap(_load_folder_image, jobs, chunksize=64), **bar)):
                        yield arr[None], label_array[i : i + 1]
            else:
                for i, arr in enumerate(tqdm(map(_load_folder_image, jobs), **bar)):
                    yield arr[None], label_array[i : i + 1]

        info = {"inputs": str(root), "class_names": class_names, "num_classes": len(class_names)}
        self.split_files(split).write(len(files), chunks(), info)

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

    def _loader(self, dataset: ArrayImageDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("ImageNet64DataModule: call prepare_data() and setup() before requesting a dataloader")
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
