"""The fused CPU path of the ADM blocks: GroupNorm (+ AdaGN) (+ SiLU) [+ dropout] [+ 2x resample] [+ conv] as
autograd functions with a hand-written backward, which keep only their input and the [N, G] statistics for backward
and recompute the element-wise chain from them in ONE pass (far less activation memory than autograd's chain).

The plain path (:mod:`diffusion_pl.models.layers`: ``nn.GroupNorm`` in float32, ``nn.SiLU``, ``nn.Conv2d``) computes
the same values; ``fused_norm`` of the networks chooses (:func:`use_fused`). Measurements: benchmarks/NOTES.md.

Notation per sample n, channel c, group g(c), M = (C / G) * H * W elements per group:
    nrm = (x - mean_g) * rstd_g                   GroupNorm without affine (float32 statistics)
    pre = nrm * A_nc + B_nc                       A = w (1 + scale), B = b (1 + scale) + shift (affine + AdaGN)
    out = SiLU(pre)  (or pre without activation)
Backward, with dpre = dL/dpre:
    dB_nc = sum_hw dpre,  dA_nc = sum_hw dpre * nrm = rstd_g (sum_hw dpre * x - mean_g dB_nc)
    dx = rstd_g (A_nc dpre - k1_g - nrm k2_g),  k1_g = sum_{c in g} A_nc dB_nc / M, k2_g = sum_{c in g} A_nc dA_nc / M
       = P_nc dpre + X_nc x + Y_nc              P = rstd A, X = -rstd^2 k2, Y = rstd (rstd k2 mean - k1)
(the GroupNorm backward of ATen, with the per-sample modulation folded in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["use_fused", "norm_act", "norm_act_conv", "pointwise_conv"]


def use_fused(fused_norm: bool | None, x: torch.Tensor) -> bool:
    """Whether a block runs the fused path: ``fused_norm`` when set; when None (auto), on the CPU outside
    ``torch.compile`` (CUDA and compiled graphs use the plain modules)."""
    if fused_norm is None:
        return x.device.type == "cpu" and not torch.compiler.is_compiling()
    return bool(fused_norm)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N or 1, C] -> [N or 1, C, 1, ...] to broadcast against ``like``."""
    return t.view(*t.shape, *([1] * (like.dim() - 2)))


def _norm_coeffs(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B), ``[N or 1, C]``: norm(h) * (1 + scale) + shift == nrm * A + B with the affine folded in."""
    w, b = weight.float(), bias.float()
    if scale is None:
        return w[None], b[None]
    one_plus = 1.0 + scale.float()
    return w * one_plus, b * one_plus + shift.float()


def _norm_act_forward(x, A, B, num_groups, eps, act):
    """(out in x.dtype, mean [N, G], rstd [N, G]); computed in float32, in place in one float32 buffer."""
    n, c = x.shape[:2]
    nrm, mean, rstd = torch.ops.aten.native_group_norm(x.float(), None, None, n, c, x[0, 0].numel(), num_groups, eps)
    pre = torch.addcmul(_bcast(B, x), nrm, _bcast(A, x), out=nrm)
    if act:
        F.silu(pre, inplace=True)
    return pre.to(x.dtype), mean, rstd


def _per_channel(stat: torch.Tensor, channels: int) -> torch.Tensor:
    return stat.repeat_interleave(channels // stat.shape[1], dim=1)


def _recompute_pre(x, A, B, mean, rstd):
    """float32 ``pre = nrm * A + B`` from x and the saved statistics (one pass); also returns per-channel stats, P."""
    c = x.shape[1]
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
    P = rstd_c * A  # [N, C]
    return torch.addcmul(_bcast(B - mean_c * P, x), x, _bcast(P, x)), mean_c, rstd_c, P


def _norm_act_backward(grad, x, pre, A, mean_c, rstd_c, P, num_groups, act):
    """(dx in x.dtype, dA [N, C], dB [N, C]) for ``out = act(nrm * A + B)`` (see the block comment above)."""
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    g = grad.float()
    dpre = torch.ops.aten.silu_backward(g, pre) if act else g
    dB = dpre.sum(dims)
    dA = rstd_c * (torch.mul(dpre, x).sum(dims) - mean_c * dB)
    m = (c // num_groups) * x[0, 0].numel()
    k1 = (A * dB).view(n, num_groups, -1).sum(-1) / m
    k2 = (A * dA).view(n, num_groups, -1).sum(-1) / m
    k1, k2 = _per_channel(k1, c), _per_channel(k2, c)
    X = -rstd_c * rstd_c * k2
    Y = rstd_c * (rstd_c * k2 * mean_c - k1)
    if act:  # pre is no longer needed: reuse its float32 buffer for dx
        dx = torch.addcmul(_bcast(Y, x), x, _bcast(X, x), out=pre)
    else:
        dx = torch.addcmul(_bcast(Y, x), x, _bcast(X, x))
    dx.addcmul_(dpre, _bcast(P, x))
    return dx.to(x.dtype), dA, dB


def _norm_param_grads(needs, weight, bias, scale, shift, dA, dB):
    """Gradients of (weight, bias, scale, shift) from dA, dB (``None`` where not needed)."""
    gw = gb = gs = gsh = None
    if scale is None:
        one_plus = None
        if needs[1]:
            gw = dA.sum(0).to(weight.dtype)
        if needs[2]:
            gb = dB.sum(0).to(bias.dtype)
    else:
        one_plus = 1.0 + scale.float()
        if needs[1]:
            gw = (dA * one_plus).sum(0).to(weight.dtype)
        if needs[2]:
            gb = (dB * one_plus).sum(0).to(bias.dtype)
        if needs[3]:
            gs = (dA * weight.float() + dB * bias.float()).to(scale.dtype)
        if needs[4]:
            gsh = dB.to(shift.dtype)
    return gw, gb, gs, gsh


class _NormAct(torch.autograd.Function):
    """Memory-efficient GroupNorm(+AdaGN)(+SiLU): saves only its input (and [N, G] statistics) and recomputes the
    element-wise chain in backward in one pass, instead of keeping the normalised and the pre-activation tensors
    alive until the backward pass. Float32 maths (autocast off), output in ``x.dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, act):
        with torch.autocast(x.device.type, enabled=False):
            A, _B = _norm_coeffs(weight, bias, scale, shift)
            out, mean, rstd = _norm_act_forward(x, A, _B, num_groups, eps, act)
        ctx.cfg = (num_groups, act)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        num_groups, act = ctx.cfg
        with torch.autocast(grad.device.type, enabled=False):
            A, B = _norm_coeffs(weight, bias, scale, shift)
            xf = x.float()  # one copy, then float32 kernels: faster than mixed-dtype ones (NOTES.md)
            if act:
                pre, mean_c, rstd_c, P = _recompute_pre(xf, A, B, mean, rstd)
            else:
                c = x.shape[1]
                pre, mean_c, rstd_c = None, _per_channel(mean, c), _per_channel(rstd, c)
                P = rstd_c * A
            dx, dA, dB = _norm_act_backward(grad, xf, pre, A, mean_c, rstd_c, P, num_groups, act)
            grads = _norm_param_grads(ctx.needs_input_grad, weight, bias, scale, shift, dA, dB)
        return (dx.to(x.dtype) if ctx.needs_input_grad[0] else None, *grads, None, None, None)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


def _resampled_shape(shape: torch.Size, mode: str | None) -> tuple[int, ...]:
    """Shape of ``_resample`` of a tensor of ``shape`` (nearest 2x up, 2x2 average-pool down)."""
    n, c, h, w = shape
    if mode == "up":
        return n, c, 2 * h, 2 * w
    if mode == "down":
        return n, c, h // 2, w // 2
    return n, c, h, w


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is a 4-D tensor laid out (only) that way, else the default contiguous format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _resample_backward(grad: torch.Tensor, mode: str | None, inp: torch.Tensor) -> torch.Tensor:
    if mode == "up":
        return torch.ops.aten.upsample_nearest2d_backward(grad, list(grad.shape[2:]), list(inp.shape), 2.0, 2.0)
    if mode == "down":
        return torch.ops.aten.avg_pool2d_backward(grad, inp, [2, 2], [2, 2], [0, 0], False, True, None)
    return grad


def _dropout_noise(a: torch.Tensor, p: float) -> torch.Tensor:
    """The 0/1 keep draw of ``F.dropout(a, p)`` on the CPU (``bernoulli_(1 - p)``), made in NCHW order whatever the
    layout of ``a``, so a seed gives the same masks as the reference (which runs NCHW)."""
    return torch.empty(a.shape, dtype=a.dtype, device=a.device).bernoulli_(1.0 - p)


def _conv_weight(w: torch.Tensor, dtype: torch.dtype, inp: torch.Tensor) -> torch.Tensor:
    """The weight in the compute dtype and in the input's memory format, in at most ONE copy (oneDNN would otherwise
    reorder a contiguous weight to channels_last on every call, after the autocast cast; and a channels_last weight
    would pull an NCHW input into the NHWC kernels)."""
    return w.to(dtype=dtype, memory_format=_memory_format(inp))


class _NormActConv(torch.autograd.Function):
    """``conv(resample(dropout(SiLU(GN(x) * (1 + scale) + shift))))`` that keeps only x (and, with dropout, a 1-byte
    keep mask) for backward.

    The activation (and its resampled copy) is the convolution's input; autograd would keep it alive until backward.
    Here it is recomputed from x in backward (one element-wise pass, which the norm backward needs anyway), so a
    ResBlock keeps two of its four full-size tensors. The convolution itself is never recomputed: its backward is
    called directly on the recomputed input. Under autocast the convolution runs in the autocast dtype, as
    ``nn.Conv2d`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, conv_w, conv_b, num_groups, eps, resample, padding, dropout):
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else conv_w.dtype
        keep = None
        with torch.autocast(dev, enabled=False):
            A, B = _norm_coeffs(weight, bias, scale, shift)
            a, mean, rstd = _norm_act_forward(x, A, B, num_groups, eps, True)
            if dropout > 0:
                noise = _dropout_noise(a, dropout)
                keep = noise.bool()
                a = a * noise.div_(1.0 - dropout)
            r = _resample(a, resample).to(cdt)
            out = F.conv2d(r, _conv_weight(conv_w, cdt, r), None if conv_b is None else conv_b.to(cdt), padding=padding)
        ctx.cfg = (num_groups, resample, padding, cdt, dropout)
        ctx.save_for_backward(x, weight, bias, scale, shift, conv_w, conv_b, mean, rstd, keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, shift, conv_w, conv_b, mean, rstd, keep = ctx.saved_tensors
        num_groups, resample, padding, cdt, dropout = ctx.cfg
        needs = ctx.needs_input_grad
        need_in = any(needs[:5])
        with torch.autocast(grad.device.type, enabled=False):
            A, B = _norm_coeffs(weight, bias, scale, shift)
            xf = x.float()  # one copy, then float32 kernels: faster than mixed-dtype ones (NOTES.md)
            pre, mean_c, rstd_c, P = _recompute_pre(xf, A, B, mean, rstd)
            noise = None if keep is None else keep.to(x.dtype).div_(1.0 - dropout)
            if needs[5]:  # the weight gradient needs the convolution's input values
                a = F.silu(pre).to(x.dtype)
                if noise is not None:
                    a = a * noise
                r = _resample(a, resample).to(cdt)
            else:  # the input gradient needs only their shapes (guidance: frozen weights, gradient to x only)
                a = torch.empty_like(x)
                r = torch.empty(_resampled_shape(x.shape, resample), dtype=cdt, device=x.device,
                                memory_format=_memory_format(x))  # fmt: skip
            g_out = grad.to(cdt)
            g_r, g_cw, _ = torch.ops.aten.convolution_backward(
                g_out, r, _conv_weight(conv_w, cdt, r), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                [need_in, needs[5], False],
            )  # fmt: skip
            # bias gradient as a float32 (cascade) sum: oneDNN's NHWC bias reduction is less accurate
            g_cb = grad.float().sum((0, 2, 3)) if needs[6] and conv_b is not None else None
            del r
            dx = gw = gb = gs = gsh = None
            if need_in:
                g_a = _resample_backward(g_r.to(a.dtype), resample, a)  # (bf16 g_r, float32 x under autocast)
                del g_r
                if noise is not None:
                    g_a = g_a * noise
                dx, dA, dB = _norm_act_backward(g_a, xf, pre, A, mean_c, rstd_c, P, num_groups, True)
                dx = dx.to(x.dtype)
                gw, gb, gs, gsh = _norm_param_grads(needs, weight, bias, scale, shift, dA, dB)
        return (
            dx if needs[0] else None, gw, gb, gs, gsh,
            None if g_cw is None else g_cw.to(conv_w.dtype),
            None if g_cb is None else g_cb.to(conv_b.dtype),
            None, None, None, None, None,
        )  # fmt: skip


def pointwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution; on a channels_last input it runs as a Linear over the NHWC channel vectors (a plain GEMM,
    whose weight and bias gradients are more accurate than oneDNN's NHWC 1x1 convolution backward)."""
    if _memory_format(x) == torch.channels_last:
        y = F.linear(x.permute(0, 2, 3, 1), conv.weight.view(conv.out_channels, -1), conv.bias)
        return y.permute(0, 3, 1, 2)
    return conv(x)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_act(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: bool = True,
) -> torch.Tensor:
    """``SiLU(norm(x) * (1 + scale) + shift)`` (without SiLU when ``act`` is False) in float32, returned in
    ``x.dtype``; recomputed in backward when a gradient is needed (see :class:`_NormAct`)."""
    if _needs_grad(x, norm.weight, norm.bias, scale, shift):
        return _NormAct.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
    with torch.autocast(x.device.type, enabled=False):
        A, B = _norm_coeffs(norm.weight, norm.bias, scale, shift)
        return _norm_act_forward(x, A, B, norm.num_groups, norm.eps, act)[0]


def norm_act_conv(
    norm: nn.GroupNorm,
    conv: nn.Conv2d,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    resample: str | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``conv(resample(dropout(SiLU(norm(x) * (1 + scale) + shift))))`` (a 3x3/1x1 stride-1 convolution; ``dropout``
    is the drop probability, 0 = none, pass 0 in eval mode); with a gradient the activation is not kept for backward
    (see :class:`_NormActConv`)."""
    if _needs_grad(x, norm.weight, norm.bias, scale, shift, conv.weight, conv.bias):
        return _NormActConv.apply(x, norm.weight, norm.bias, scale, shift, conv.weight, conv.bias, norm.num_groups,
                                  norm.eps, resample, conv.padding[0], float(dropout))  # fmt: skip
    a = norm_act(norm, x, scale, shift)
    if dropout > 0:
        a = a * _dropout_noise(a, dropout).div_(1.0 - dropout)
    r = _resample(a, resample)
    return F.conv2d(r, _conv_weight(conv.weight, conv.weight.dtype, r), conv.bias, padding=conv.padding)
