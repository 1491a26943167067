"""Helpers shared by the evaluation tests (imported as a plain module; tests/evaluation is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch


def smooth_images(n: int, size: int = 32, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """uint8 NCHW images with some structure (low-frequency colour fields plus noise), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x * 200 + 20 + shift + 25 * torch.rand(n, 3, size, size, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


class TinyFeatures:
    """A small deterministic feature network for fast metric/DDP tests: uint8 NCHW -> dict(pool [N, 8], logits [N, 10]).

    Per-image float64 computation, so features do not depend on how images are batched or sharded.
    """

    identity = "tiny-features-v1"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w_pool = torch.randn(3 * 4 * 4, 8, generator=g, dtype=torch.float64)
        self.w_logits = torch.randn(8, 10, generator=g, dtype=torch.float64)
        self.calls = 0
        self.images_seen = 0

    def __call__(self, images):
        batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else list(images)
        pools, logits = [], []
        for b in batches:
            x = torch.as_tensor(b)
            assert x.dtype == torch.uint8
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            f = torch.nn.functional.adaptive_avg_pool2d(x.double() / 255.0, 4).flatten(1)
            p = torch.tanh(f @ self.w_pool)
            pools.append(p.float())
            logits.append((p @ self.w_logits).float())
            self.images_seen += x.shape[0]
        self.calls += 1
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}
