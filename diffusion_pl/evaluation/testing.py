"""RANDOM-WEIGHT Inception for tests, demos and benchmarks on machines without the real weights.

Metrics computed with these weights are NOT comparable to any published FID / IS / precision / recall: they only
exercise the real code path (torch-fidelity's network, resize and metric functions) offline.
"""

from __future__ import annotations

from unittest import mock

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffusion_pl.evaluation.features import FEATURE_EXTRACTOR_NAME, LOGITS_LAYER, POOL_LAYER
from diffusion_pl.utils.files import atomic_write


def build_random_inception_state_dict_for_tests(seed: int = 0, logits_scale: float = 20.0) -> dict[str, torch.Tensor]:
    """State dict of torch-fidelity's FeatureExtractorInceptionV3 with random (He-initialised) convolutions.

    The weight download/loading of the constructor is patched out. Convolutions and the fc layer are re-initialised with
    He (kaiming normal, fan_in) init under a fixed seed: PyTorch's default init shrinks activations layer after layer
    (~1e-8 pool features) and makes FID degenerate. BatchNorm keeps its identity statistics. The fc (logits) weights are
    further multiplied by `logits_scale`: with plain He init the softmax is nearly uniform and every Inception Score is
    ~1.0, which would make IS comparisons uninformative.
    """
    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None),
    ):
        model = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR_NAME, [POOL_LAYER, LOGITS_LAYER])
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
    with torch.no_grad():
        model.fc.weight.mul_(logits_scale)
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def save_random_inception_weights_for_tests(path: str, seed: int = 0, logits_scale: float = 20.0) -> str:
    """Write a random-weight Inception state dict (see above) to `path` atomically; returns `path`.

    Pass the path as `weights_path` / torch-fidelity's `feature_extractor_weights_path`. Test use only.
    """
    sd = build_random_inception_state_dict_for_tests(seed, logits_scale)
    return atomic_write(path, lambda f: torch.save(sd, f))
