"""Shared helpers of the model tests: the reference implementation (guided_diffusion) is the oracle."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
warnings.filterwarnings("ignore", message=".*torch.cuda.amp.*", category=FutureWarning)

ref_unet = pytest.importorskip("guided_diffusion.unet")


def randomize_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Overwrite EVERY parameter with N(0, std^2) (zero-initialised layers would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def ref_attention_ds(image_size, resolutions):
    return tuple(image_size // r for r in resolutions)
