"""Our pipeline equals torch_fidelity.calculate_metrics on the same images (random-weight Inception, CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch_fidelity
from eval_helpers import smooth_images
from PIL import Image

from diffusion_pl.evaluation import evaluate_samples, reference_features

N_GEN, N_REAL, KID_SUBSET, ISC_SPLITS = 12, 10, 6, 3


def write_png_folder(folder, images_nchw: torch.Tensor) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images_nchw):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def parity(tmp_path_factory, random_inception_weights, inception):
    root = tmp_path_factory.mktemp("parity")
    # two modes of generated images, one close to the real ones and one darker: precision/recall not both 1
    gen = torch.cat(
        [smooth_images(N_GEN // 2, seed=1, shift=15.0), smooth_images(N_GEN - N_GEN // 2, seed=3, shift=-60.0)]
    )
    real = smooth_images(N_REAL, seed=2)
    gen_dir = write_png_folder(root / "gen", gen)
    real_dir = write_png_folder(root / "real", real)
    theirs = torch_fidelity.calculate_metrics(
        input1=gen_dir,  # generated
        input2=real_dir,  # real
        cuda=False,
        fid=True,
        isc=True,
        prc=True,
        kid=True,
        kid_subset_size=KID_SUBSET,
        isc_splits=ISC_SPLITS,
        feature_extractor="inception-v3-compat",  # one extractor for all four, so PRC uses Inception pool, not VGG16
        feature_extractor_weights_path=random_inception_weights,
        batch_size=16,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )
    ref = reference_features(real_dir, feature_extractor=inception, cache_dir=str(root / "cache"))
    # generated images go in as a tensor, the real ones through the folder reader: both paths are compared
    ours = evaluate_samples(gen, ref, feature_extractor=inception, kid_subset_size=KID_SUBSET, isc_splits=ISC_SPLITS)
    return theirs, ours


def test_fid_isc_prc_kid_equal_torch_fidelity(parity):
    theirs, ours = parity
    pairs = {
        "fid": "frechet_inception_distance",
        "isc_mean": "inception_score_mean",
        "isc_std": "inception_score_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
        "kid_mean": "kernel_inception_distance_mean",
        "kid_std": "kernel_inception_distance_std",
    }
    for ours_key, their_key in pairs.items():
        assert ours[ours_key] == pytest.approx(theirs[their_key], rel=1e-5, abs=1e-9), ours_key
    assert ours["kid_subset_size"] == KID_SUBSET


def test_parity_case_is_not_degenerate(parity):
    """Guards the test above: the values compared must carry information (random weights can collapse features)."""
    theirs, ours = parity
    assert ours["fid"] > 1e-3
    assert ours["isc_mean"] > 1.01
    assert 0.0 < ours["precision"] < 1.0 or 0.0 < ours["recall"] < 1.0
    assert np.isfinite(list(ours.values())).all()
