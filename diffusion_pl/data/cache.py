"""Prepared caches of image data sets: uint8 (N, S, S, C) .npy arrays with their labels and a manifest, written
atomically (temporary names, then renames; the manifest last) so that a reader only ever sees a complete cache."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from diffusion_pl.errors import UserInputError
from diffusion_pl.utils.files import atomic_write

MANIFEST_VERSION = 1


def tmp_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process and call (hidden: leading dot)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write(str(path), lambda f: f.write(json.dumps(obj, indent=1).encode()))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(str(path), lambda f: np.save(f, array, allow_pickle=False))


def digest(array: np.ndarray) -> str:
    """sha1 of an array's bytes."""
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


class PreparedSplit:
    """The cache files of one split: <prefix>_images.npy (N,S,S,C) uint8, <prefix>_labels.npy (N,) int64, manifest.

    Written atomically (temporary names, then renames; the manifest last), so processes preparing the same cache at
    once (one per node on shared storage) can only leave a complete cache. Derived label files
    (<prefix>_labels_<order>.npy with their own manifest, see :meth:`ordered_labels`) share the images.
    """

    def __init__(self, cache_dir: Path, source: str, split: str, image_size: int, channels: int = 3) -> None:
        self.source, self.split, self.image_size, self.channels = source, split, image_size, channels
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
            expected = (MANIFEST_VERSION, label_order, len(raw), digest(raw))
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
        atomic_save_npy(path, mapping[raw].astype(np.int64))
        manifest = {"version": MANIFEST_VERSION, "label_order": label_order, "count": len(raw),
                    "from": self.labels.name, "from_sha1": digest(raw)}  # fmt: skip
        atomic_write_json(manifest_path, manifest)
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
        s, c = self.image_size, self.channels
        if images.shape != (count, s, s, c) or images.dtype != np.uint8 or labels.shape != (count,):
            return None
        return manifest

    def write(self, count: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]], info: dict,
              allow_fewer: bool = False) -> int:  # fmt: skip
        """Stream (images NHWC, labels) chunks into temporary .npy files, then rename them; manifest last.

        ``count`` images are expected; with ``allow_fewer`` the chunks may hold fewer (skipped inputs) and the
        arrays are cut to the number received. Returns that number."""
        self.images.parent.mkdir(parents=True, exist_ok=True)
        tmp_images, tmp_labels = tmp_name(self.images), tmp_name(self.labels)
        shape = (self.image_size, self.image_size, self.channels)
        try:
            images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(count, *shape))
            labels = np.empty(count, dtype=np.int64)
            offset = 0
            for chunk_images, chunk_labels in chunks:
                n = len(chunk_labels)
                if offset + n > count:
                    raise UserInputError(
                        f"{self.source}: more than the {count} expected images for split {self.split!r}"
                    )
                images[offset : offset + n] = chunk_images
                labels[offset : offset + n] = chunk_labels
                offset += n
            if offset != count and not allow_fewer:
                raise UserInputError(f"{self.source}: got {offset} images for split {self.split!r}, expected {count}")
            images.flush()
            if offset != count:  # cut to the images received (a copy: a .npy header states the length)
                cut = np.lib.format.open_memmap(tmp_labels, mode="w+", dtype=np.uint8, shape=(offset, *shape))
                cut[:] = images[:offset]
                cut.flush()
                del cut, images
                os.replace(tmp_labels, tmp_images)
            else:
                del images
            with open(tmp_labels, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
                np.save(f, labels[:offset], allow_pickle=False)
            os.replace(tmp_images, self.images)
            os.replace(tmp_labels, self.labels)
        finally:
            for tmp in (tmp_images, tmp_labels):
                tmp.unlink(missing_ok=True)
        manifest = {
            "version": MANIFEST_VERSION,
            "source": self.source,
            "split": self.split,
            "image_size": self.image_size,
            "channels": self.channels,
            "count": offset,
            "images": self.images.name,
            "labels": self.labels.name,
            **info,
        }
        atomic_write_json(self.manifest, manifest)
        return offset
