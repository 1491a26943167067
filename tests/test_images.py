import numpy as np
import pytest
import torch

from diffusion_pl.utils.images import from_uint8, nchw_to_nhwc, nhwc_to_nchw, to_uint8


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
