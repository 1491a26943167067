"""Noise (beta) schedules of DDPM and Improved DDPM.

All schedules are returned as float64 tensors of shape [T]; keep the schedule arithmetic in float64 and cast only
when gathering values for a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

BETA_SCHEDULES = ("linear", "cosine")

#: Offset s of the cosine schedule (Improved DDPM, eq. 17): it keeps beta_0 from being vanishingly small.
COSINE_OFFSET = 0.008
#: Largest beta allowed by the cosine schedule (Improved DDPM clips at 0.999 to avoid a singularity at t = T).
MAX_BETA = 0.999


def linear_beta_schedule(num_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule extended to any T.

    beta_i is evenly spaced from ``scale * 1e-4`` to ``scale * 0.02`` with ``scale = 1000 / T``, so that the total
    amount of noise added is (roughly) independent of T.
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: float, s: float = COSINE_OFFSET) -> float:
    """alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for a fraction t in [0, 1] of the process."""
    return math.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> torch.Tensor:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i = 0..T-1, so that the cumulative
    product of (1 - beta) follows alpha_bar at the grid points (until the clip at max_beta).
    """
    _check_num_timesteps(num_timesteps)
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int) -> torch.Tensor:
    """Improved DDPM's cosine schedule: betas of alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008."""
    return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)


def get_named_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """Betas (float64, shape [T]) of the schedule called ``name`` ("linear" or "cosine") with T = num_timesteps."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; allowed names: {', '.join(BETA_SCHEDULES)}")


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"the number of diffusion steps must be a positive integer, got {num_timesteps!r}")
