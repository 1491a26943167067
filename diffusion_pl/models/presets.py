"""Released OpenAI configurations as constructor keyword arguments (docs/PUBLISHED.md, "Released networks").

``released_config(name)`` returns ``(model_class, kwargs)``; ``build_released(name, device=...)`` constructs it.
The parameter counts are those measured with the reference code and are checked by the tests.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from .unet import EncoderUNetModel, UNetModel

__all__ = ["RELEASED_CONFIGS", "RELEASED_PROCESS", "DEFAULT_PROCESS", "released_config", "build_released"]

_ADM_COMMON = dict(use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
_CLASSIFIER_COMMON = dict(num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, pool="attention")
_IDDPM_COMMON = dict(num_heads=4, use_scale_shift_norm=True, conv_resample=True, learn_sigma=True)

# name -> (class, kwargs, parameter count measured with the reference code)
RELEASED_CONFIGS: dict[str, tuple[type, dict, int]] = {
    "adm_imagenet64": (UNetModel, dict(image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_new_attention_order=True, dropout=0.1,
        num_classes=1000, **_ADM_COMMON), 295_904_454),
    "adm_imagenet64_classifier": (EncoderUNetModel, dict(image_size=64, model_channels=128, num_res_blocks=4,
        attention_resolutions=(32, 16, 8), **_CLASSIFIER_COMMON), 65_438_568),
    "adm_imagenet128": (UNetModel, dict(image_size=128, model_channels=256, num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_heads=4, num_classes=1000, **_ADM_COMMON), 421_529_606),
    "adm_imagenet128_classifier": (EncoderUNetModel, dict(image_size=128, model_channels=128, num_res_blocks=2,
        attention_resolutions=(32, 16, 8), **_CLASSIFIER_COMMON), 42_568_040),
    "adm_imagenet256": (UNetModel, dict(image_size=256, model_channels=256, num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, num_classes=1000, **_ADM_COMMON), 553_838_086),
    "adm_imagenet256_uncond": (UNetModel, dict(image_size=256, model_channels=256, num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, **_ADM_COMMON), 552_814_086),
    "adm_imagenet256_classifier": (EncoderUNetModel, dict(image_size=256, model_channels=128, num_res_blocks=2,
        attention_resolutions=(32, 16, 8), **_CLASSIFIER_COMMON), 54_096_360),
    "iddpm_cifar10": (UNetModel, dict(image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
        attention_resolutions=(16, 8), dropout=0.3, **_IDDPM_COMMON), 52_546_438),
    "iddpm_imagenet64_uncond": (UNetModel, dict(image_size=64, model_channels=128, channel_mult=(1, 2, 3, 4),
        num_res_blocks=3, attention_resolutions=(16, 8), **_IDDPM_COMMON), 121_063_942),
    "iddpm_imagenet64_cond": (UNetModel, dict(image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4),
        num_res_blocks=3, attention_resolutions=(16, 8), num_classes=1000, **_IDDPM_COMMON), 273_049_350),
}  # fmt: skip

#: the diffusion process each released network was trained with (a .pt file does not record it):
#: (T, noise schedule, rescale_timesteps: the network takes t * 1000 / T)
RELEASED_PROCESS: dict[str, tuple[int, str, bool]] = {
    "adm_imagenet64": (1000, "cosine", False),
    "adm_imagenet128": (1000, "linear", False),
    "adm_imagenet256": (1000, "linear", False),
    "adm_imagenet256_uncond": (1000, "linear", False),
    "iddpm_cifar10": (4000, "cosine", True),
    "iddpm_imagenet64_uncond": (4000, "cosine", True),
    "iddpm_imagenet64_cond": (4000, "cosine", False),
}
#: the process of an --arch given as a YAML file of UNetModel arguments (ADM ImageNet-64's)
DEFAULT_PROCESS: tuple[int, str, bool] = (1000, "cosine", False)


def released_config(name: str) -> tuple[type, dict]:
    """``(model_class, constructor kwargs)`` of a released configuration, e.g. ``released_config("adm_imagenet64")``."""
    if name not in RELEASED_CONFIGS:
        raise KeyError(f"unknown released configuration {name!r}; available: {', '.join(RELEASED_CONFIGS)}")
    cls, kwargs, _ = RELEASED_CONFIGS[name]
    return cls, copy.deepcopy(kwargs)


def build_released(name: str, device: torch.device | str | None = None, **overrides):
    """Construct a released configuration (optionally on ``device="meta"`` to count parameters without memory)."""
    cls, kwargs = released_config(name)
    kwargs.update(overrides)
    with torch.device(device) if device is not None else nullcontext():
        return cls(**kwargs)
