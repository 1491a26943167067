"""grid.png of `diffusion-pl sample`: one row per class (increasing), samples of a class in index order, capped at
32 rows x 16 columns; unlabelled samples: the first 64 in a square. Checked on the PNG's pixel blocks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from sampling_helpers import run_command

from diffusion_pl.commands.sample import sample
from diffusion_pl.evaluation import load_samples_npz
from diffusion_pl.sampling import grid_layout
from diffusion_pl.sampling.shards import write_outputs

PAD = 2  # make_grid padding


def distinct_images(n: int, size: int = 4, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images that differ from each other (random pixels, none all black)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(n, size, size, channels), dtype=np.uint8)


def read_blocks(path: str, size: int) -> tuple[np.ndarray, int, int]:
    """The PNG as (rows, cols, size, size, 3) blocks without the padding."""
    with Image.open(path) as image:
        grid = np.asarray(image.convert("RGB"))
    step = size + PAD
    rows, cols = (grid.shape[0] - PAD) // step, (grid.shape[1] - PAD) // step
    assert grid.shape[:2] == (rows * step + PAD, cols * step + PAD)
    blocks = np.stack([
        np.stack([grid[PAD + r * step : PAD + r * step + size, PAD + c * step : PAD + c * step + size]
                  for c in range(cols)])
        for r in range(rows)
    ])  # fmt: skip
    return blocks, rows, cols


def as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def test_layout_balanced_80_on_10_classes_is_10_rows_of_8():
    labels = np.arange(80) % 10
    cells, ncols = grid_layout(80, labels)
    assert ncols == 8 and len(cells) == 80
    rows = [cells[r * 8 : (r + 1) * 8] for r in range(10)]
    for c, row in enumerate(rows):
        assert row == [c + 10 * k for k in range(8)]  # class c, in sample-index order


def test_layout_uneven_classes_capped_and_unlabelled():
    labels = np.array([5, 2, 5, 9, 2, 5])
    cells, ncols = grid_layout(6, labels)
    assert ncols == 3
    assert cells == [1, 4, None, 0, 2, 5, 3, None, None]  # rows: class 2, 5, 9 (increasing)

    labels = np.repeat(np.arange(40), 20)[np.random.default_rng(0).permutation(800)]
    cells, ncols = grid_layout(800, labels)
    assert ncols == 16 and len(cells) == 32 * 16
    for r in range(32):
        row = cells[r * 16 : (r + 1) * 16]
        assert row == np.flatnonzero(labels == r)[:16].tolist()

    assert grid_layout(100, None) == (list(range(64)), 8)
    assert grid_layout(10, None) == (list(range(10)), 4)


def test_grid_png_blocks_match_the_samples(tmp_path):
    images = distinct_images(11)
    labels = np.array([3, 0, 3, 1, 0, 3, 3, 1, 0, 0, 0])
    paths = write_outputs(str(tmp_path), images, labels, {}, overwrite=False)
    blocks, rows, cols = read_blocks(paths["grid"], 4)
    assert (rows, cols) == (3, 5)  # classes 0, 1, 3; class 0 has the most samples (5)
    expected = {0: [1, 4, 8, 9, 10], 1: [3, 7], 3: [0, 2, 5, 6]}
    for r, cls in enumerate(sorted(expected)):
        for c in range(cols):
            if c < len(expected[cls]):
                np.testing.assert_array_equal(blocks[r, c], images[expected[cls][c]])
            else:
                assert (blocks[r, c] == 0).all()  # empty cell
    # without labels: the first 64 in a square
    images = distinct_images(70, seed=1)
    paths = write_outputs(str(tmp_path / "nolabels"), images, None, {}, overwrite=False)
    blocks, rows, cols = read_blocks(paths["grid"], 4)
    assert (rows, cols) == (8, 8)
    for i in range(64):
        np.testing.assert_array_equal(blocks[i // 8, i % 8], images[i])


@pytest.mark.slow
def test_sample_command_grid_rows_are_classes(ckpts, tmp_path):
    out = str(tmp_path / "balanced")
    run_command(sample, out_dir=out, ckpt=ckpts["cond"], num_samples=9, sample_batch_size=9, steps="2",
                label_mode="balanced", accelerator="cpu")  # fmt: skip
    images, labels = load_samples_npz(os.path.join(out, "samples.npz"))
    assert labels.tolist() == [0, 1, 2] * 3
    blocks, rows, cols = read_blocks(os.path.join(out, "grid.png"), 8)
    assert (rows, cols) == (3, 3)  # the tiny model has 3 classes: 3 rows of 3
    for r in range(3):
        for c in range(3):
            np.testing.assert_array_equal(blocks[r, c], as_rgb(images[r + 3 * c]))
