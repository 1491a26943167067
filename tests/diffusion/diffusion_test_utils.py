"""Shared helpers for tests/diffusion: a deterministic toy model and the reference (oracle) process builder.

The oracle is the PyPI package guided-diffusion-sdk 1.0.0 (import name ``guided_diffusion``; a community fork of
openai/guided-diffusion, installed by `make test` from tests/oracle-requirements.txt, which says what it is). Diffed
against openai/guided-diffusion (gaussian_diffusion, respace, resample, losses, nn, unet, script_util), it is the real
source plus additions; the maths used by these tests is identical (respace, resample, losses, script_util
byte-identical; schedules, q_*, p_mean_variance, condition_mean/score, p_sample, _vb_terms_bpd, training_losses,
calc_bpd_loop identical). Behaviour that differs from openai/guided-diffusion:
  * ``ddim_sample`` with a ``cond_fn`` returns the UNGUIDED ``pred_xstart`` (the sample itself is the same): tests
    rebuild the upstream value from ``p_mean_variance`` + ``condition_score``;
  * extra sampling options and methods (``skip_timesteps``, ``init_image``, ``randomize_class``,
    ``cond_fn_with_grad``, ``*_with_grad``, PLMS) that are off by default / unused here (the ``*_with_grad``
    variants would hand a respaced process's cond_fn un-mapped timesteps);
  * gradient checkpointing: a different ``CheckpointFunction`` and ``AttentionBlock`` honours ``use_checkpoint``
    (upstream always checkpoints attention). Forward values and gradients are unchanged.
``resample.LossSecondMomentResampler`` still uses ``np.int`` (removed in NumPy 1.24), as upstream: tests patch it.
"""

from __future__ import annotations

import torch
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import respace as ref_respace

from diffusion_pl.diffusion import GaussianDiffusion, get_named_beta_schedule

MEAN_TYPES = {"epsilon": gd.ModelMeanType.EPSILON, "start_x": gd.ModelMeanType.START_X,
              "previous_x": gd.ModelMeanType.PREVIOUS_X}
VAR_TYPES = {"fixed_small": gd.ModelVarType.FIXED_SMALL, "fixed_large": gd.ModelVarType.FIXED_LARGE,
             "learned": gd.ModelVarType.LEARNED, "learned_range": gd.ModelVarType.LEARNED_RANGE}


def ref_loss_type(loss_type: str, rescale_learned_sigmas: bool):
    if loss_type == "kl":
        return gd.LossType.RESCALED_KL if rescale_learned_sigmas else gd.LossType.KL
    return gd.LossType.RESCALED_MSE if rescale_learned_sigmas else gd.LossType.MSE


def default_loss(var_type: str) -> str:
    return "hybrid" if var_type in ("learned", "learned_range") else "simple"


def make_pair(schedule="cosine", steps=20, mean_type="epsilon", var_type="learned_range", loss_type=None,
              rescale_learned_sigmas=False, rescale_timesteps=False, respacing=""):
    """(ours, reference SpacedDiffusion) built from the same settings, as script_util.create_gaussian_diffusion."""
    loss_type = loss_type or default_loss(var_type)
    ours = GaussianDiffusion(get_named_beta_schedule(schedule, steps), mean_type, var_type, loss_type,
                             rescale_learned_sigmas=rescale_learned_sigmas, rescale_timesteps=rescale_timesteps)
    if respacing:
        ours = ours.respaced(respacing)
    ref = ref_respace.SpacedDiffusion(
        use_timesteps=ref_respace.space_timesteps(steps, respacing or [steps]),
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=MEAN_TYPES[mean_type],
        model_var_type=VAR_TYPES[var_type],
        loss_type=ref_loss_type(loss_type, rescale_learned_sigmas),
        rescale_timesteps=rescale_timesteps,
    )
    return ours, ref


class ToyModel:
    """A fixed random 1x1 'conv' mixing the input channels plus a timestep-dependent bias.

    out = W x + sin(t/7) b (+ 0.1 y); with learned variances the last C channels go through tanh (v in [-1, 1]).
    Records every timestep tensor it receives in ``calls``.
    """

    def __init__(self, channels: int = 2, learn_sigma: bool = False, seed: int = 0, scale: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        self.channels = channels
        self.out_channels = 2 * channels if learn_sigma else channels
        self.weight = torch.randn(self.out_channels, channels, generator=g, dtype=torch.float64) * scale
        self.bias = torch.randn(self.out_channels, generator=g, dtype=torch.float64)
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(t.detach().clone())
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        h = torch.einsum("oc,nchw->nohw", w, x) + torch.sin(t.to(x.dtype) / 7.0)[:, None, None, None] * b[:, None, None]
        if y is not None:
            h = h + 0.1 * y.to(x.dtype)[:, None, None, None]
        if self.out_channels > self.channels:
            h = torch.cat([h[:, : self.channels], torch.tanh(h[:, self.channels :])], dim=1)
        return h


def toy_data(n=4, channels=2, size=3, seed=1):
    """8-bit-like data in [-1, 1] (multiples of 2/255), including the edge values -1 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g).float() / 127.5 - 1.0
    x[0, 0, 0, 0] = -1.0
    x[0, 0, 0, 1] = 1.0
    return x
