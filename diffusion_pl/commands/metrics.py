"""The sample-quality job shared by `diffusion-pl evaluate` and `sweep`: the reference (an image folder, an ADM
reference npz, a reference cache, or every image of a DataModule split) and the metrics of an ADM sample npz, with
feature extraction spread over the processes of a Fabric."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import numpy as np

from diffusion_pl.commands.options import Evaluation, given, refuse_options
from diffusion_pl.data.common import EVALUATION_LOADER_VERSION, evaluation_dataloader
from diffusion_pl.errors import UserFileNotFoundError, UserInputError
from diffusion_pl.evaluation import evaluate_samples, load_samples_npz, reference_features
from diffusion_pl.evaluation.features import (
    InceptionFeatures,
    InceptionWeightsUnavailableError,
    missing_weights_message,
)
from diffusion_pl.evaluation.reference import load_reference, read_cache, resolution_mismatch
from diffusion_pl.utils.images import nhwc_to_nchw, to_uint8


def build_datamodule(data_class: str, data_args: dict[str, Any] | None):
    """Instantiate a LightningDataModule from a class path (short names resolve in diffusion_pl.data) and set it up."""
    if "." in data_class:
        module_name, _, name = data_class.rpartition(".")
    else:
        module_name, name = "diffusion_pl.data", data_class
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserInputError(
            f"--data_class {data_class!r}: cannot import it ({e}); use a class of diffusion_pl.data "
            "(MNIST5kDataModule, CIFAR10DataModule, ImageNet64DataModule) or a full module.ClassName"
        ) from None
    try:
        datamodule = cls(**(data_args or {}))
    except TypeError as e:
        raise UserInputError(f"--data_args {data_args} do not fit {name}: {e}") from e
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _uint8_batches(loader):
    for x, _ in loader:
        yield to_uint8(x)


def datamodule_reference(data_class, data_args, split, extractor, cache_dir):
    """Reference features of ALL images of a DataModule split as stored (in order, never flipped, the last partial
    batch included: :func:`evaluation_dataloader`), cached by source."""
    datamodule = build_datamodule(data_class, data_args)
    loader = evaluation_dataloader(datamodule, split)
    source_id = f"{data_class}:{json.dumps(data_args or {}, sort_keys=True)}:{split}:{EVALUATION_LOADER_VERSION}"
    return reference_features(
        _uint8_batches(loader), feature_extractor=extractor, source_id=source_id,
        num_images=len(loader.dataset), cache_dir=cache_dir,
    )  # fmt: skip


def needs_reference(evaluation: Evaluation) -> bool:
    return any(m != "isc" for m in evaluation.metrics)


def check_evaluation_inputs(evaluation: Evaluation) -> None:
    """The reference and Inception weights options, checked before any sampling or feature extraction."""
    reference, inception_weights = evaluation.reference, evaluation.inception_weights
    if evaluation.data_class is None:
        refuse_options(given(evaluation, ("data_args", "split")), "without --data_class (they choose its data)")
    if needs_reference(evaluation) and (reference is None) == (evaluation.data_class is None):
        raise UserInputError(
            "give exactly one reference: --reference (a folder of images, an ADM reference npz or a diffusion-pl "
            "reference cache) or --data_class (+ --data_args, --split); only --metrics [isc] needs none"
        )
    if reference is not None and not os.path.exists(reference):
        raise UserFileNotFoundError(
            f"--reference {reference}: no such file or directory (expected a folder of images, an ADM reference npz "
            "such as VIRTUAL_imagenet64_labeled.npz, or a reference cache npz written by diffusion-pl)"
        )
    if inception_weights is not None and not os.path.isfile(inception_weights):
        reason = f"no file at --inception_weights {inception_weights}"
        raise InceptionWeightsUnavailableError(missing_weights_message(reason))


def load_reference_features(evaluation: Evaluation, extractor: InceptionFeatures, image_shape) -> dict:
    """The reference's features (from a cache, or extracted and cached); warns when its images' [C, H, W] differ from
    the samples' ``image_shape``."""
    e = evaluation
    if e.reference is not None:
        if os.path.isfile(e.reference) and read_cache(e.reference) is not None:
            ref = load_reference(e.reference)
        else:
            ref = reference_features(e.reference, feature_extractor=extractor, cache_dir=e.cache_dir)
    else:
        ref = datamodule_reference(e.data_class, e.data_args, e.split, extractor, e.cache_dir)
    mismatch = resolution_mismatch(tuple(image_shape), ref)
    if mismatch:
        print(f"diffusion-pl: warning: {mismatch}", file=sys.stderr)
    return ref


def sample_metrics(fabric, samples_path: str, evaluation: Evaluation) -> dict[str, float]:
    """Metrics of an ADM npz: every rank extracts the features of its contiguous slice, the features are gathered and
    rank 0 computes (against the reference it alone loads); every rank returns the same dict."""
    rank = fabric.global_rank
    images, _ = load_samples_npz(samples_path)
    mine = np.array_split(np.arange(images.shape[0]), fabric.world_size)[rank]
    extractor = InceptionFeatures(evaluation.inception_weights, device=fabric.device,
                                  batch_size=evaluation.inception_batch_size, progress=rank == 0)  # fmt: skip
    ref = None
    if needs_reference(evaluation) and rank == 0:
        _, h, w, c = images.shape
        ref = load_reference_features(evaluation, extractor, (c, h, w))
    return evaluate_samples(
        nhwc_to_nchw(images[mine]), ref, feature_extractor=extractor, metrics=list(evaluation.metrics),
        kid_subset_size=evaluation.kid_subset_size, isc_splits=evaluation.isc_splits, launcher=fabric,
    )  # fmt: skip
