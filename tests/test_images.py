import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from diffusion_pl.utils.images import from_uint8, image_grid, nchw_to_nhwc, nhwc_to_nchw, to_uint8


def test_uint8_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(from_uint8(pixels)), pixels)
    x = from_uint8(pixels)
    assert x.min() == -1.0 and x.max() == 1.0


def test_layout_round_trip():
    a = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    t = nhwc_to_nchw(a)
    assert t.shape == (2, 3, 5, 7)
    assert np.array_equal(nchw_to_nhwc(t), a)


def test_from_uint8_rejects_float():
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("ncols", [1, 3, 4, 11])
def test_image_grid_is_torchvisions_layout(ncols):
    """Row-major cells, `padding` black pixels between and around, a short last row padded with black cells; one
    channel stays one channel (make_grid would repeat it to three)."""
    rgb = torch.randint(0, 256, (11, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_grid(rgb, ncols, padding=2), make_grid(rgb, nrow=ncols, padding=2))
    gray = rgb[:, :1]
    grid = image_grid(gray, ncols, padding=2)
    assert grid.shape[0] == 1 and torch.equal(grid[0], make_grid(gray, nrow=ncols, padding=2)[0])
    assert torch.equal(image_grid(rgb[:2], 2), torch.cat([rgb[0], rgb[1]], dim=2))  # no padding: plain tiling
