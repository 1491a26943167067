"""Guidance as wrappers: a classifier-gradient cond_fn (ADM) and a classifier-free model wrapper (Ho & Salimans)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def classifier_cond_fn(classifier: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]:
    """cond_fn(x, t, y=None, **kw) = s * grad_x sum_i log softmax(classifier(x, t))_i[y_i].

    ``t`` is whatever the process passes (the original timestep, rescaled if the process rescales). The gradient
    is taken at x_t with grad enabled locally, so the sampler may run under ``torch.no_grad()`` (but not under
    ``torch.inference_mode()``, whose tensors cannot require grad). Extra keyword arguments are ignored.
    """

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels: pass model_kwargs={'y': labels}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=log_probs.device), y.to(log_probs.device)]
            gradient = torch.autograd.grad(selected.sum(), x_in)[0]
        return gradient * scale

    return cond_fn


def classifier_free_model(
    model: Callable[..., torch.Tensor], guidance_scale: float, null_class: int
) -> Callable[..., torch.Tensor]:
    """Classifier-free guidance: eps~ = (1 + w) eps(x, y) - w eps(x, null).

    The returned callable runs ONE forward pass over the batch [x; x] with labels [y; null_class]. The first C
    output channels (C = channels of x) are guided; any further channels (a learned variance) are taken from the
    conditional branch. Other keyword tensors whose first dimension is the batch size are duplicated; everything
    else is passed through unchanged. With w = 0 the output equals the conditional model's output.
    """
    w = float(guidance_scale)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels: pass model_kwargs={'y': labels}")
        n, channels = x.shape[:2]
        doubled = {
            k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v
            for k, v in kwargs.items()
        }
        t2 = torch.cat([t, t]) if t.ndim > 0 else t
        labels = torch.cat([y, torch.full_like(y, null_class)])
        out = model(torch.cat([x, x]), t2, y=labels, **doubled)
        cond, uncond = out[:n], out[n:]
        eps = (1.0 + w) * cond[:, :channels] - w * uncond[:, :channels]
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided
