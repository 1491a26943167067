"""Reading a user's files: 16-bit greyscale images keep their tones, and files that are not images are named."""

import numpy as np
import pytest
from PIL import Image

from diffusion_pl.data.folder import list_images, open_image


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, channels):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472: a full-range gradient
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = np.asarray(open_image(str(tmp_path / "deep.png"), channels))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(image if channels == 1 else image[..., 0], expected)
    assert np.array_equal(np.asarray(open_image(str(tmp_path / "deep.png"), 3))[..., 2], expected)
    assert (image == 255).mean() < 0.01  # PIL's own convert leaves > 99 % of these pixels at 255


def test_files_that_are_not_images_are_named(tmp_path):
    for name in ["a.png", "b.tif", "c.TIFF", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"3 files under .* are left out: \.tif, \.tiff, \.txt, e\.g\. b\.tif"):
        listing = list_images(tmp_path, class_cond=False, name="ImageFolderDataModule")
    assert listing.files == ["a.png"]
