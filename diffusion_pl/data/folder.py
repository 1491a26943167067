"""Reading a folder of image files: the listing (sorted files, labels from class folders, a fingerprint of names,
sizes and mtimes), the checks of every file, and ADM's resize to a square (guided-diffusion's image_datasets.py).

Used by ImageFolderDataModule and by the folder source of ImageNet64DataModule.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffusion_pl.errors import UserFileNotFoundError, UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
#: channels -> PIL mode: greyscale, RGB (an alpha channel is dropped, not composited), RGBA
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_LISTED = 5


def _named(paths: Sequence[str], total: int | None = None) -> str:
    total = len(paths) if total is None else total
    shown = ", ".join(str(p) for p in paths[:_LISTED])
    return shown + (f" (and {total - _LISTED} more)" if total > _LISTED else "")


# ------------------------------------------------------------------------------------------------ resize
def box_halve(image: Image.Image, target: int) -> Image.Image:
    """Halve both sides with a BOX filter while the short side is >= 2 * target (ADM's anti-aliased downsampling)."""
    while min(*image.size) >= 2 * target:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    return image


def _bicubic_short_side(image: Image.Image, short_side: int) -> np.ndarray:
    scale = short_side / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    return np.asarray(image)


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing: BOX halving while the short side >= 2 * size, BICUBIC to short side = size, centre crop.
    -> uint8 (size, size) or (size, size, bands), in the image's own mode (convert it first)."""
    arr = _bicubic_short_side(box_halve(image, image_size), image_size)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(image: Image.Image, image_size: int, rng: random.Random, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0) -> np.ndarray:  # fmt: skip
    """ADM's random-crop augmentation: short side s ~ U{ceil(size / max_frac) .. ceil(size / min_frac)}, BOX halving
    while the short side >= 2 s, BICUBIC to short side s, a uniformly placed size x size crop. Draws from ``rng``
    in the reference's order (s, top, left)."""
    short_side = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = _bicubic_short_side(box_halve(image, short_side), short_side)
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


# ------------------------------------------------------------------------------------------------ listing
@dataclass
class FolderListing:
    """The image files under ``root`` (paths relative to it, sorted) with their labels.

    ``class_names``: the sorted first-level sub-folders (label = index), or None (unconditional: labels all 0).
    ``fingerprint``: sha1 of every file's relative path, size and mtime and of the class names."""

    root: Path
    files: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    fingerprint: str

    def paths(self, indices: Sequence[int] | None = None) -> list[str]:
        chosen = self.files if indices is None else [self.files[i] for i in indices]
        return [str(self.root / f) for f in chosen]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_class_folders(root: Path, name: str, exclude: Path | None = None) -> list[str]:
    """Sorted visible sub-folder names of ``root`` (the classes), ``exclude`` (a cache folder inside) left out."""
    if not root.is_dir():
        raise UserFileNotFoundError(f"{name}: no directory {root}")
    skip = exclude.resolve() if exclude is not None else None
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name) and p.resolve() != skip)


def _walk(root: Path, skip: Path | None) -> tuple[list[str], list[str]]:
    """(image files, other files) under root, relative posix paths, hidden entries and ``skip`` left out."""
    images, others = [], []
    for directory, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _visible(d) and (skip is None or Path(directory, d).resolve() != skip))
        for f in files:
            if _visible(f):
                rel = Path(directory, f).relative_to(root).as_posix()
                (images if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS else others).append(rel)
    return sorted(images), sorted(others)


def list_images(root: Path, class_cond: bool, name: str, exclude: Path | None = None) -> FolderListing:
    """The image files under ``root`` (nested folders; hidden ones and ``exclude`` skipped). With ``class_cond`` every
    image must lie inside a first-level class folder and is labelled by its folder's index in sorted order."""
    if not root.is_dir():
        raise UserFileNotFoundError(f"{name}: no directory {root}; give data_dir, the folder of your images")
    skip = exclude.resolve() if exclude is not None else None
    images, others = _walk(root, skip)
    if not images and not others:
        raise UserInputError(f"{name}: {root} is empty; put image files ({', '.join(IMAGE_EXTENSIONS)}) in it")
    if not images:
        raise UserInputError(
            f"{name}: no images of the known kinds ({', '.join(IMAGE_EXTENSIONS)}) under {root}; found "
            f"{len(others)} other files, e.g. {_named(others)}"
        )
    if others:
        kinds = sorted({os.path.splitext(f)[1].lower() or "(no extension)" for f in others})
        warnings.warn(f"{name}: {len(others)} files under {root} are not images of the known kinds "
                      f"({', '.join(IMAGE_EXTENSIONS)}) and are left out: {', '.join(kinds[:10])}, e.g. "
                      f"{_named(others)}", stacklevel=2)  # fmt: skip
    class_names, labels = None, np.zeros(len(images), dtype=np.int64)
    if class_cond:
        class_names = list_class_folders(root, name, exclude)
        loose = [f for f in images if "/" not in f]
        if loose:
            raise UserInputError(
                f"{name}: class_cond is true, so every image must be in a class folder of {root}, but {len(loose)} "
                f"lie directly in it: {_named(loose)}. Move them into class folders, or set class_cond: false"
            )
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.asarray([index[f.split("/", 1)[0]] for f in images], dtype=np.int64)
    sha = hashlib.sha1()
    for rel in images:
        st = os.stat(root / rel)
        sha.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    sha.update(repr(class_names).encode())
    return FolderListing(root, images, labels, class_names, sha.hexdigest())


def empty_classes(listing: FolderListing) -> list[str]:
    """The class folders of a class-conditional listing holding no image."""
    if listing.class_names is None:
        return []
    counts = np.bincount(listing.labels, minlength=len(listing.class_names))
    return [c for c, n in zip(listing.class_names, counts, strict=True) if n == 0]


# ------------------------------------------------------------------------------------------------ reading
def open_image(path: str, channels: int) -> Image.Image:
    """Decode a file completely and convert it to the mode of ``channels`` (:data:`CHANNEL_MODES`).

    16-bit greyscale files (PIL modes "I;16*" and "I") are scaled to 8 bits first, v -> round(v / 257): PIL's own
    conversion (and the reference's ``convert("RGB")``) clips them at 255, which turns most of an image white."""
    with Image.open(path) as image:
        image.load()  # decodes everything: a truncated file fails here
        if image.mode.startswith("I;16") or image.mode == "I":
            values = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
        return image.convert(CHANNEL_MODES[channels])


def image_problem(path: str, image_size: int) -> tuple[str, str] | None:
    """("unreadable" | "small", text) from a file's header, or None: the check before any decoding."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return "unreadable", f"{path} ({type(err).__name__}: {str(err)[:120]})"
    if min(width, height) < image_size:
        return "small", f"{path} ({width}x{height})"
    return None


def decode_center(args: tuple[str, int, int]) -> np.ndarray | str:
    """(path, image_size, channels) -> uint8 (S, S, C) by :func:`center_crop_arr`, or the error text."""
    path, image_size, channels = args
    try:
        arr = center_crop_arr(open_image(path, channels), image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{path} ({type(err).__name__}: {str(err)[:120]})"
    return arr[..., None] if arr.ndim == 2 else arr


def parallel_map(fn: Callable, jobs: Sequence, num_workers: int, desc: str) -> Iterator:
    """``fn`` over ``jobs`` in order, on ``num_workers`` processes (0: this one), with a progress bar."""
    bar = dict(total=len(jobs), desc=desc, disable=None)
    if num_workers > 0 and len(jobs) > 1:
        with multiprocessing.get_context().Pool(min(num_workers, len(jobs))) as pool:
            yield from tqdm(pool.imap(fn, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers)))), **bar)
    else:
        yield from tqdm(map(fn, jobs), **bar)


def check_files(paths: Sequence[str], image_size: int, *, name: str, skip_bad: bool, allow_upscale: bool,
                num_workers: int = 0) -> set[str]:  # fmt: skip
    """Read every file's header; refuse unreadable files (unless ``skip_bad``: returned) and files whose short side
    is below image_size (unless ``allow_upscale``). One error naming the files."""
    found: dict[str, list[str]] = {"unreadable": [], "small": []}
    bad: set[str] = set()
    check = _HeaderCheck(image_size)
    for path, problem in zip(paths, parallel_map(check, paths, num_workers, f"{name}: checking files"), strict=True):
        if problem is not None and not (problem[0] == "small" and allow_upscale):
            found[problem[0]].append(problem[1])
            if problem[0] == "unreadable":
                bad.add(path)
    if found["unreadable"] and not skip_bad:
        raise UserInputError(
            f"{name}: {len(found['unreadable'])} files cannot be read as images: {_named(found['unreadable'])}. "
            "Remove or replace them, or set skip_bad_images: true to leave them out"
        )
    if found["small"]:
        raise UserInputError(
            f"{name}: {len(found['small'])} images are smaller than image_size {image_size} (short side): "
            f"{_named(found['small'])}. Remove them, lower image_size, or set allow_upscale: true to enlarge them"
        )
    return bad


class _HeaderCheck:
    """Picklable ``path -> image_problem(path, image_size)`` for worker processes."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, path: str) -> tuple[str, str] | None:
        return image_problem(path, self.image_size)


Chunks = Iterator[tuple[np.ndarray, np.ndarray]]


def decoded_chunks(paths: Sequence[str], labels: np.ndarray, image_size: int, channels: int, *, name: str,
                   num_workers: int, desc: str, skipped: list[str] | None = None,
                   decode: Callable = decode_center, skippable: bool = True) -> Chunks:  # fmt: skip
    """(uint8 (1, S, S, C), label (1,)) per file by ``decode`` (:func:`decode_center`), for PreparedSplit.write. A
    file that fails to decode (e.g. truncated) is appended to ``skipped`` when a list is given, else refused by name
    (``skippable``: the message names the skip_bad_images option)."""
    jobs = [(p, image_size, channels) for p in paths]
    for i, arr in enumerate(parallel_map(decode, jobs, num_workers, desc)):
        if isinstance(arr, str):
            if skipped is None:
                raise UserInputError(
                    f"{name}: cannot decode image {arr}: the file is damaged or truncated. Replace or remove it"
                    + (", or set skip_bad_images: true to leave such files out" if skippable else "")
                )
            skipped.append(arr)
            continue
        yield arr[None], labels[i : i + 1]
