"""High-level evaluation: generated uint8 images + a reference -> dict of metrics, on one process or spread over a
run's processes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from diffusion_pl.evaluation.distributed import Launcher, all_gather_uneven, compute_on_rank_zero_and_broadcast, rank_of
from diffusion_pl.evaluation.features import InceptionFeatures
from diffusion_pl.evaluation.metrics import ALL_METRICS, DEFAULT_SEED, compute_metrics
from diffusion_pl.evaluation.npz import load_samples_npz
from diffusion_pl.evaluation.reference import load_reference, read_cache, reference_features
from diffusion_pl.utils.images import nhwc_to_nchw


def _as_image_source(images):
    """torch tensor = uint8 NCHW; numpy array = uint8 NHWC (file layout); str = ADM npz path; else iterable of NCHW."""
    if isinstance(images, (str, os.PathLike)):
        return nhwc_to_nchw(load_samples_npz(os.fspath(images))[0])
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 NHWC images, got a numpy array of dtype {images.dtype}")
        return nhwc_to_nchw(images)
    return images


def resolve_reference(reference, feature_extractor=None, weights_path=None, device=None, batch_size: int = 64):
    """dict of features/statistics as is; a reference cache npz (from reference_features) loaded; an ADM npz or a folder
    of images -> reference_features (extracted once, cached)."""
    if reference is None or isinstance(reference, Mapping):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        path = os.fspath(reference)
        if os.path.isfile(path) and read_cache(path) is not None:
            return load_reference(path)
        return reference_features(
            path, feature_extractor=feature_extractor, weights_path=weights_path, device=device, batch_size=batch_size
        )
    raise TypeError(f"reference must be a dict of features/statistics or a path, got {type(reference).__name__}")


def _extract(images, feature_extractor, weights_path, device, batch_size, progress):
    if feature_extractor is None:
        feature_extractor = InceptionFeatures(weights_path, device=device, batch_size=batch_size, progress=progress)
    return feature_extractor, feature_extractor(_as_image_source(images))


def evaluate_samples(
    gen_uint8,
    reference,
    weights_path: str | None = None,
    device: str | torch.device | None = None,
    metrics: Iterable[str] = ALL_METRICS,
    batch_size: int = 64,
    feature_extractor=None,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    launcher: Launcher | None = None,
) -> dict[str, float]:
    """Features of the generated images, then compute_metrics against the reference.

    gen_uint8: uint8 NCHW tensor, uint8 NHWC numpy array, ADM npz path, or iterable of uint8 NCHW batches.
    reference: dict of features/statistics (see compute_metrics), a reference cache file, an ADM npz or an image folder.
    feature_extractor: callable images -> dict(pool, logits);
        default InceptionFeatures(weights_path, device, batch_size).
    launcher: None for one process. Else the processes of a run (a Lightning Fabric, see
        diffusion_pl.evaluation.distributed.Launcher), each passing its own shard of the images (shards may differ in
        size): each extracts its shard's features, they are gathered in rank order, rank 0 resolves the reference
        (other ranks may pass None) and computes the metrics once, and every process returns that dict, equal to
        one process evaluating the concatenation of the shards in rank order. A progress bar on rank 0 only.
    """
    metrics = tuple(metrics)
    metric_options = dict(
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        isc_splits=isc_splits,
        seed=seed,
    )
    progress = progress and rank_of(launcher) == 0
    extractor, local = _extract(gen_uint8, feature_extractor, weights_path, device, batch_size, progress)
    gen = {k: all_gather_uneven(v, launcher) for k, v in local.items()}

    def on_rank_zero():
        ref = resolve_reference(reference, extractor, weights_path, device, batch_size) if metrics != ("isc",) else None
        return compute_metrics(gen, ref, metrics, **metric_options)

    return compute_on_rank_zero_and_broadcast(on_rank_zero, launcher)
