"""The two discrete-time samplers of the reference, one step each, over a (respaced) GaussianDiffusion.

Ancestral sampling (DDPM; Ho et al. 2020, ADM Alg. 1 for classifier guidance) and DDIM (Song et al. 2021, eq. 12;
ADM Alg. 2 for classifier guidance). Randomness: each step adds the ``noise`` it is given (z ~ N(0, I), like x), or
draws ``torch.randn_like(x)`` from the global RNG; the sampling loop draws it (from its generator) and passes it in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .process import GaussianDiffusion


def _step_noise(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
        return torch.randn_like(x)
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x has shape {tuple(x.shape)}")
    return noise


def _step_result(mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor):
    """dict(sample = mean + std z where t > 0, = mean where t == 0 (the last step adds no noise), pred_xstart)."""
    nonzero = (t != 0).to(mean.dtype).view(-1, *([1] * (mean.ndim - 1)))
    return {"sample": mean + nonzero * std * z, "pred_xstart": pred_xstart}


def p_sample(
    process: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One ancestral (DDPM) step: x_{t-1} = mu + exp(0.5 log sigma^2) z, z ~ N(0, I), no noise at t = 0.

    With ``cond_fn`` (classifier guidance) mu <- mu + sigma^2 * cond_fn(x_t, t_model, **model_kwargs).
    Returns dict(sample, pred_xstart).
    """
    model_kwargs = model_kwargs or {}
    out = process.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    z = _step_noise(x, noise)
    mean = out["mean"]
    if cond_fn is not None:
        mean = process.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
    return _step_result(mean, torch.exp(0.5 * out["log_variance"]), z, t, out["pred_xstart"])


def ddim_step(
    process: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    cond_fn: Callable[..., torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) from index t to t - 1 of ``process`` (respaced or not).

    sigma = eta * sqrt((1 - ab_prev)/(1 - ab)) * sqrt(1 - ab/ab_prev);
    x_{t-1} = x0_hat sqrt(ab_prev) + sqrt(1 - ab_prev - sigma^2) eps + sigma z (no noise at t = 0),
    where eps is re-derived from the (clipped) x0_hat. eta = 0 is deterministic; eta = 1 on the full process has the
    DDPM posterior variance. With ``cond_fn``, eps is guided first (:meth:`GaussianDiffusion.condition_score`).
    Returns dict(sample, pred_xstart) with the x_0 prediction the step used.
    """
    model_kwargs = model_kwargs or {}
    out = process.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    if cond_fn is not None:
        out = process.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
    alpha_bar = process.gather(process.alphas_cumprod, t, x)
    alpha_bar_prev = process.gather(process.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    z = _step_noise(x, noise)
    mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1.0 - alpha_bar_prev - sigma**2) * out["eps"]
    return _step_result(mean, sigma, z, t, out["pred_xstart"])
