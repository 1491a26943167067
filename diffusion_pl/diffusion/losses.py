"""The variational bound of a Gaussian diffusion: training losses (L_simple, hybrid, KL) and bits/dim evaluation.

Ho et al. 2020 (L_simple); Nichol & Dhariwal 2021 (L_hybrid = L_simple + lambda L_vlb, NLL in bits/dim):
    L_vlb = L_0 + sum_{t>0} L_t + L_T,   L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (t > 0)
    L_0 = -log p(x_0 | x_1) (discretised Gaussian decoder),   L_T = KL(q(x_T | x_0) || N(0, I))  (the prior term)
each divided by log 2 and averaged over dimensions (bits/dim). :class:`VariationalBound` is mixed into
:class:`~diffusion_pl.diffusion.process.GaussianDiffusion`, whose forward process and model posterior it uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]


class VariationalBound:
    """Losses and bits/dim of the process it is mixed into (``q_sample``, ``q_posterior_mean_variance``,
    ``p_mean_variance[_from_output]``, ``mean_type``, ``loss_type``, ...: see GaussianDiffusion)."""

    def _vb_from_p(self, p: dict, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound in bits/dim: dict(output [N], pred_xstart)."""
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return {"output": self._vb_from_p(p, x_start, x_t, t), "pred_xstart": p["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training losses for timesteps t (one model call). Returns dict(loss, mse, vb), each [N].

        * mse = mean over dims of (target - mean output)^2, target = eps / x_0 / mu_tilde per mean_type (L_simple).
        * vb  = L_t in bits/dim (unweighted). It is computed without clipping x_0; for "hybrid" it sees the model's
          mean output DETACHED, so it only trains the variance channels.
        * loss: "simple": mse (vb is then reported for monitoring only, without gradient);
          "hybrid": mse + w * vb with w = T/1000 if rescale_learned_sigmas else 1;
          "kl": vb * (T if rescale_learned_sigmas else 1) (mse reported without gradient).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self._model_t(t), **model_kwargs)
        channels = x_start.shape[1]
        mean_output = model_output[:, :channels] if self.learns_variance else model_output

        if self.mean_type == "epsilon":
            target = noise
        elif self.mean_type == "start_x":
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        if tuple(mean_output.shape) != tuple(target.shape):
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not fit x_start {tuple(x_start.shape)} for "
                f"var_type={self.var_type!r}"
            )
        mse = mean_flat((target - mean_output) ** 2)

        if self.loss_type == "kl":
            p = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
            vb = self._vb_from_p(p, x_start, x_t, t)
            loss = vb * self.num_timesteps if self.rescale_learned_sigmas else vb
            return {"loss": loss, "mse": mse.detach(), "vb": vb}
        if self.loss_type == "hybrid":
            # Stop-gradient on the mean: the vb term only trains the variance (Improved DDPM, section 3.1).
            frozen = torch.cat([mean_output.detach(), model_output[:, channels:]], dim=1)
            p = self.p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False)
            vb = self._vb_from_p(p, x_start, x_t, t)
            weight = self.num_timesteps / 1000.0 if self.rescale_learned_sigmas else 1.0
            return {"loss": mse + weight * vb, "mse": mse, "vb": vb}
        with torch.no_grad():
            p = self.p_mean_variance_from_output(model_output.detach(), x_t, t, clip_denoised=False)
            vb = self._vb_from_p(p, x_start, x_t, t)
        return {"loss": mse, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------------------------------------ bits/dim
    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [N] (it does not depend on the model)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim (Improved DDPM's NLL evaluation).

        For t = T-1, ..., 0: x_t ~ q(x_t | x_0) with fresh noise (``noise[t]`` if ``noise`` of shape [T, *x.shape]
        is given, else torch.randn(x.shape, generator=generator)), then L_t. Returns dict(total_bpd [N] =
        sum_t L_t + prior, prior_bpd [N], vb [N, T], xstart_mse [N, T], mse [N, T] (eps MSE)), column t = step t.
        """
        n = x_start.shape[0]
        if noise is not None and tuple(noise.shape) != (self.num_timesteps, *x_start.shape):
            raise ValueError(
                f"noise for calc_bpd_loop must have shape [T, *x_start.shape] = "
                f"{(self.num_timesteps, *x_start.shape)}, got {tuple(noise.shape)}"
            )
        vb = torch.empty(n, self.num_timesteps, device=x_start.device)
        xstart_mse = torch.empty_like(vb)
        eps_mse = torch.empty_like(vb)
        with torch.no_grad():
            for step in reversed(range(self.num_timesteps)):
                t = torch.full((n,), step, dtype=torch.int64, device=x_start.device)
                eps = (
                    noise[step]
                    if noise is not None
                    else torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
                )
                x_t = self.q_sample(x_start, t, noise=eps)
                p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
                vb[:, step] = self._vb_from_p(p, x_start, x_t, t)
                xstart_mse[:, step] = mean_flat((p["pred_xstart"] - x_start) ** 2)
                eps_mse[:, step] = mean_flat((p["eps"] - eps) ** 2)
            prior = self.prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": eps_mse,
        }
