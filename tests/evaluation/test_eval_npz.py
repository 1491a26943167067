"""ADM sample npz I/O (arr_0 uint8 NHWC, arr_1 labels) and PNG grids: round trips, atomicity, refusals, errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.evaluation import load_samples_npz, save_image_grid, save_samples_npz
from diffusion_pl.utils.images import nchw_to_nhwc, to_uint8


def images_nhwc(n=5, h=8, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_round_trip_with_labels_in_adm_layout(tmp_path):
    path = tmp_path / "samples_5x8x6x3.npz"
    imgs, labels = images_nhwc(), np.array([3, 1, 4, 1, 5])
    save_samples_npz(path, imgs, labels)
    with np.load(path) as raw:  # the exact ADM layout, readable without our code
        assert sorted(raw.files) == ["arr_0", "arr_1"]
        assert raw["arr_0"].dtype == np.uint8 and raw["arr_0"].shape == (5, 8, 6, 3)
    got, got_labels = load_samples_npz(path)
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(got_labels, labels)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_round_trip_from_model_output_without_labels(tmp_path):
    x = torch.rand(4, 1, 7, 7) * 2 - 1  # float NCHW in [-1, 1] as the sampler returns
    path = save_samples_npz(tmp_path / "gray.npz", nchw_to_nhwc(to_uint8(x)))
    got, labels = load_samples_npz(path)
    assert labels is None and got.shape == (4, 7, 7, 1)
    np.testing.assert_array_equal(got, nchw_to_nhwc(to_uint8(x)))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "s.npz"
    save_samples_npz(path, images_nhwc(seed=0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_samples_npz(path, images_nhwc(seed=1))
    np.testing.assert_array_equal(load_samples_npz(path)[0], images_nhwc(seed=0))  # untouched
    save_samples_npz(path, images_nhwc(seed=1), overwrite=True)
    np.testing.assert_array_equal(load_samples_npz(path)[0], images_nhwc(seed=1))


def test_save_rejects_float_images_and_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="dtype float32, expected uint8 NHWC"):
        save_samples_npz(tmp_path / "f.npz", images_nhwc().astype(np.float32))
    with pytest.raises(ValueError, match=r"arr_1 has shape \(3,\), expected \(5,\)"):
        save_samples_npz(tmp_path / "l.npz", images_nhwc(), labels=np.arange(3))
    assert os.listdir(tmp_path) == []


def test_wrong_dtype_error_names_file_and_fix(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, arr_0=images_nhwc().astype(np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{path}: arr_0 has dtype float32, expected uint8 NHWC images")):
        load_samples_npz(path)


def test_wrong_shape_and_missing_arrays(tmp_path):
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"arr_0 has shape \(2, 3, 8, 8\), expected uint8 NHWC"):
        load_samples_npz(tmp_path / "nchw.npz")
    np.savez(tmp_path / "other.npz", images=images_nhwc())
    with pytest.raises(ValueError, match=r"no 'arr_0' array \(found \['images'\]\)"):
        load_samples_npz(tmp_path / "other.npz")
    np.savez(tmp_path / "labels.npz", arr_0=images_nhwc(), arr_1=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="arr_1 has dtype float32, expected integer"):
        load_samples_npz(tmp_path / "labels.npz")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_gives_clear_error(tmp_path, damage):
    path = tmp_path / "bad.npz"
    save_samples_npz(path, images_nhwc(n=20))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an npz at all" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*(corrupt|cannot read npz)"):
        load_samples_npz(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_samples_npz(tmp_path / "nope.npz")


def test_image_grid_png(tmp_path):
    imgs = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    for i in range(4):
        imgs[i, i % 3] = 50 * (i + 1)
    path = save_image_grid(tmp_path / "grid.png", imgs, nrow=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)
        arr = np.asarray(im.convert("RGB"))
    # image 3 (row 1, col 1) starts at pixel 2 + 10 = 12 in both directions; its channel 0 is 200
    np.testing.assert_array_equal(arr[12:20, 12:20, 0], 200)
    np.testing.assert_array_equal(
        arr[2:10, 2:10], np.array([50, 0, 0], dtype=np.uint8).repeat(64).reshape(3, 8, 8).transpose(1, 2, 0)
    )
    with pytest.raises(FileExistsError):
        save_image_grid(path, imgs, nrow=2, overwrite=False)
    with pytest.raises(ValueError, match="uint8 NCHW"):
        save_image_grid(tmp_path / "f.png", imgs.float(), nrow=2)
