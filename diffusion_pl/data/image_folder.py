"""ImageFolderDataModule: your own folder of images, prepared once into a uint8 memmap cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffusion_pl.data.cache import PreparedSplit, atomic_write_json
from diffusion_pl.data.common import ArrayImageDataset, PreparedImageDataModule
from diffusion_pl.data.folder import (
    CHANNEL_MODES,
    FolderListing,
    check_files,
    decode_center,
    decoded_chunks,
    empty_classes,
    list_class_folders,
    list_images,
)
from diffusion_pl.data.random_crop import RaggedSplit, RandomCropDataset, decode_reduced
from diffusion_pl.errors import UserInputError

NAME = "ImageFolderDataModule"
CACHE_VERSION = 2  # 2: the path-hash split (1: validation files chosen by their position in the listing)
#: the rule of split_indices, saved in checkpoints (checkpoints without it were split by position in the listing)
SPLIT_RULE = "path-hash-v1"
CLASSES_FILE = "classes.json"
SPLITS = ("train", "val")


class ImageFolderDataModule(PreparedImageDataModule):
    """A folder tree of images (png, jpg, jpeg, webp, gif, bmp; nested folders; hidden entries skipped).

    class_cond: each first-level sub-folder of data_dir is a class, numbered in sorted name order (num_classes = the
    number of folders; every image must lie in one); false: all images, unconditional (num_classes 0, y all 0).
    Images become channels (1 greyscale, 3 RGB: alpha dropped, 4 RGBA) and image_size x image_size as ADM does: BOX
    halving while the short side >= 2 * image_size, BICUBIC to image_size, centre crop. Images whose short side is
    below image_size are refused unless allow_upscale; unreadable or damaged files are refused by name unless
    skip_bad_images (then left out and counted). About val_fraction of the files form the validation split (val =
    test), each file chosen by a hash of split_seed and its path (split_indices: adding or removing files moves no
    other file between the splits); random_flip flips training images horizontally; random_crop replaces the
    training images centre crop by ADM's random crop (a random short side in [S, ceil(S / 0.8)], then a random S x S
    window; the cache then holds each training image reduced only as far as every such crop allows: several times
    the size).
    prepare_data decodes everything once into cache_dir (default data_dir/.diffusion_pl_cache), in a sub-folder keyed
    by the file listing (names, sizes, mtimes) and these settings: a changed file or setting prepares a new cache.
    The class mapping is saved there (classes.json) and in checkpoints (this DataModule's state). The loader options
    (batch_size, num_workers, random_flip, prepare_data_per_node: false for a cache on storage all nodes share) are
    those of PreparedImageDataModule.
    """

    def __init__(
        self,
        data_dir: str = "data/images",
        *,
        image_size: int = 64,
        channels: int = 3,
        class_cond: bool = True,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        random_crop: bool = False,
        allow_upscale: bool = False,
        skip_bad_images: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if channels not in CHANNEL_MODES:
            raise UserInputError(f"{NAME}: channels must be 1 (greyscale), 3 (RGB) or 4 (RGBA), got {channels}")
        if image_size < 1:
            raise UserInputError(f"{NAME}: image_size must be >= 1, got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UserInputError(f"{NAME}: val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        cache_root = Path(cache_dir) if cache_dir is not None else Path(data_dir) / ".diffusion_pl_cache"
        # The classes are known from the folder names alone, before prepare_data (the model checks num_classes).
        class_names = list_class_folders(Path(data_dir), NAME, cache_root) if class_cond else None
        if class_cond and not class_names:
            raise UserInputError(
                f"{NAME}: class_cond is true but {data_dir} has no sub-folders (one per class); put each class's "
                "images in its own folder, or set class_cond: false"
            )
        super().__init__(**kwargs)
        self.image_size, self.in_channels = image_size, channels
        self.num_classes = len(class_names) if class_names is not None else 0
        self.data_dir, self.cache_root, self.class_names = data_dir, cache_root, class_names
        self.class_cond, self.val_fraction, self.split_seed = class_cond, val_fraction, split_seed
        self.allow_upscale, self.skip_bad_images, self.random_crop = allow_upscale, skip_bad_images, random_crop

    # ------------------------------------------------------------------------------------------------ the cache
    def listing(self) -> FolderListing:
        """The current files (checked: no class folder without images)."""
        listing = list_images(Path(self.data_dir), self.class_cond, NAME, exclude=self.cache_root)
        empty = empty_classes(listing)
        if empty:
            raise UserInputError(
                f"{NAME}: class folders without images under {self.data_dir}: {', '.join(empty[:10])}"
                f"{' ...' if len(empty) > 10 else ''}. Add images or remove the folders"
            )
        if listing.class_names is not None and listing.class_names != self.class_names:
            raise UserInputError(f"{NAME}: the class folders of {self.data_dir} changed while running; start again")
        return listing

    def cache_key(self, listing: FolderListing) -> str:
        """sha1 of the listing's fingerprint and every setting that changes the prepared arrays."""
        settings = dict(version=CACHE_VERSION, image_size=self.image_size, channels=self.in_channels,
                        class_cond=self.class_cond, val_fraction=self.val_fraction, split_seed=self.split_seed,
                        allow_upscale=self.allow_upscale, skip_bad_images=self.skip_bad_images,
                        random_crop=self.random_crop)  # fmt: skip
        text = json.dumps(settings, sort_keys=True) + listing.fingerprint
        return hashlib.sha1(text.encode()).hexdigest()

    def cache_dir(self, listing: FolderListing) -> Path:
        return self.cache_root / f"{self.image_size}px_{self.in_channels}ch_{self.cache_key(listing)[:16]}"

    def split_files(self, listing: FolderListing, split: str) -> PreparedSplit | RaggedSplit:
        """The cache files of a split: centre crops, or (random_crop, train) the reduced images to crop from."""
        if self.random_crop and split == "train":
            return RaggedSplit(self.cache_dir(listing), f"folder{self.image_size}_reduced_{split}", self.in_channels)
        return PreparedSplit(self.cache_dir(listing), "folder", split, self.image_size, self.in_channels)

    def split_indices(self, files: Sequence[str]) -> dict[str, np.ndarray]:
        """Sorted indices into ``files`` (paths relative to data_dir, as FolderListing.files) of train and val.

        Rule SPLIT_RULE: a file is in val iff u = (first 52 bits of sha1(f"{split_seed}:{path}")) / 2**52, in [0, 1),
        is below val_fraction. A file's split depends only on split_seed and its own path, so adding, removing or
        renaming other files moves no file between the splits. Each file is drawn on its own: the val share is
        val_fraction only on average (binomial). At least one file in each split: if no file falls in val, the one
        with the smallest u goes to val; if all do, the one with the largest u goes to train (only then do the other
        files matter)."""
        if len(files) < 2:
            raise UserInputError(f"{NAME}: {self.data_dir} holds {len(files)} image; a train and a val split need >= 2")
        u = np.array([_unit_hash(f"{self.split_seed}:{path}") for path in files])
        val = u < self.val_fraction
        if not val.any():
            val[np.argmin(u)] = True
        elif val.all():
            val[np.argmax(u)] = False
        return {"val": np.flatnonzero(val), "train": np.flatnonzero(~val)}

    def prepare_data(self) -> None:
        """Check the files and decode them into the cache of the current listing and settings, unless complete.

        Lightning calls this on one process per node before setup. Every file is written under a temporary name and
        renamed, so concurrent preparations on shared storage cannot leave a truncated cache."""
        listing = self.listing()
        if all(self.split_files(listing, s).read_manifest() is not None for s in SPLITS):
            return
        directory = self.cache_dir(listing)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # read-only data folder, a file in the way, ...
            raise UserInputError(f"{NAME}: cannot create the cache folder {directory} ({err.strerror or err}); set "
                                 "cache_dir to a writable folder") from err  # fmt: skip
        paths = listing.paths()
        bad = check_files(paths, self.image_size, name=NAME, skip_bad=self.skip_bad_images,
                          allow_upscale=self.allow_upscale, num_workers=self.num_workers)  # fmt: skip
        rank_zero_info(f"{NAME}: preparing {len(paths)} images of {self.data_dir} into {directory}")
        atomic_write_json(directory / CLASSES_FILE, {"class_names": listing.class_names, "data_dir": self.data_dir})
        for split, indices in self.split_indices(listing.files).items():
            skipped = [paths[i] for i in indices if paths[i] in bad]  # the manifest lists the final list
            good = [i for i in indices if paths[i] not in bad]
            files = self.split_files(listing, split)
            decode = decode_reduced if isinstance(files, RaggedSplit) else decode_center
            chunks = decoded_chunks([paths[i] for i in good], listing.labels[good], self.image_size,
                                    self.in_channels, name=NAME, num_workers=self.num_workers,
                                    desc=f"{NAME}: {split} images -> cache",
                                    skipped=skipped if self.skip_bad_images else None,
                                    decode=decode)  # fmt: skip
            info = {"data_dir": str(Path(self.data_dir).resolve()), "class_names": listing.class_names,
                    "skipped": skipped}  # fmt: skip
            if isinstance(files, RaggedSplit):
                kept = files.write(chunks, info)
            else:
                kept = files.write(len(good), chunks, info, allow_fewer=self.skip_bad_images)
            if kept == 0:
                files.manifest.unlink(missing_ok=True)  # not a usable cache
                raise UserInputError(f"{NAME}: no readable image left in the {split} split of {self.data_dir}")

    # ------------------------------------------------------------------------------------------------ loading
    def _open(self, files: PreparedSplit | RaggedSplit, random_flip: bool) -> ArrayImageDataset | RandomCropDataset:
        manifest = files.read_manifest()
        if manifest is None:
            raise RuntimeError(
                f"{NAME}: no complete prepared {files.split} split for the current files and settings in "
                f"{files.manifest.parent}. Call prepare_data() first (the Trainer does this before setup)."
            )
        skipped = manifest.get("skipped") or []
        if skipped:
            rank_zero_warn(f"{NAME}: {len(skipped)} unreadable or damaged files of the {files.split} split are left "
                           f"out (skip_bad_images), e.g. {', '.join(skipped[:3])}")  # fmt: skip
        if isinstance(files, RaggedSplit):
            return RandomCropDataset(files, self.image_size, random_flip=random_flip)
        return ArrayImageDataset(files.images, files.labels, random_flip=random_flip)

    def setup(self, stage: str | None = None) -> None:
        listing = self.listing()
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = self._open(self.split_files(listing, "train"), self.random_flip)
        if self.val_dataset is None:
            self.val_dataset = self._open(self.split_files(listing, "val"), False)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the label -> class folder mapping and the rule of the train / val split."""
        return {"class_names": self.class_names, "image_size": self.image_size, "channels": self.in_channels,
                "split": SPLIT_RULE}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: the folder's classes must be the ones the checkpoint was trained with; a checkpoint whose
        validation split was chosen by another rule is resumed with a warning."""
        saved = state_dict.get("class_names")
        if saved != self.class_names:
            raise UserInputError(
                f"{NAME}: the checkpoint was trained with classes {_short(saved)}, but {self.data_dir} has "
                f"{_short(self.class_names)}: its labels would mean other classes. Resume on the same class folders"
            )
        rule = state_dict.get("split")
        if rule != SPLIT_RULE:
            older = "an older rule (by position in the file listing)" if rule is None else f"another rule ({rule})"
            rank_zero_warn(
                f"{NAME}: the checkpoint's validation split was chosen by {older}, this version uses {SPLIT_RULE}: "
                "some validation images of the checkpoint's run may now be in the training split (and the other "
                "way round), so its validation losses are not comparable with later ones"
            )


def _unit_hash(text: str) -> float:
    """The first 52 bits of sha1(text) as a float in [0, 1) (exact: float64 holds 52 bits)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:13], 16) / 2**52


def _short(names: list[str] | None) -> str:
    if names is None:
        return "none (unconditional)"
    return f"{len(names)} [{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}]"
