"""The networks' weights prepared once per sampling loop: detached, cast to the compute dtype, channels_last on the
CPU (what autocast and oneDNN would otherwise redo at every network call)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def sampling_weights(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` detached (no autograd through the weights while sampling), with the weights and
    biases of its convolutions and Linear layers cast ONCE to the compute dtype ``dtype`` (what autocast would do on
    every call, bit for bit) and, on the CPU, 4-D convolution weights in channels_last (what oneDNN would reorder them
    to on every call)."""
    out = {}
    cpu = next(module.parameters()).device.type == "cpu"
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            t = p.detach()
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) and t.is_floating_point():
                fmt = torch.channels_last if cpu and t.dim() == 4 else torch.preserve_format
                t = t.to(dtype=dtype, memory_format=fmt)
            out[key] = t
    return out


@contextmanager
def frozen(*modules):
    """requires_grad False on every parameter of ``modules`` for the duration (restored afterwards)."""
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
