"""ADM's random-crop augmentation on a prepared cache: the images are stored once, reduced as far as every crop of
:func:`~diffusion_pl.data.folder.random_crop_arr` would reduce them, and the random part runs per item.

random_crop_arr draws a short side s in [ceil(S / max_frac), ceil(S / min_frac)] and halves the image with a BOX
filter while its short side is >= 2 s. Halving while the short side is >= 2 * ceil(S / min_frac) (the largest s) is
a prefix of that for every draw, so it is done once when the cache is prepared (:func:`decode_reduced`); the rest
(further halvings, BICUBIC to s, the random crop) is exactly the reference's, per item (:class:`RandomCropDataset`).
The reduced images keep their aspect ratio, so they are stored ragged: one flat uint8 file and an (offset, h, w) index.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffusion_pl.data.cache import MANIFEST_VERSION, atomic_write_json, tmp_name
from diffusion_pl.data.folder import CHANNEL_MODES, box_halve, center_crop_arr, open_image, random_crop_arr
from diffusion_pl.utils.images import from_uint8

MIN_CROP_FRAC, MAX_CROP_FRAC = 0.8, 1.0


def largest_short_side(image_size: int) -> int:
    """The largest short side random_crop_arr resizes to: ceil(S / min_crop_frac)."""
    return math.ceil(image_size / MIN_CROP_FRAC)


def decode_reduced(args: tuple[str, int, int]) -> np.ndarray | str:
    """(path, image_size, channels) -> uint8 (h, w, C) BOX-halved while the short side >= 2 * largest_short_side,
    or the error text."""
    path, image_size, channels = args
    try:
        arr = np.asarray(box_halve(open_image(path, channels), largest_short_side(image_size)))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{path} ({type(err).__name__}: {str(err)[:120]})"
    return arr[..., None] if arr.ndim == 2 else arr


class RaggedSplit:
    """<prefix>_pixels.bin (all images' bytes), <prefix>_index.npy (N, 3) int64 (offset, h, w), <prefix>_labels.npy,
    <prefix>_manifest.json; written under temporary names and renamed, the manifest last."""

    def __init__(self, cache_dir: Path, prefix: str, channels: int) -> None:
        self.channels, self.split = channels, prefix.rsplit("_", 1)[-1]
        self.pixels = cache_dir / f"{prefix}_pixels.bin"
        self.index = cache_dir / f"{prefix}_index.npy"
        self.labels = cache_dir / f"{prefix}_labels.npy"
        self.manifest = cache_dir / f"{prefix}_manifest.json"

    def read_manifest(self) -> dict | None:
        """The manifest if the split is complete and consistent with its files, else None."""
        try:
            manifest = json.loads(self.manifest.read_text())
            index, labels = np.load(self.index, mmap_mode="r"), np.load(self.labels, mmap_mode="r")
            size = self.pixels.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        count = manifest.get("count")
        ends = index[:, 0] + index[:, 1] * index[:, 2] * self.channels if len(index) else np.zeros(0)
        if manifest.get("version") != MANIFEST_VERSION or index.shape != (count, 3) or labels.shape != (count,):
            return None
        return manifest if int(ends.max(initial=0)) == size else None

    def write(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], info: dict) -> int:
        """Append each (1, h, w, C) image's bytes; returns the number of images."""
        self.pixels.parent.mkdir(parents=True, exist_ok=True)
        temps = [tmp_name(p) for p in (self.pixels, self.index, self.labels)]
        rows, labels, offset = [], [], 0
        try:
            with open(temps[0], "wb") as f:
                for images, chunk_labels in chunks:
                    for arr, label in zip(images, chunk_labels, strict=True):
                        f.write(np.ascontiguousarray(arr).tobytes())
                        rows.append((offset, arr.shape[0], arr.shape[1]))
                        labels.append(int(label))
                        offset += arr.size
            for tmp, array in (
                (temps[1], np.asarray(rows, np.int64).reshape(-1, 3)),
                (temps[2], np.asarray(labels, np.int64)),
            ):
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
            for tmp, final in zip(temps, (self.pixels, self.index, self.labels), strict=True):
                os.replace(tmp, final)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        atomic_write_json(self.manifest, {"version": MANIFEST_VERSION, "split": self.split, "count": len(rows),
                                          "channels": self.channels, "bytes": offset, **info})  # fmt: skip
        return len(rows)


class RandomCropDataset(Dataset):
    """Items (x, y) of a :class:`RaggedSplit`: x = random_crop_arr of the stored image (draws from torch's global RNG,
    which the training DataLoader seeds per example: data/resumable.py), optionally flipped, float CHW in [-1, 1].

    With ``random_crop`` false (evaluation: data.common.evaluation_dataloader) x is center_crop_arr of the stored
    image, which equals center_crop_arr of the original file: the stored image is the original after the first
    BOX halvings, and center_crop_arr takes the same halvings (it halves at least as often as any random crop)."""

    def __init__(self, split: RaggedSplit, image_size: int, random_flip: bool = True, random_crop: bool = True) -> None:
        self.paths = (str(split.pixels), str(split.index), str(split.labels))
        self.channels, self.image_size, self.random_flip = split.channels, image_size, random_flip
        self.random_crop = random_crop
        self.index, self.labels = np.load(split.index), np.load(split.labels)
        self._pixels: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # workers map the file themselves

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pixels is None:
            self._pixels = np.memmap(self.paths[0], dtype=np.uint8, mode="r")
        offset, h, w = (int(v) for v in self.index[i])
        arr = np.array(self._pixels[offset : offset + h * w * self.channels]).reshape(h, w, self.channels)
        image = Image.fromarray(arr[..., 0] if self.channels == 1 else arr, CHANNEL_MODES[self.channels])
        if self.random_crop:
            rng = random.Random(int(torch.randint(0, 2**62, ())))
            hwc = random_crop_arr(image, self.image_size, rng, MIN_CROP_FRAC, MAX_CROP_FRAC)
        else:
            hwc = center_crop_arr(image, self.image_size)
        hwc = hwc[..., None] if hwc.ndim == 2 else hwc
        if self.random_flip and torch.rand(()) < 0.5:
            hwc = hwc[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        return from_uint8(chw), torch.tensor(int(self.labels[i]), dtype=torch.int64)
