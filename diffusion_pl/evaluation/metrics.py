"""FID / IS / precision-recall / KID from features, with torch-fidelity's feature-level functions.

Convention (torch-fidelity, ADM): generated = input1 / features_1, real = input2 / features_2. Precision is the
fraction of generated samples inside the real manifold, recall the fraction of real samples inside the generated one.
Precision/recall use the Inception pool features (as ADM), not torch-fidelity's VGG16 default.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from diffusion_pl.errors import UserInputError

ALL_METRICS = ("fid", "isc", "prc", "kid")
DEFAULT_SEED = 2020  # torch-fidelity's rng_seed default (IS shuffling, KID subsets)


def _features(d: Mapping, key: str, who: str) -> torch.Tensor:
    if key not in d or d[key] is None:
        raise KeyError(f"{who} features have no {key!r} entry (keys: {sorted(d)}); needed for the requested metrics")
    x = torch.as_tensor(d[key]).detach().cpu()
    if x.ndim != 2:
        raise ValueError(f"{who} {key!r} features must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x


def fid_statistics(features: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """mu, sigma of pool features (torch-fidelity's fid_features_to_statistics; np.cov with N-1)."""
    return fid_features_to_statistics(torch.as_tensor(features).detach().cpu())


def _reference_fid_statistics(ref: Mapping, gen_stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if ref.get("mu") is not None and ref.get("sigma") is not None:
        mu, sigma = np.asarray(ref["mu"]), np.asarray(ref["sigma"])
    elif ref.get("pool") is not None:
        return fid_statistics(_features(ref, "pool", "reference"))
    else:
        raise KeyError(f"reference has neither 'mu'/'sigma' nor 'pool' features (keys: {sorted(ref)})")
    if mu.shape != gen_stats["mu"].shape or sigma.shape != gen_stats["sigma"].shape:
        raise ValueError(
            f"reference statistics shapes mu {mu.shape}, sigma {sigma.shape} do not match the generated ones "
            f"{gen_stats['mu'].shape}, {gen_stats['sigma'].shape}: were they computed with another feature layer?"
        )
    # torch-fidelity requires equal dtypes; statistics saved from float32 features keep mu float32, sigma float64.
    return {"mu": mu.astype(gen_stats["mu"].dtype), "sigma": sigma.astype(gen_stats["sigma"].dtype)}


def check_enough_images(
    metrics: Iterable[str],
    n_generated: int,
    n_reference: int | None = None,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
) -> None:
    """Raise UserInputError when one of ``metrics`` cannot be computed from this many generated (and, when known,
    reference) images: IS needs >= isc_splits generated images (torch-fidelity returns NaN otherwise), precision /
    recall need more than k = prc_neighborhood images per set (the k-th neighbour within the set), KID >= 2."""
    counts = f"got {n_generated} generated" + ("" if n_reference is None else f" and {n_reference} reference images")
    known = [n_generated] + ([] if n_reference is None else [n_reference])
    if "isc" in metrics and n_generated < isc_splits:
        raise UserInputError(
            f"the Inception Score is averaged over {isc_splits} splits of the generated images and needs at least "
            f"{isc_splits} of them, got {n_generated}: evaluate more samples, lower isc_splits, or leave isc out of "
            "the metrics"
        )
    if "prc" in metrics and min(known) <= prc_neighborhood:
        raise UserInputError(
            f"precision/recall use the {prc_neighborhood}-th nearest neighbour within each set and need at least "
            f"{prc_neighborhood + 1} generated and reference images, {counts}: evaluate more samples or leave prc out "
            "of the metrics"
        )
    if "kid" in metrics and min(known) < 2:
        raise UserInputError(f"KID needs at least 2 images per set, {counts}: evaluate more samples or leave kid out")


def compute_metrics(
    gen: Mapping,
    ref: Mapping | None,
    metrics: Iterable[str] = ALL_METRICS,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    seed: int = DEFAULT_SEED,
) -> dict[str, float]:
    """Metrics from features. Returns a flat dict of floats with the keys of the requested metrics:
    fid; isc_mean, isc_std; precision, recall, f_score; kid_mean, kid_std, kid_subset_size.

    gen: dict(pool=[N, 2048], logits=[N, 1008]) of generated samples (logits only needed for "isc").
    ref: dict of real features (pool=[M, 2048]) or cached reference statistics (mu, sigma, optionally pool);
         "prc" and "kid" need the reference pool features, "fid" needs pool or mu/sigma; "isc" does not use ref.
    kid_subset_size: clipped to the smaller set size with a warning (torch-fidelity errors instead); the value used
         is returned as "kid_subset_size".
    seed: rng seed for IS shuffling and KID subset draws (torch-fidelity's rng_seed).
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    needs_ref = [m for m in metrics if m != "isc"]
    if needs_ref and ref is None:
        raise ValueError(f"metrics {needs_ref} need reference features or statistics, got ref=None")

    out: dict[str, float] = {}
    if "fid" in metrics:
        gen_stats = fid_statistics(_features(gen, "pool", "generated"))
        ref_stats = _reference_fid_statistics(ref, gen_stats)
        res = fid_statistics_to_metric(gen_stats, ref_stats, verbose=False)
        out["fid"] = float(res["frechet_inception_distance"])
    if "isc" in metrics:
        check_enough_images(["isc"], len(_features(gen, "logits", "generated")), isc_splits=isc_splits)
        res = isc_features_to_metric(
            _features(gen, "logits", "generated"), splits=isc_splits, shuffle=True, rng_seed=seed
        )
        out["isc_mean"] = float(res["inception_score_mean"])
        out["isc_std"] = float(res["inception_score_std"])
    if "prc" in metrics:
        g, r = _features(gen, "pool", "generated"), _features(ref, "pool", "reference")
        check_enough_images(["prc"], len(g), len(r), prc_neighborhood=prc_neighborhood)
        res = prc_features_to_metric(
            g,
            r,
            prc_neighborhood=prc_neighborhood,
            verbose=False,
        )
        out["precision"] = float(res["precision"])
        out["recall"] = float(res["recall"])
        out["f_score"] = float(res["f_score"])
    if "kid" in metrics:
        g, r = _features(gen, "pool", "generated"), _features(ref, "pool", "reference")
        size = kid_subset_size
        if size > min(len(g), len(r)):
            size = min(len(g), len(r))
            warnings.warn(
                f"KID subset size {kid_subset_size} is larger than the sets (generated {len(g)}, reference {len(r)}): "
                f"using {size}",
                stacklevel=2,
            )
        check_enough_images(["kid"], len(g), len(r))
        res = kid_features_to_metric(g, r, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
        out["kid_mean"] = float(res["kernel_inception_distance_mean"])
        out["kid_std"] = float(res["kernel_inception_distance_std"])
        out["kid_subset_size"] = float(size)
    return out
