"""Conversions at the file boundary: float NCHW in [-1, 1] inside, uint8 NHWC in files."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW: round((x + 1) * 127.5), clamped to [0, 255].

    The reference scripts truncate instead of rounding; rounding makes from_uint8 -> to_uint8 an exact round trip.
    """
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (NCHW tensor or array) -> float32 in [-1, 1]: x / 127.5 - 1."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects uint8 pixels, got {x.dtype}")
    return x.float() / 127.5 - 1.0


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    """uint8 NCHW tensor -> uint8 NHWC numpy array (the ADM npz layout)."""
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy array (or NHW for one channel) -> uint8 NCHW tensor."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def image_grid(images: torch.Tensor, ncols: int, padding: int = 0) -> torch.Tensor:
    """uint8 NCHW images -> one uint8 [C, rows * (H + p) + p, ncols * (W + p) + p] image: row-major cells, ``padding``
    p black pixels between and around them, a short last row filled with black cells (torchvision's make_grid
    layout, without its 1 -> 3 channel expansion)."""
    n, c, h, w = images.shape
    rows = -(-n // ncols)
    cells = torch.cat([images, images.new_zeros(rows * ncols - n, c, h, w)])
    cells = torch.nn.functional.pad(cells, (padding, 0, padding, 0))
    grid = cells.reshape(rows, ncols, c, h + padding, w + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(c, rows * (h + padding), ncols * (w + padding))
    return torch.nn.functional.pad(grid, (0, padding, 0, padding))

