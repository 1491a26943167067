"""The Gaussian diffusion process of DDPM / Improved DDPM / ADM: forward process, model posterior, guidance, respacing
(its losses and bits/dim: :mod:`diffusion_pl.diffusion.losses`).

Notation (Ho et al. 2020; Nichol & Dhariwal 2021):
    beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s            (t = 0..T-1 here)
    q(x_t | x_0)        = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I),
        mu_tilde_t   = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) x_0
                       + (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t) x_t
        beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    p(x_{t-1} | x_t)    = N(mu_theta(x_t, t), Sigma_theta(x_t, t))

A *model* is any callable ``model(x, t, **model_kwargs) -> Tensor``. It is always called with the ORIGINAL (training)
timestep index: ``t`` is mapped through :attr:`GaussianDiffusion.timestep_map` (respaced processes) and, with
``rescale_timesteps``, converted to ``float(t) * 1000 / original_num_steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .losses import Model, VariationalBound
from .respace import space_timesteps
from .schedules import get_named_beta_schedule

MEAN_TYPES = ("epsilon", "start_x", "previous_x")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("simple", "hybrid", "kl")
LEARNED_VAR_TYPES = ("learned", "learned_range")

CondFn = Callable[..., torch.Tensor]


class GaussianDiffusion(VariationalBound):
    """A T-step Gaussian diffusion process (possibly a respaced sub-process of a longer training process).

    Args:
        betas: 1-D sequence of T betas in (0, 1]; converted to float64.
        mean_type: what the model's (first C) output channels predict: "epsilon", "start_x" (x_0) or
            "previous_x" (the posterior mean mu directly).
        var_type: "fixed_small" (beta_tilde_t), "fixed_large" (beta_t, with beta_tilde_1 at t = 0),
            "learned" (the model emits log sigma^2) or "learned_range" (the model emits v; log sigma^2 interpolates
            between log beta_tilde_t and log beta_t). Learned variances need 2C output channels [mean | variance].
        loss_type: "simple" (L_simple, fixed variances), "hybrid" (L_simple + vb with a stop-gradient on the mean;
            learned variances) or "kl" (the variational bound L_vlb alone).
        rescale_learned_sigmas: weight the hybrid vb term by T/1000 (and multiply the "kl" loss by T), as the
            reference's RESCALED_MSE / RESCALED_KL.
        rescale_timesteps: feed the model float(t) * 1000 / original_num_steps instead of the integer index.
        timestep_map: original step index of each of this process's steps (default: identity).
        original_num_steps: T of the original training process (default: len(betas)).
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        mean_type: str = "epsilon",
        var_type: str = "learned_range",
        loss_type: str = "hybrid",
        rescale_learned_sigmas: bool = False,
        rescale_timesteps: bool = False,
        timestep_map: torch.Tensor | Sequence[int] | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        _check_types(mean_type, var_type, loss_type)
        self.mean_type = mean_type
        self.var_type = var_type
        self.loss_type = loss_type
        self.rescale_learned_sigmas = bool(rescale_learned_sigmas)
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f"every beta must lie in (0, 1], got values in [{betas.min().item():.4g}, {betas.max().item():.4g}] "
                f"(the linear schedule, scaled by 1000/T, needs T >= 50)"
            )
        self.num_timesteps = int(betas.numel())
        self.original_num_steps = int(original_num_steps) if original_num_steps is not None else self.num_timesteps
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps, dtype=torch.int64)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64).detach().cpu().clone()
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map must have one entry per step ({self.num_timesteps}), got shape "
                f"{tuple(self.timestep_map.shape)}"
            )
        if self.timestep_map.numel() and (
            int(self.timestep_map.min()) < 0 or int(self.timestep_map.max()) >= self.original_num_steps
        ):
            raise ValueError(f"timestep_map entries must lie in [0, {self.original_num_steps})")

        self._derive_schedule(betas)
        self._device_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ helpers
    def _derive_schedule(self, betas: torch.Tensor) -> None:
        """The schedule quantities, float64 on the CPU (gathered per batch and cast to x.dtype by `gather`)."""
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_t
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])  # alpha_bar_{t-1}, 1 at t = 0
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # beta_tilde_t; it is 0 at t = 0, so its log is "clipped": the first entry is replaced by the second one.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.posterior_variance[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        # fixed_large: sigma^2 = beta_t, except at t = 0 where beta_tilde_1 gives a better decoder likelihood.
        self.fixed_large_variance = torch.cat([first, betas[1:]])
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)

    def gather(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] for a batch of indices t, cast to x.dtype and broadcast to x.shape ([N] -> [N, 1, ..] -> x)."""
        values = self._on_device(values, t.device)
        out = values[t].to(x.dtype)
        return out.view(-1, *([1] * (x.ndim - 1))).expand(x.shape)

    def _on_device(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        if values.device == device:
            return values
        key = (id(values), device)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._device_cache[key] = values.to(device)
        return cached

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model (and cond_fn) sees: the original index, as float * 1000/T_orig if rescaled."""
        mapped = self._on_device(self.timestep_map, t.device)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    @property
    def learns_variance(self) -> bool:
        return self.var_type in LEARNED_VAR_TYPES

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, original_num_steps={self.original_num_steps}, "
            f"mean_type={self.mean_type!r}, var_type={self.var_type!r}, loss_type={self.loss_type!r}, "
            f"rescale_learned_sigmas={self.rescale_learned_sigmas}, rescale_timesteps={self.rescale_timesteps})"
        )

    # ------------------------------------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, 1 - alpha_bar_t): returns (mean, variance, log_variance)."""
        mean = self.gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.gather(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self.gather(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I) (``noise``; fresh if None)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        _check_same_shape("noise", noise, "x_start", x_start)
        return (
            self.gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde): returns (mean, variance, clipped log variance)."""
        _check_same_shape("x_start", x_start, "x_t", x_t)
        mean = (
            self.gather(self.posterior_mean_coef1, t, x_t) * x_start
            + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.gather(self.posterior_variance, t, x_t)
        log_variance = self.gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------------------ parameterisations
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps."""
        return (
            self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (sqrt(1/alpha_bar_t) x_t - x_0) / sqrt(1/alpha_bar_t - 1)."""
        return (self.gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / self.gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """Invert mu = coef1 x_0 + coef2 x_t: x_0 = (mu - coef2 x_t) / coef1."""
        return (
            self.gather(1.0 / self.posterior_mean_coef1, t, x_t) * x_prev
            - self.gather(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t) * x_t
        )

    # ------------------------------------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        Returns dict(mean, variance, log_variance, pred_xstart, eps), all of x's shape. With ``clip_denoised`` the
        predicted x_0 is clamped to [-1, 1] and (for epsilon / start_x models) the mean is the posterior mean
        mu_tilde(x_0_hat, x_t); "previous_x" models output the mean directly. ``eps`` is re-derived from pred_xstart.
        """
        model_output = model(x, self._model_t(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised)

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """:meth:`p_mean_variance` for an already computed model output."""
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [N] = [{x.shape[0]}], got {tuple(t.shape)}")
        channels = x.shape[1]
        if self.learns_variance:
            expected = (x.shape[0], 2 * channels, *x.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(
                    f"var_type={self.var_type!r} needs a model output of shape {expected} ([mean | variance] "
                    f"channels), got {tuple(model_output.shape)}; build the network with learn_sigma=True"
                )
            mean_output, var_output = torch.split(model_output, channels, dim=1)
            if self.var_type == "learned":
                log_variance = var_output
            else:
                # v in [-1, 1] interpolates log sigma^2 between log beta_tilde_t (v = -1) and log beta_t (v = 1).
                frac = (var_output + 1.0) / 2.0
                log_variance = frac * self.gather(self.log_betas, t, x) + (1.0 - frac) * self.gather(
                    self.posterior_log_variance_clipped, t, x
                )
            variance = torch.exp(log_variance)
        else:
            if tuple(model_output.shape) != tuple(x.shape):
                raise ValueError(
                    f"var_type={self.var_type!r} needs a model output of x's shape {tuple(x.shape)}, got "
                    f"{tuple(model_output.shape)} (a learn_sigma network needs var_type 'learned_range')"
                )
            mean_output = model_output
            if self.var_type == "fixed_small":
                variance = self.gather(self.posterior_variance, t, x)
                log_variance = self.gather(self.posterior_log_variance_clipped, t, x)
            else:
                variance = self.gather(self.fixed_large_variance, t, x)
                log_variance = self.gather(self.fixed_large_log_variance, t, x)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            return x0.clamp(-1.0, 1.0) if clip_denoised else x0

        if self.mean_type == "previous_x":
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x, t, mean_output))
            mean = mean_output
        else:
            if self.mean_type == "start_x":
                pred_xstart = process_xstart(mean_output)
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, mean_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ------------------------------------------------------------------------------------------------ guidance
    def condition_mean(
        self, cond_fn: CondFn, out: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Classifier guidance for ancestral sampling (Sohl-Dickstein et al.; ADM Alg. 1).

        mu' = mu + Sigma * g with g = cond_fn(x_t, t_model, **model_kwargs) = s * grad_x log p(y | x_t, t), evaluated
        at x_t (not at the mean). Returns the new mean.
        """
        gradient = cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        return out["mean"].float() + out["variance"] * gradient.float()

    def condition_score(
        self, cond_fn: CondFn, out: dict, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Classifier guidance through the score (Song et al.; ADM Alg. 2), used by DDIM.

        eps' = eps - sqrt(1 - alpha_bar_t) * g, then x_0' = x_0(eps') (not re-clipped, as the reference), the mean is
        the posterior mean of x_0', and eps is re-derived from x_0'. Returns a new dict like ``out``.
        """
        gradient = cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        alpha_bar = self.gather(self.alphas_cumprod, t, x)
        eps = out["eps"] - (1.0 - alpha_bar).sqrt() * gradient
        guided = dict(out)
        guided["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        guided["mean"], _, _ = self.q_posterior_mean_variance(guided["pred_xstart"], x, t)
        guided["eps"] = self.predict_eps_from_xstart(x, t, guided["pred_xstart"])
        return guided

    # ------------------------------------------------------------------------------------------------ respacing
    def respaced(self, section_counts: str | Sequence[int]) -> GaussianDiffusion:
        """A new process over the kept steps of :func:`space_timesteps` (for sampling and evaluation).

        beta'_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}] (alpha_bar before the first kept step is 1; not clipped),
        so alpha_bar' equals alpha_bar at the kept steps. The timestep map is composed with this process's map, so
        the model still receives original training indices.
        """
        return self.respaced_at(space_timesteps(self.num_timesteps, section_counts))

    def respaced_at(self, kept: Sequence[int]) -> GaussianDiffusion:
        """:meth:`respaced` keeping the given step indices (ascending, distinct) of this process."""
        kept_t = torch.tensor(sorted(set(int(k) for k in kept)), dtype=torch.int64)
        kept_alpha_bar = self.alphas_cumprod[kept_t]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_alpha_bar[:-1]])
        return GaussianDiffusion(
            betas=1.0 - kept_alpha_bar / previous,
            mean_type=self.mean_type,
            var_type=self.var_type,
            loss_type=self.loss_type,
            rescale_learned_sigmas=self.rescale_learned_sigmas,
            rescale_timesteps=self.rescale_timesteps,
            timestep_map=self.timestep_map[kept_t],
            original_num_steps=self.original_num_steps,
        )


def create_diffusion(
    diffusion_steps: int = 1000,
    noise_schedule: str = "cosine",
    mean_type: str = "epsilon",
    var_type: str = "learned_range",
    loss_type: str = "hybrid",
    rescale_learned_sigmas: bool = False,
    rescale_timesteps: bool = False,
    timestep_respacing: str = "",
) -> GaussianDiffusion:
    """Build the full T = ``diffusion_steps`` process from named settings; respace it if ``timestep_respacing`` is
    set."""
    process = GaussianDiffusion(
        betas=get_named_beta_schedule(noise_schedule, diffusion_steps),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        rescale_learned_sigmas=rescale_learned_sigmas,
        rescale_timesteps=rescale_timesteps,
    )
    if timestep_respacing:
        process = process.respaced(timestep_respacing)
    return process


def _check_types(mean_type: str, var_type: str, loss_type: str) -> None:
    """Known names, and a loss that fits the variance: only hybrid / kl train a learned one, hybrid needs one."""
    _check_choice("mean_type", mean_type, MEAN_TYPES)
    _check_choice("var_type", var_type, VAR_TYPES)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    learned = var_type in LEARNED_VAR_TYPES
    if loss_type == "simple" and learned:
        raise ValueError(
            f"loss_type='simple' cannot train the variance of var_type={var_type!r}: use loss_type='hybrid' "
            f"(L_simple + vb) or 'kl'"
        )
    if loss_type == "hybrid" and not learned:
        raise ValueError(
            f"loss_type='hybrid' needs a learned variance (var_type 'learned' or 'learned_range'), got "
            f"var_type={var_type!r}: use loss_type='simple' for fixed variances"
        )


def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")
