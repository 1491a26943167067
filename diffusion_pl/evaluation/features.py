"""Inception-v3 features through torch-fidelity's "inception-v3-compat" extractor (the TF FID graph, as ADM uses).

The extractor resizes to 299x299 itself, with a bilinear resize that matches the TF graph: callers pass images at their
native size and never resize. Outputs: pool = the 2048-d pool3 features (FID, precision/recall, KID) and
logits = the 1008-d "logits_unbiased" (Inception Score), both float32 as torch-fidelity returns them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from diffusion_pl.errors import UserRuntimeError

FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
POOL_LAYER = "2048"
LOGITS_LAYER = "logits_unbiased"
INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3
INCEPTION_WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]


class InceptionWeightsUnavailableError(UserRuntimeError):
    """The Inception weights were neither given as a local file nor downloadable."""


def default_inception_weights_cache_path() -> str:
    """Where torch-fidelity (torch.hub) looks for / downloads the Inception weights when no path is given."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)


def missing_weights_message(reason: str) -> str:
    return (
        f"Inception-v3 weights are not available ({reason}). Either pass a local weights file "
        f"/path/to/{INCEPTION_WEIGHTS_FILENAME} (--inception_weights of diffusion-pl evaluate / sweep, "
        f"inception_weights of SampleQualityEvaluation, feature_extractor_weights_path= in torch-fidelity), or "
        f"pre-download {INCEPTION_WEIGHTS_URL} on a machine with internet access and copy it to "
        f"{default_inception_weights_cache_path()} (torch-fidelity's cache; set TORCH_HOME to move it)."
    )


def weights_identity(weights_path: str | None) -> str:
    """A string that changes when the extractor weights change: resolved path, size and mtime of the file
    (or the default torch-fidelity file name when weights come from its download cache)."""
    path = weights_path if weights_path is not None else default_inception_weights_cache_path()
    try:
        st = os.stat(path)
    except OSError:
        return f"{FEATURE_EXTRACTOR_NAME}:{os.path.realpath(path)}:missing"
    return f"{FEATURE_EXTRACTOR_NAME}:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def as_uint8_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate a uint8 NCHW batch (numpy arrays are taken as NCHW too) and repeat 1-channel images to 3 channels."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 images (NCHW), got dtype {x.dtype}; convert with diffusion_pl.utils.images.to_uint8"
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, C, H, W) with C in (1, 3), got {tuple(x.shape)}; "
            "NHWC arrays from npz files convert with diffusion_pl.utils.images.nhwc_to_nchw"
        )
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x


def iter_batches(images, batch_size: int):
    """Yield uint8 NCHW batches from one tensor/array (split by batch_size) or from an iterable of batches."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(images)
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]
    else:
        yield from images


@contextmanager
def _no_download():
    """Make a missing weights file an error instead of a download (used when `allow_download=False`)."""

    def refuse(url, *args, **kwargs):
        raise FileNotFoundError(f"download of {url} disabled")

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", refuse):
        yield


def load_inception_extractor(
    weights_path: str | None = None, device: str | torch.device | None = None, allow_download: bool = True
) -> FeatureExtractorInceptionV3:
    """Build torch-fidelity's FeatureExtractorInceptionV3 ("inception-v3-compat", features pool + logits_unbiased).

    weights_path: a local weights file (offline clusters); None uses torch-fidelity's cache/download. Raises
    InceptionWeightsUnavailableError with instructions when the weights can be neither loaded nor downloaded.
    """
    device = torch.device(device) if device is not None else default_device()
    if weights_path is not None and not os.path.isfile(weights_path):
        raise InceptionWeightsUnavailableError(missing_weights_message(f"no file at {weights_path!r}"))
    try:
        if weights_path is None and not allow_download:
            with _no_download():
                model = FeatureExtractorInceptionV3(
                    FEATURE_EXTRACTOR_NAME,
                    [POOL_LAYER, LOGITS_LAYER],
                    feature_extractor_weights_path=None,
                    verbose=False,
                )
        else:
            model = FeatureExtractorInceptionV3(
                FEATURE_EXTRACTOR_NAME,
                [POOL_LAYER, LOGITS_LAYER],
                feature_extractor_weights_path=weights_path,
                verbose=False,
            )
    except InceptionWeightsUnavailableError:
        raise
    except Exception as e:  # download errors (URLError, HTTPError, OSError), unreadable or wrong state dicts
        where = weights_path if weights_path is not None else f"{INCEPTION_WEIGHTS_URL} (download)"
        raise InceptionWeightsUnavailableError(
            missing_weights_message(f"loading {where} failed with {type(e).__name__}: {e}")
        ) from e
    return model.to(device).eval()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class InceptionFeatures:
    """Callable uint8 NCHW images -> dict(pool=[N, 2048] float32, logits=[N, 1008] float32) on CPU.

    Args:
        weights_path: local Inception weights (torch-fidelity's .pth); None uses torch-fidelity's cache/download.
        device: where the network runs; default cuda when available, else cpu.
        batch_size: images per forward pass.
        progress: show a tqdm bar (callers pass False on all ranks but rank 0).
        allow_download: when False and weights_path is None, a missing cached file raises instead of downloading.

    Any object with the same call signature (and optionally an `identity` string) can replace this class in
    evaluate_samples / reference_features, e.g. a small network in tests.
    """

    def __init__(
        self,
        weights_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        progress: bool = True,
        allow_download: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights_path = weights_path
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = batch_size
        self.progress = progress
        self.model = load_inception_extractor(weights_path, self.device, allow_download=allow_download)
        self.identity = weights_identity(weights_path)

    @torch.no_grad()
    def __call__(self, images, total: int | None = None) -> dict[str, torch.Tensor]:
        """images: a uint8 NCHW tensor (or NCHW array), or an iterable of such batches. `total` sizes the bar."""
        if total is None and isinstance(images, (torch.Tensor, np.ndarray)):
            total = images.shape[0]
        pools, logits = [], []
        disable = not self.progress
        with tqdm(total=total, unit="img", desc="Inception features", disable=disable, leave=False) as bar:
            for batch in iter_batches(images, self.batch_size):
                x = as_uint8_nchw(batch)
                for i in range(0, x.shape[0], self.batch_size):
                    chunk = x[i : i + self.batch_size].to(self.device)
                    pool, logit = self.model(chunk)
                    pools.append(pool.cpu())
                    logits.append(logit.cpu())
                    bar.update(chunk.shape[0])
        if not pools:
            return {"pool": torch.zeros(0, 2048), "logits": torch.zeros(0, 1008)}
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}
