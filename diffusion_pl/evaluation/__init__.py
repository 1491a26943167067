"""diffusion_pl.evaluation: Inception features (torch-fidelity "inception-v3-compat"), FID / IS / precision-recall / KID
from features (torch-fidelity's feature-level functions), uneven all-gather over a run's processes, ADM sample npz I/O.

No Lightning imports here. The random-weight Inception builder for tests lives in diffusion_pl.evaluation.testing.
"""

from diffusion_pl.evaluation.distributed import Launcher, all_gather_uneven, compute_on_rank_zero_and_broadcast
from diffusion_pl.evaluation.evaluate import evaluate_samples, resolve_reference
from diffusion_pl.evaluation.features import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    InceptionFeatures,
    InceptionWeightsUnavailableError,
    default_inception_weights_cache_path,
    load_inception_extractor,
)
from diffusion_pl.evaluation.metrics import ALL_METRICS, check_enough_images, compute_metrics, fid_statistics
from diffusion_pl.evaluation.npz import load_samples_npz, save_image_grid, save_samples_npz
from diffusion_pl.evaluation.reference import (
    images_from_folder,
    images_from_npz,
    load_reference,
    reference_features,
)

__all__ = [
    "ALL_METRICS",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "InceptionFeatures",
    "InceptionWeightsUnavailableError",
    "Launcher",
    "all_gather_uneven",
    "check_enough_images",
    "compute_metrics",
    "compute_on_rank_zero_and_broadcast",
    "default_inception_weights_cache_path",
    "evaluate_samples",
    "fid_statistics",
    "images_from_folder",
    "images_from_npz",
    "load_inception_extractor",
    "load_reference",
    "load_samples_npz",
    "reference_features",
    "resolve_reference",
    "save_image_grid",
    "save_samples_npz",
]
