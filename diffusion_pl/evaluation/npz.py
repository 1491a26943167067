"""Sample files in the ADM format (npz: arr_0 = uint8 NHWC images, arr_1 = int labels) and PNG grids.

Writes are atomic (diffusion_pl.utils.files.atomic_write)."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
from PIL import Image

from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.utils.files import atomic_write
from diffusion_pl.utils.images import image_grid


def _check_images_nhwc(images: np.ndarray, where: str) -> None:
    _check_nhwc(images.dtype, images.shape, where)


def _check_nhwc(dtype: np.dtype, shape: tuple[int, ...], where: str) -> None:
    if dtype != np.uint8:
        raise UserInputError(f"{where}: arr_0 has dtype {dtype}, expected uint8 NHWC images")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise UserInputError(
            f"{where}: arr_0 has shape {shape}, expected uint8 NHWC images (N, H, W, C) with C in (1, 3)"
        )


def _check_labels(labels: np.ndarray, n: int, where: str) -> None:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserInputError(f"{where}: arr_1 has shape {labels.shape}, expected ({n},) labels, one per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{where}: arr_1 has dtype {labels.dtype}, expected integer class labels")


def save_samples_npz(
    path: str,
    images_uint8_nhwc: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    overwrite: bool = False,
) -> str:
    """Write samples as ADM does: arr_0 = uint8 NHWC images, arr_1 = int64 labels (when given). Atomic.

    Convert float NCHW samples first with diffusion_pl.utils.images.to_uint8 + nchw_to_nhwc.
    Refuses to replace an existing file unless overwrite=True.
    """
    images = (
        images_uint8_nhwc.cpu().numpy()
        if isinstance(images_uint8_nhwc, torch.Tensor)
        else np.asarray(images_uint8_nhwc)
    )
    _check_images_nhwc(images, os.fspath(path))
    arrays = {"arr_0": images}
    if labels is not None:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        _check_labels(lab, images.shape[0], os.fspath(path))
        arrays["arr_1"] = lab.astype(np.int64)
    return atomic_write(path, lambda f: np.savez(f, **arrays), overwrite=overwrite)


def load_samples_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM sample/reference npz -> (uint8 NHWC images, labels or None), validating dtype and shapes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such sample file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UserInputError(f"{path}: no 'arr_0' array (found {data.files}); expected an ADM sample npz")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserInputError(
            f"{path}: not a readable npz file ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ) from e
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise UserInputError(f"{path}: cannot read npz ({e}); expected an ADM sample npz (arr_0 uint8 NHWC)") from e
    _check_images_nhwc(images, path)
    if labels is not None:
        _check_labels(labels, images.shape[0], path)
    return images, labels


def check_samples_npz(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Check an ADM sample npz from its headers only (fast, reads no image data): the file exists, is a readable zip,
    and holds arr_0 as uint8 NHWC. Returns (shape, dtype) of arr_0. :func:`load_samples_npz` checks it all again."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{path}: no such sample file (expected an ADM npz: arr_0 uint8 NHWC images)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "arr_0.npy" not in names:
                found = [n[: -len(".npy")] if n.endswith(".npy") else n for n in names]
                raise UserInputError(f"{path}: no 'arr_0' array (found {found}); expected an ADM sample npz")
            with archive.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except UserInputError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise UserInputError(
            f"{path}: not a readable npz file ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ) from e
    _check_nhwc(dtype, shape, path)
    return shape, dtype


def save_image_grid(path: str, images_uint8_nchw: torch.Tensor, nrow: int = 8, overwrite: bool = True) -> str:
    """Save a PNG grid of uint8 NCHW images (:func:`~diffusion_pl.utils.images.image_grid`, ``nrow`` images per row,
    2 px padding). Atomic."""
    x = torch.as_tensor(images_uint8_nchw)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"save_image_grid expects uint8 NCHW images with 1 or 3 channels, got {x.dtype} {tuple(x.shape)}"
        )
    pixels = image_grid(x.cpu(), nrow, padding=2).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return atomic_write(path, lambda f: image.save(f, format="PNG"), overwrite=overwrite)
