"""A continuous view of a trained discrete-time model: the denoiser D(x; sigma) the ODE / SDE solvers integrate.

A T-step process with cumulative alphas alpha_bar_t defines noise levels (Karras et al. 2022, "EDM", sec. 2)

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)            (increasing in t; logSNR_t = -2 log sigma_t)

and the "variance exploding" variable x = x_t / sqrt(alpha_bar_t) = x_0 + sigma n, n ~ N(0, I). The model keeps its
training interface: it is called with x_t = x / sqrt(1 + sigma^2) and the ORIGINAL training index t, and its output
(eps, or x_0 for ``mean_type="start_x"``; only the mean channels when it also learned variances) gives

    D(x; sigma) = x - sigma * eps(x_t, t)                      (the x_0 prediction).

Noise levels between trained steps (``timestep_mode``):
  * ``"interpolate"`` (default): t is interpolated linearly in log sigma between the two neighbouring trained steps,
    and the model gets that fractional t (ADM's sinusoidal timestep embedding is defined for real t). Outside
    [sigma_0, sigma_{T-1}] t is clamped to 0 or T - 1. This is k-diffusion's DiscreteEpsDDPMDenoiser(quantize=False).
  * ``"nearest"``: the trained step nearest in log sigma (integer t), as DiscreteEpsDDPMDenoiser(quantize=True).
In both modes the scalings use the requested sigma itself (1/sqrt(1 + sigma^2) in, -sigma out).

Classifier guidance in score form (ADM eq. 14, Song et al. 2021): eps' = eps - sqrt(1 - alpha_bar) * g with
g = cond_fn(x_t, t) = s * grad_{x_t} log p(y | x_t, t), taken at x_t, the classifier also called with the original t;
here sqrt(1 - alpha_bar) = sigma / sqrt(1 + sigma^2). In the x variable that is D' = D + sigma^2 / sqrt(1 + sigma^2) g.
As in the reference's DDIM (``condition_score``), eps is the one of the x_0 prediction after ``clip_denoised`` clamps
it to [-1, 1], and the guided D' is not clamped again; so a first-order step of any solver is exactly a DDIM step, with
or without guidance. Classifier-free guidance is part of the model callable
(:func:`~diffusion_pl.diffusion.classifier_free_model`).

The view is of the full T-step process the model was trained with: the solvers choose their own noise levels
(step_schedules.py), so a respaced process, which has lost the levels between its kept steps, is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_pl.errors import UserInputError

from .process import GaussianDiffusion

TIMESTEP_MODES = ("interpolate", "nearest")


class DiscreteTimeDenoiser:
    """D(x; sigma) of a discrete-time eps / x_0 model under its full training ``process`` (see the module doc).

    Args:
        process: the T-step process the model was trained with (not respaced); its steps are the trained noise
            levels (``rescale_timesteps`` is honoured as in the process).
        model: ``model(x_t, t, **model_kwargs)`` -> [N, C or 2C, ...] (eps or x_0 first, optional variance after).
        model_kwargs: passed to the model and to ``cond_fn`` (e.g. ``{"y": labels}``).
        cond_fn: classifier guidance ``cond_fn(x_t, t, **model_kwargs) = s * grad log p(y | x_t)``, or None.
        clip_denoised: clamp D to [-1, 1].
        timestep_mode: "interpolate" or "nearest".
    """

    def __init__(
        self,
        process: GaussianDiffusion,
        model: Callable[..., torch.Tensor],
        model_kwargs: dict | None = None,
        cond_fn: Callable[..., torch.Tensor] | None = None,
        clip_denoised: bool = False,
        timestep_mode: str = "interpolate",
    ) -> None:
        if timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"unknown timestep_mode {timestep_mode!r}; allowed: {', '.join(TIMESTEP_MODES)}")
        if process.mean_type == "previous_x":
            raise ValueError(
                "the ODE/SDE solvers need a model that predicts eps or x_0; a 'previous_x' model only defines the "
                "discrete steps: sample it with method ddpm or ddim"
            )
        if process.num_timesteps != process.original_num_steps:
            raise UserInputError(
                f"the ODE/SDE solvers need the full {process.original_num_steps}-step training process, got one "
                f"respaced to {process.num_timesteps} steps: pass the process before respacing (e.g. create_diffusion "
                "without timestep_respacing) and choose the steps with `steps` (e.g. 'karras20', or '250' for the "
                "trained steps of that respacing)"
            )
        self.process = process
        self.model = model
        self.model_kwargs = model_kwargs or {}
        self.cond_fn = cond_fn
        self.clip_denoised = clip_denoised
        self.timestep_mode = timestep_mode
        alpha_bar = process.alphas_cumprod
        self.sigmas = ((1.0 - alpha_bar) / alpha_bar).sqrt()  # float64, increasing with the step index
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional, or nearest integer) step index of this process at noise level ``sigma`` (float64)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().log()
        table = self.log_sigmas
        if self.timestep_mode == "nearest" or table.numel() == 1:
            return (log_sigma[..., None] - table).abs().argmin(dim=-1).to(torch.float64)
        low = (torch.searchsorted(table, log_sigma, right=True) - 1).clamp(0, table.numel() - 2)
        w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0.0, 1.0)
        return low.to(torch.float64) + w

    def index_to_sigma(self, index: torch.Tensor) -> torch.Tensor:
        """sigma at a (fractional) step index: log sigma interpolated linearly between the trained steps."""
        index = torch.as_tensor(index, dtype=torch.float64)
        low = index.floor().long().clamp(0, self.sigmas.numel() - 1)
        high = index.ceil().long().clamp(0, self.sigmas.numel() - 1)
        w = index - index.floor()
        return ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the model and the classifier are called with at ``sigma``: the training index (int64 in "nearest"
        mode, float64 between neighbouring indices otherwise), rescaled to t * 1000 / T if the process rescales
        timesteps."""
        t = self.sigma_to_index(sigma)
        if self.process.rescale_timesteps:
            return t.float() * (1000.0 / self.process.original_num_steps)
        return t.long() if self.timestep_mode == "nearest" else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """D(x; sigma) for x = x_0 + sigma n; ``sigma`` is a number or one value per sample ([N])."""
        n, channels = x.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(n)
        shape = (n, *([1] * (x.ndim - 1)))
        sigma_x = sigma.to(device=x.device, dtype=x.dtype).view(shape)
        c_in = (1.0 / (1.0 + sigma**2).sqrt()).to(device=x.device, dtype=x.dtype).view(shape)
        x_t = x * c_in
        t = self.model_timestep(sigma).to(x.device)
        out = self.model(x_t, t, **self.model_kwargs)[:, :channels]  # mean channels (drops a learned variance)
        x0 = out if self.process.mean_type == "start_x" else x - sigma_x * out
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if self.cond_fn is None:
            return x0
        # eps' = (x - x0) / sigma - sqrt(1 - alpha_bar) g, sqrt(1 - alpha_bar) = sigma c_in: D' = x0 + sigma^2 c_in g.
        return x0 + sigma_x**2 * c_in * self.cond_fn(x_t, t, **self.model_kwargs).to(x.dtype)
