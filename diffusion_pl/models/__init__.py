"""diffusion_pl.models: ADM U-Net, noisy classifier, layers, OpenAI checkpoint import/export, released presets."""

from .layers import AttentionBlock, AttentionPool2d, Downsample, GroupNorm32, ResBlock, Upsample, timestep_embedding
from .openai_checkpoint import (
    OpenAICheckpointError,
    export_openai_state_dict,
    load_openai_checkpoint,
    load_openai_state_dict,
    openai_key_map,
)
from .presets import DEFAULT_PROCESS, RELEASED_CONFIGS, RELEASED_PROCESS, build_released, released_config
from .unet import EncoderUNetModel, UNetModel, default_channel_mult

__all__ = [
    "UNetModel",
    "EncoderUNetModel",
    "load_openai_state_dict",
    "export_openai_state_dict",
    "load_openai_checkpoint",
    "openai_key_map",
    "OpenAICheckpointError",
    "released_config",
    "build_released",
    "RELEASED_CONFIGS",
    "RELEASED_PROCESS",
    "DEFAULT_PROCESS",
    "default_channel_mult",
    "timestep_embedding",
    "GroupNorm32",
    "ResBlock",
    "AttentionBlock",
    "AttentionPool2d",
    "Downsample",
    "Upsample",
]
