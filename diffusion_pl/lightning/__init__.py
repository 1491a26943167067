"""diffusion_pl.lightning: LightningModules, callbacks and the training CLI wiring the diffusion maths to the networks.

    DiffusionModule          ADM / Improved DDPM training (hybrid loss, importance sampling, class dropout for CFG)
    NoisyClassifierModule    ADM noisy classifier for classifier guidance
    GuidedSampler            fixed-seed sample grids during training (classifier / classifier-free guidance)
    NonFiniteGuard           stops training at the first NaN/inf, before it reaches weights or checkpoints
    AtomicCheckpointIO       checkpoint writes that never leave a truncated file
"""

from diffusion_pl.lightning.callbacks import GuidedSampler, NonFiniteError, NonFiniteGuard
from diffusion_pl.lightning.checkpoint_io import AtomicCheckpointIO
from diffusion_pl.lightning.classifier_module import NoisyClassifierModule
from diffusion_pl.lightning.diffusion_module import DiffusionModule

__all__ = [
    "AtomicCheckpointIO",
    "DiffusionModule",
    "GuidedSampler",
    "NoisyClassifierModule",
    "NonFiniteError",
    "NonFiniteGuard",
]
