"""ODE / SDE solvers over a denoiser D(x; sigma) (continuous.py), one plain function per algorithm.

Every solver takes x at the first noise level sigmas[0] (x = x_0 + sigma n, the "variance exploding" variable) and
steps through ``sigmas`` (descending, ending in 0) to the sample x_0. The probability-flow ODE is
dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3 with sigma(t) = t). The last step, to sigma = 0, is the denoising
step x_0 = D(x; sigma_{N-1}) in every solver (first order, one network evaluation).

``noise(x)`` draws the N(0, I) noise a stochastic step adds (like x); ``callback(i, denoised)`` is called after
step i with that step's x_0 prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]


def _levels(sigmas: torch.Tensor) -> list[float]:
    levels = [float(s) for s in sigmas]
    if len(levels) < 2 or levels[-1] != 0.0 or any(b >= a for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError("sigmas must be strictly decreasing noise levels ending in 0")
    return levels


def dpm_solver_pp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float = 1.0,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", sec. 4-5 and its SDE variant; midpoint form).

    With lambda = -log sigma (half the logSNR), h = lambda_{i+1} - lambda_i, r = h_{i-1} / h and D_i = D(x_i; sigma_i):
        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + (1 - e^{-(1+eta) h}) D_i
                  + 1/(2r) (1 - e^{-(1+eta) h}) (D_i - D_{i-1})             (left out at the first step: order 1)
                  + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z,   z ~ N(0, I)     (only when eta > 0)
    and x_0 = D_{N-1} at the last step (the lower-order final step). eta = 0 is the deterministic DPM-Solver++(2M).
    """
    levels = _levels(sigmas)
    if eta > 0 and noise is None:
        noise = torch.randn_like
    previous, h_previous = None, None
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:], strict=False)):
        denoised = denoiser(x, sigmas[i])
        if sigma_next == 0.0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            decay = -math.expm1(-(1.0 + eta) * h)  # 1 - e^{-(1+eta) h}
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + decay * denoised
            if previous is not None:
                x = x + (0.5 * decay * h / h_previous) * (denoised - previous)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * noise(x)
            h_previous = h
        previous = denoised
        if callback is not None:
            callback(i, denoised)
    return x


def dpm_solver_pp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, 2nd order, data prediction, first-order first and final
    steps. In the variables of :func:`dpm_solver_pp_2m_sde` (which it is, with eta = 0):
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - e^{-h}) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1}).
    """
    return dpm_solver_pp_2m_sde(denoiser, x, sigmas, eta=0.0, callback=callback)


def edm_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
    euler_above: float = math.inf,
) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1): Heun's 2nd-order method on the probability-flow ODE.

    d_i = (x_i - D(x_i; sigma_i)) / sigma_i, x' = x_i + (sigma_{i+1} - sigma_i) d_i (Euler), then, unless
    sigma_{i+1} = 0 or sigma_i > ``euler_above``, the trapezoidal correction x_{i+1} = x_i + (sigma_{i+1} - sigma_i)
    (d_i + d'_i) / 2 with d'_i = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}. 2N - 1 network evaluations for N noise levels
    (one fewer per step from above ``euler_above``). EDM starts at sigma_max = 80; the registry passes
    euler_above = 80 so that the top crossing of a discrete process (step_schedules.py; sigma ~2e4 -> 80 in one step)
    is the Euler step, which is the DDIM step: the correction over it would be (sigma_{i+1} - sigma_i) /
    (2 sigma_{i+1}) ~ -10^2 times a difference of two denoiser outputs.
    """
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:], strict=False)):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0.0 or sigma > euler_above:
            x = x_euler
        else:
            d_next = (x_euler - denoiser(x_euler, sigmas[i + 1])) / sigma_next
            x = x + (sigma_next - sigma) * 0.5 * (d + d_next)
        if callback is not None:
            callback(i, denoised)
    return x
