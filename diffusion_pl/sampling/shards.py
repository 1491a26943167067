"""Sharded sample output: each shard (a contiguous block of sample indices) is one npz written atomically; an
interrupted run resumes by skipping finished shards; the merge writes the final ADM npz.

Layout of an output directory:
    <out>/samples.npz         arr_0 uint8 NHWC, arr_1 int64 labels (when the samples have labels)
    <out>/grid.png            PNG grid: one row per class when the samples have labels, else the first 64
    <out>/settings.json       the settings of the run (+ timing summary)
    <out>/shards/settings.json  the settings the shards were made with (a resume must match them)
    <out>/shards/shard_000012.npz  images, labels, indices of shard 12

--overwrite removes the previous samples.npz, grid.png and settings.json before the first new shard is written, so an
interrupted overwrite never leaves an old samples.npz next to new shards: its rerun without --overwrite resumes it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion_pl.errors import DiskFullError, UserFileExistsError, UserInputError, UserRuntimeError
from diffusion_pl.evaluation.npz import save_image_grid, save_samples_npz
from diffusion_pl.sampling.engine import SampleEngine
from diffusion_pl.utils.files import atomic_write, remove_folder, write_text
from diffusion_pl.utils.images import nchw_to_nhwc, to_uint8

SAMPLES_NAME = "samples.npz"
GRID_NAME = "grid.png"
SETTINGS_NAME = "settings.json"
SHARD_DIR = "shards"
# grid.png: at most GRID_MAX_ROWS classes (rows) x GRID_MAX_COLS samples of each; unlabelled samples: the first
# GRID_SQUARE in a square.
GRID_MAX_ROWS = 32
GRID_MAX_COLS = 16
GRID_SQUARE = 64
# The outputs of a finished run; samples.npz first: it is written last, and its presence means the run is complete.
FINAL_NAMES = (SAMPLES_NAME, GRID_NAME, SETTINGS_NAME)
# Fields of settings.json that describe the run's timing, not the samples (ignored when settings are compared).
TIMING_FIELDS = frozenset({"seconds"})


@dataclass(frozen=True)
class Shard:
    shard_id: int
    indices: list[int]


def plan_shards(num_samples: int, shard_size: int) -> list[Shard]:
    """Contiguous blocks of ``shard_size`` sample indices (the last may be shorter)."""
    if num_samples < 1:
        raise UserInputError(f"--num_samples must be >= 1, got {num_samples}")
    if shard_size < 1:
        raise UserInputError(f"--shard_size must be >= 1, got {shard_size}")
    return [
        Shard(k, list(range(start, min(start + shard_size, num_samples))))
        for k, start in enumerate(range(0, num_samples, shard_size))
    ]


def rank_shards(shards: Sequence[Shard], rank: int, world_size: int) -> list[Shard]:
    """The shards of one rank: shard k goes to rank k mod world_size."""
    return [s for s in shards if s.shard_id % world_size == rank]


def shard_path(shard_dir: str, shard_id: int) -> str:
    return os.path.join(shard_dir, f"shard_{shard_id:06d}.npz")


def read_shard(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of a finished shard, or None if the file is missing or unreadable (then it is redone)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def shard_files(shard_dir: str) -> list[str]:
    """The finished shard files in ``shard_dir`` (written atomically, so every file present is complete)."""
    return sorted(glob.glob(os.path.join(glob.escape(shard_dir), "shard_*.npz")))


@contextmanager
def resumable_on_disk_full(shard_dir: str) -> Iterator[None]:
    """Add to a DiskFullError what is kept and how to resume (rerun: finished shards are skipped)."""
    try:
        yield
    except DiskFullError as error:
        if getattr(error, "resume_hint", False):
            raise
        n = len(shard_files(shard_dir))
        wrapped = DiskFullError(
            f"disk full: {error}. Finished shards are kept ({n} shard file{'s' if n != 1 else ''} in {shard_dir}). "
            "Free some space and rerun the same command to resume: finished shards are skipped.",
            error.errno,
        )
        wrapped.resume_hint = True
        raise wrapped from error


def shard_done(shard_dir: str, shard: Shard) -> bool:
    arrays = read_shard(shard_path(shard_dir, shard.shard_id))
    return arrays is not None and "indices" in arrays and arrays["indices"].tolist() == shard.indices


def write_shard(shard_dir: str, shard: Shard, images_uint8_nhwc: np.ndarray, labels: np.ndarray | None) -> str:
    arrays = {"images": images_uint8_nhwc, "indices": np.asarray(shard.indices, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    return atomic_write(shard_path(shard_dir, shard.shard_id), lambda f: np.savez(f, **arrays))


def remove_outputs(out_dir: str) -> None:
    """--overwrite: remove the previous run's samples.npz, grid.png and settings.json (a link: the link only) before any
    new shard is written."""
    for name in FINAL_NAMES:
        path = os.path.join(out_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)


def read_settings(path: str) -> dict | None:
    """The settings recorded in a settings.json, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def recorded_shard_size(out_dir: str) -> int | None:
    """The shard_size the run in ``out_dir`` was made with (its shard settings, else its settings.json), if any: a
    resume that does not set --shard_size keeps it, whatever its batch size."""
    for path in (os.path.join(out_dir, SHARD_DIR, SETTINGS_NAME), os.path.join(out_dir, SETTINGS_NAME)):
        size = (read_settings(path) or {}).get("shard_size")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            return size
    return None


def settings_differences(recorded: dict, settings: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, value of ``settings`` as JSON)} of the keys that differ, sorted, timing fields ignored."""
    settings = json.loads(json.dumps(settings))
    keys = sorted((set(recorded) | set(settings)) - TIMING_FIELDS)
    return {k: (recorded.get(k), settings.get(k)) for k in keys if recorded.get(k) != settings.get(k)}


def prepare_shard_dir(shard_dir: str, settings: dict, overwrite: bool) -> None:
    """Create ``shard_dir`` or check that its shards were made with the same ``settings`` (resume).

    With ``overwrite`` an existing shard directory is emptied first. Different settings without ``overwrite`` raise
    when finished shards would be mixed with new ones; without any shard file yet, the new settings replace the old.
    """
    settings_path = os.path.join(shard_dir, SETTINGS_NAME)
    if overwrite:
        remove_folder(shard_dir, "--overwrite")  # a linked shards folder: the link only, never its target's files
    os.makedirs(shard_dir, exist_ok=True)
    text = json.dumps(settings, sort_keys=True, indent=1)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if previous == json.loads(text):
            return
        finished = shard_files(shard_dir)
        if finished:
            changed = list(settings_differences(previous, settings))
            raise UserInputError(
                f"{shard_dir} holds {len(finished)} finished shard(s) of a run with different settings "
                f"({', '.join(changed)} differ): rerun with the same settings to resume it, pass --overwrite to "
                "discard them, or choose another output directory"
            )
    with resumable_on_disk_full(shard_dir):
        write_text(settings_path, text)


def run_shards(
    engine: SampleEngine,
    shards: Sequence[Shard],
    shard_dir: str,
    batch_size: int,
    labels: np.ndarray | None = None,
    desc: str = "sampling",
    bar=None,
) -> tuple[int, int]:
    """Generate and write every shard of ``shards`` that is not already finished. Returns (done now, skipped).

    ``labels``: optional explicit labels for ALL samples (indexed by sample index). ``bar``: a progress bar from
    :meth:`SampleEngine.progress_bar` to update (default: a new one over these shards).
    """
    todo = [s for s in shards if not shard_done(shard_dir, s)]
    own_bar = bar is None
    if own_bar:
        bar = engine.progress_bar(num_batches_of(todo, batch_size), desc=desc)
    try:
        with resumable_on_disk_full(shard_dir):
            for shard in todo:
                shard_labels = None if labels is None else labels[shard.indices]
                images, out_labels = [], []
                for batch in engine.generate(shard.indices, batch_size, labels=shard_labels, bar=bar):
                    images.append(nchw_to_nhwc(to_uint8(batch.images)))
                    if batch.labels is not None:
                        out_labels.append(batch.labels.numpy())
                write_shard(
                    shard_dir, shard, np.concatenate(images), np.concatenate(out_labels) if out_labels else None
                )
    finally:
        if own_bar:
            bar.close()
    return len(todo), len(shards) - len(todo)


def num_batches_of(shards: Sequence[Shard], batch_size: int) -> int:
    return sum((len(s.indices) + batch_size - 1) // batch_size for s in shards)


def merge_shards(shard_dir: str, shards: Sequence[Shard]) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate finished shards in sample-index order -> (uint8 NHWC images, labels or None)."""
    images, labels = [], []
    for shard in shards:
        path = shard_path(shard_dir, shard.shard_id)
        arrays = read_shard(path)
        if arrays is None or arrays.get("indices", np.zeros(0)).tolist() != shard.indices:
            raise UserRuntimeError(f"{path}: shard missing or incomplete; rerun the same command to finish it")
        images.append(arrays["images"])
        if "labels" in arrays:
            labels.append(arrays["labels"])
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def grid_layout(
    num_samples: int,
    labels: np.ndarray | None,
    max_rows: int = GRID_MAX_ROWS,
    max_cols: int = GRID_MAX_COLS,
    square: int = GRID_SQUARE,
) -> tuple[list[int | None], int]:
    """The cells of grid.png in row-major order (sample indices; None = an empty cell) and the number of columns.

    With labels: one row per class, classes in increasing order (the first ``max_rows`` classes present), each row
    holding that class's first ``max_cols`` samples in sample-index order; rows of classes with fewer samples end in
    empty cells, so every row starts with a new class. Without labels: the first ``square`` samples in a square.
    """
    if labels is None:
        n = min(num_samples, square)
        return list(range(n)), max(1, math.ceil(math.sqrt(n)))
    labels = np.asarray(labels)
    rows = [np.flatnonzero(labels == c)[:max_cols].tolist() for c in np.unique(labels)[:max_rows]]
    ncols = max((len(r) for r in rows), default=1)
    cells: list[int | None] = []
    for row in rows:
        cells += row + [None] * (ncols - len(row))
    return cells, ncols


def grid_images(images: np.ndarray, labels: np.ndarray | None) -> tuple[torch.Tensor, int]:
    """uint8 NCHW images of the grid cells (empty cells black) and the number of columns (see :func:`grid_layout`)."""
    cells, ncols = grid_layout(images.shape[0], labels)
    blank = np.zeros(images.shape[1:], dtype=np.uint8)
    chosen = np.stack([images[i] if i is not None else blank for i in cells])
    return torch.from_numpy(chosen).permute(0, 3, 1, 2).contiguous(), ncols


def write_outputs(
    out_dir: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    settings: dict,
    overwrite: bool,
) -> dict[str, str]:
    """Write samples.npz (ADM format), grid.png (one row per class, or the first 64 samples without labels: see
    :func:`grid_layout`) and settings.json. Returns the paths."""
    final = os.path.join(out_dir, SAMPLES_NAME)
    if not overwrite and os.path.exists(final):
        raise UserFileExistsError(
            f"{final} already exists; pass --overwrite to replace it, or choose another --out_dir"
        )
    # samples.npz last: its presence means the run is complete (a rerun after a failure here resumes).
    with resumable_on_disk_full(os.path.join(out_dir, SHARD_DIR)):
        cells, ncols = grid_images(images, labels)
        grid = save_image_grid(os.path.join(out_dir, GRID_NAME), cells, nrow=ncols, overwrite=True)
        text = json.dumps(settings, indent=2, sort_keys=True)
        js = write_text(os.path.join(out_dir, SETTINGS_NAME), text)
        npz = save_samples_npz(os.path.join(out_dir, SAMPLES_NAME), images, labels, overwrite=overwrite)
    return {"samples": npz, "grid": grid, "settings": js}
