"""Building blocks of the ADM U-Net (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021).

Every block states what it computes. Shapes: ``x`` is ``[N, C, H, W]``, ``emb`` is ``[N, E]`` (time + class embedding).
Normalisation always runs in float32 and is cast back to the input dtype, so the blocks behave the same under
bf16/fp16 autocast as the reference's ``GroupNorm32``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "timestep_embedding",
    "GroupNorm32",
    "ResBlock",
    "Downsample",
    "Upsample",
    "AttentionBlock",
    "AttentionPool2d",
    "zero_init",
]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = exp(-ln(max_period) * i / half)``.

    ``half = dim // 2`` and ``i = 0 .. half - 1``; cosines come first. An odd ``dim`` is padded with one zero column.
    ``timesteps`` may be integer or fractional (e.g. rescaled ``t * 1000 / T``), shape ``[N]``. Returns float32 ``[N, dim]``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (used for the last layer of residual branches) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _group_norm_fp32(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """Affine-free GroupNorm of ``x`` computed in float32 (autocast disabled); the result stays float32."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), num_groups, None, None, eps)
    return F.group_norm(x.float(), num_groups, None, None, eps)


def _norm_modulate(x, weight, bias, scale, shift, num_groups, eps, act):
    """float32 ``[SiLU](norm(x) * w(1 + scale) + b(1 + scale) + shift)`` (scale/shift may be None); autocast off."""
    n = F.group_norm(x.float(), num_groups, None, None, eps)
    w, b = weight.float(), bias.float()
    if scale is None:
        a, c = w[None], b[None]
    else:
        one_plus = 1.0 + scale.float()
        a, c = w * one_plus, b * one_plus + shift.float()
    spatial = (1,) * (x.dim() - 2)
    out = torch.addcmul(c.view(*c.shape, *spatial), n, a.view(*a.shape, *spatial))
    return F.silu(out) if act else out


class _NormActRecompute(torch.autograd.Function):
    """Memory-efficient GroupNorm(+AdaGN)+SiLU: saves only its inputs and recomputes the cheap element-wise chain in
    backward, instead of keeping the normalised and the pre-activation tensors alive (two full-size activations per
    call) until the backward pass. Same maths as :func:`_norm_modulate`."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, act):
        ctx.cfg = (num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, scale, shift)
        with torch.autocast(x.device.type, enabled=False):
            return _norm_modulate(x, weight, bias, scale, shift, num_groups, eps, act).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(saved, ctx.needs_input_grad)]
        with torch.enable_grad(), torch.autocast(grad.device.type, enabled=False):
            out = _norm_modulate(*inputs, *ctx.cfg).to(saved[0].dtype)
        wrt = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs) + (None, None, None)


def norm_act(
    norm: "GroupNorm32", x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, act: bool = True
) -> torch.Tensor:
    """``SiLU(norm(x) * (1 + scale) + shift)`` in float32, returned in ``x.dtype``; recomputed in backward when a
    gradient is needed (see :class:`_NormActRecompute`)."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return _NormActRecompute.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _norm_modulate(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act).to(x.dtype)
    return _norm_modulate(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, act).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups evaluated in float32 and cast back to the input dtype.

    Besides the plain ``forward`` it offers :meth:`modulated`, which folds the affine parameters ``(w, b)`` and an
    AdaGN modulation ``(scale, shift)`` into a single fused multiply-add::

        norm(h) * (1 + scale) + shift == n * [w (1 + scale)] + [b (1 + scale) + shift],  n = (h - mu) / sigma

    (identical maths to applying them one after the other; one full-size tensor op instead of three).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm{num_groups} needs a channel count divisible by {num_groups}, got {num_channels}: "
                f"choose model_channels / channel_mult so that every level width is a multiple of {num_groups}"
            )
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        return self.modulated(x)

    def modulated(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``norm(x) * (1 + scale) + shift`` (scale/shift ``[N, C]``, optional) in float32, returned in ``x.dtype``."""
        n = _group_norm_fp32(x, self.num_groups, self.eps)
        w, b = self.weight.float(), self.bias.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if scale is None:
            out = torch.addcmul(b.view(shape), n, w.view(shape))
        else:
            one_plus = 1.0 + scale.float()
            a = w * one_plus  # [N, C]
            c = b * one_plus + shift.float()
            shape = a.shape + (1,) * (x.dim() - 2)
            out = torch.addcmul(c.view(shape), n, a.view(shape))
        return out.to(x.dtype)


class _Checkpointed(nn.Module):
    """Mixin: ``self._run(fn, *args)`` applies gradient checkpointing when ``self.use_checkpoint`` and training.

    Uses ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so dropout masks are identical when the
    forward pass is recomputed during backward).
    """

    use_checkpoint: bool = False

    def _run(self, fn, *args):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
        return fn(*args)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 convolution (``use_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, followed by a 3x3 convolution when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(_Checkpointed):
    """Residual block conditioned on an embedding::

        h = conv3x3(resample(SiLU(GN(x))))                       # resample: nearest x2 / avgpool x2 (BigGAN) or none
        e = Linear(SiLU(emb))                                      # [N, 2*out] with scale-shift, else [N, out]
        h = SiLU(GN(h) * (1 + scale) + shift)   (AdaGN)   or   SiLU(GN(h + e))   (additive)
        out = skip(resample(x)) + zero_conv3x3(Dropout(h))       # skip: identity or 1x1 conv when channels change
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.use_checkpoint = use_checkpoint
        self.in_norm = GroupNorm32(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = GroupNorm32(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = norm_act(self.in_norm, x)
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb_proj(F.silu(emb))
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm_act(self.out_norm, h, scale, shift)
        else:
            h = norm_act(self.out_norm, h + e.to(h.dtype)[:, :, None, None])
        h = self.out_conv(self.dropout(h))
        return self.skip(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self._run(self._forward, x, emb)


class AttentionBlock(_Checkpointed):
    """Multi-head self-attention over the H*W positions, residual::

        qkv = W_qkv GN(x)          (a 1x1 convolution, i.e. a Linear over channels, 3C outputs)
        out = x + W_proj Attn(q, k, v)       softmax(q k^T / sqrt(d)) v per head; W_proj zero-initialised

    ``heads = C // num_head_channels`` if ``num_head_channels`` is set (!= -1), else ``num_heads``.
    Channel order of the 3C qkv outputs (same parameter shapes, different meaning):
      - legacy (``use_new_attention_order=False``): ``(heads, [q|k|v], d)`` - split heads first, then q/k/v;
      - new    (``use_new_attention_order=True``):  ``([q|k|v], heads, d)`` - split q/k/v first, then heads.
    Attention is computed by ``scaled_dot_product_attention``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention: {channels} channels are not divisible by num_head_channels={num_head_channels}")
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise ValueError(f"attention: {channels} channels cannot be split into {heads} heads")
        self.channels, self.num_heads = channels, heads
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, hh, ww = x.shape
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")
        qkv = self.qkv(tokens)
        pattern = "b t (three h d) -> three b h t d" if self.use_new_attention_order else "b t (h three d) -> three b h t d"
        q, k, v = rearrange(qkv, pattern, three=3, h=self.num_heads)
        a = F.scaled_dot_product_attention(q, k, v)
        a = self.proj_out(rearrange(a, "b h t d -> b t (h d)"))
        return x + rearrange(a, "b (x y) c -> b c x y", x=hh, y=ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._forward, x)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over ``[mean; all H*W tokens]`` + a learned positional
    embedding; returns the projected output of token 0, ``[N, output_dim]``.

    Heads ``= embed_dim // head_channels``, new (q/k/v first) channel order.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, head_channels: int, output_dim: int | None = None):
        super().__init__()
        if embed_dim % head_channels:
            raise ValueError(f"attention pool: {embed_dim} channels are not divisible by head channels {head_channels}")
        self.spatial_dim, self.num_heads = spatial_dim, embed_dim // head_channels
        self.pos_embed = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, output_dim or embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(x, "b c x y -> b (x y) c")
        if tokens.shape[1] + 1 != self.pos_embed.shape[0]:
            raise ValueError(
                f"attention pool was built for {self.spatial_dim}x{self.spatial_dim} features, got "
                f"{tuple(x.shape[2:])}: the classifier's input size must equal its image_size"
            )
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos_embed.to(tokens.dtype)
        q, k, v = rearrange(self.qkv(tokens), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        a = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only token 0 is returned
        return self.proj(rearrange(a[:, :, 0], "b h d -> b (h d)"))
