"""compute_metrics on precomputed features: wiring of torch-fidelity's feature-level functions, input order, options."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from diffusion_pl.evaluation import compute_metrics, fid_statistics


def feats(n, d=16, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_fid_is_zero_for_identical_sets_and_mean_shift_squared_for_shifted_ones():
    x = feats(200)
    assert compute_metrics({"pool": x}, {"pool": x}, ["fid"])["fid"] == pytest.approx(0.0, abs=1e-3)
    # same covariance, means differ by 0.5 in each of 16 dims: FID = |mu1 - mu2|^2 = 16 * 0.25
    assert compute_metrics({"pool": x + 0.5}, {"pool": x}, ["fid"])["fid"] == pytest.approx(4.0, rel=1e-3)


def test_cached_statistics_give_the_same_fid_as_features():
    gen, real = feats(100, seed=1), feats(120, seed=2, scale=1.3)
    from_features = compute_metrics({"pool": gen}, {"pool": real}, ["fid"])["fid"]
    stats = fid_statistics(real)
    # statistics read back from a file may come as float64 mu: cast to the generated dtype, same result
    from_stats = compute_metrics(
        {"pool": gen}, {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"]}, ["fid"]
    )
    assert from_stats["fid"] == pytest.approx(from_features, rel=1e-6)
    assert from_features > 0.5


def test_precision_recall_follow_generated_first_convention():
    real = feats(300, seed=3, scale=1.0)
    gen = feats(300, seed=4, scale=0.1)  # a collapsed generator: all samples realistic, little diversity
    out = compute_metrics({"pool": gen}, {"pool": real}, ["prc"])
    assert out["precision"] > 0.95  # generated samples fall inside the real manifold
    assert out["recall"] < 0.3  # most real samples are not covered by the generated one
    swapped = compute_metrics({"pool": real}, {"pool": gen}, ["prc"])
    assert swapped["precision"] == pytest.approx(out["recall"]) and swapped["recall"] == pytest.approx(out["precision"])
    assert out["f_score"] == pytest.approx(2 * out["precision"] * out["recall"] / (out["precision"] + out["recall"]))


def test_prc_neighborhood_is_passed_through():
    real, gen = feats(60, seed=5), feats(60, seed=6, scale=0.7, shift=0.3)
    k1 = compute_metrics({"pool": gen}, {"pool": real}, ["prc"], prc_neighborhood=1)
    k10 = compute_metrics({"pool": gen}, {"pool": real}, ["prc"], prc_neighborhood=10)
    assert k10["recall"] > k1["recall"]  # larger balls cover more


def test_kid_subset_size_is_clipped_with_a_warning():
    gen, real = feats(12, seed=7), feats(9, seed=8, shift=0.2)
    with pytest.warns(UserWarning, match="KID subset size 1000 is larger than the sets .* using 9"):
        out = compute_metrics({"pool": gen}, {"pool": real}, ["kid"])
    expected = kid_features_to_metric(gen, real, kid_subset_size=9, kid_subsets=100, rng_seed=2020, verbose=False)
    assert out["kid_mean"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-9)
    assert out["kid_subset_size"] == 9
    seeded = [compute_metrics({"pool": gen}, {"pool": real}, ["kid"], kid_subset_size=5, seed=s) for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] and seeded[0]["kid_mean"] != seeded[2]["kid_mean"]


def test_isc_uses_generated_logits_only():
    logits = feats(40, d=10, seed=9, scale=4.0)
    out = compute_metrics({"logits": logits}, None, ["isc"], isc_splits=4)
    assert set(out) == {"isc_mean", "isc_std"} and out["isc_mean"] > 1.5
    assert compute_metrics({"logits": logits}, None, ["isc"], isc_splits=4, seed=3)["isc_mean"] != out["isc_mean"]


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="unknown metrics \\['sfid'\\]"):
        compute_metrics({"pool": feats(5)}, {"pool": feats(5)}, ["fid", "sfid"])
    with pytest.raises(ValueError, match="need reference features"):
        compute_metrics({"pool": feats(5)}, None, ["fid"])
    stats = fid_statistics(feats(30))
    with pytest.raises(KeyError, match="reference features have no 'pool' entry"):
        compute_metrics({"pool": feats(30)}, stats, ["prc"])
    with pytest.raises(ValueError, match="do not match the generated ones"):
        compute_metrics({"pool": feats(30, d=8)}, stats, ["fid"])
    with pytest.raises(KeyError, match="generated features have no 'logits'"):
        compute_metrics({"pool": feats(30)}, None, ["isc"])


@pytest.mark.parametrize("metric,n_gen,n_ref,pattern", [
    ("prc", 3, 10, r"use the 3-th nearest neighbour .* need at least 4 .* got 3 generated and 10 reference images"),
    ("prc", 10, 2, r"got 10 generated and 2 reference images: evaluate more samples or leave prc out of the metrics"),
    ("isc", 3, 0, r"averaged over 10 splits .* needs at least 10 of them, got 3: .*lower isc_splits"),
    ("kid", 1, 5, r"KID needs at least 2 images per set, got 1 generated and 5 reference images"),
])  # fmt: skip
def test_too_few_images_for_a_metric_is_a_user_error(metric, n_gen, n_ref, pattern):
    """Too few images for a metric: a message naming the counts and the fix (torch-fidelity would return NaN for
    the Inception Score, or fail inside kthvalue for precision/recall)."""
    from diffusion_pl.errors import UserInputError

    g = torch.Generator().manual_seed(0)
    gen = {"pool": torch.randn(n_gen, 16, generator=g), "logits": torch.randn(n_gen, 1008, generator=g)}
    ref = {"pool": torch.randn(max(n_ref, 1), 16, generator=g)[:n_ref]}
    with pytest.warns(UserWarning) if metric == "kid" else contextlib.nullcontext():
        with pytest.raises(UserInputError, match=pattern):
            compute_metrics(gen, ref, [metric])


def test_enough_images_checked_from_the_sample_count_alone():
    """Before anything is sampled (evaluate / sweep / the training callback) only the sample count is known."""
    from diffusion_pl.errors import UserInputError
    from diffusion_pl.evaluation import check_enough_images

    check_enough_images(["fid", "isc", "prc", "kid"], 10)
    with pytest.raises(UserInputError, match="got 3 generated: evaluate more samples or leave prc out"):
        check_enough_images(["prc"], 3)
    with pytest.raises(UserInputError, match="needs at least 10 of them, got 9"):
        check_enough_images(["fid", "isc"], 9)
    check_enough_images(["fid", "isc"], 9, isc_splits=3)
