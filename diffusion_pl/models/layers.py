"""Building blocks of the ADM U-Net (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021).

Every block states what it computes. Shapes: ``x`` is ``[N, C, H, W]``, ``emb`` is ``[N, E]`` (time + class embedding).
Normalisation always runs in float32 and is cast back to the input dtype, so the blocks behave the same under
bf16/fp16 autocast as the reference's ``GroupNorm32``.

Two paths compute the same values from the same parameters (so checkpoints load into either): the plain one made of
the stock modules (``nn.GroupNorm``, ``nn.SiLU``, ``nn.Conv2d``, ``nn.Dropout``), and the fused CPU one of
:mod:`diffusion_pl.models.fused`. ``fused_norm`` chooses: True, False, or None = auto (fused on the CPU outside
``torch.compile``, plain on CUDA and when compiled).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import fused as fused_ops

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
    ``timesteps`` may be integer or fractional (e.g. rescaled ``t * 1000 / T``), shape ``[N]``.
    Returns float32 ``[N, dim]``.
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


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (32 groups by default) evaluated in float32 and cast back to the input dtype, as the reference's."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm{num_groups} needs a channel count divisible by {num_groups}, got {num_channels}: "
                f"choose model_channels / channel_mult so that every level width is a multiple of {num_groups}"
            )
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        return super().forward(x.float()).to(x.dtype)


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
        norm_groups: int = 32,
        fused_norm: bool | None = None,
    ):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample, self.use_checkpoint, self.fused_norm = resample, use_checkpoint, fused_norm
        self.in_norm = GroupNorm32(channels, norm_groups)
        self.act = nn.SiLU()
        resamplers = {"up": Upsample(channels, use_conv=False), "down": Downsample(channels, use_conv=False)}
        self.updown = resamplers.get(resample, nn.Identity())  # nearest x2 / avgpool x2 (no parameters)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = GroupNorm32(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = self.emb_proj(F.silu(emb))
        if fused_ops.use_fused(self.fused_norm, x):
            return self._fused(x, e)
        h = self.in_conv(self.updown(self.act(self.in_norm(x))))
        e = e.to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(self.updown(x)) + self.out_conv(self.dropout(self.act(h)))

    def _fused(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The same maths through :mod:`diffusion_pl.models.fused` (1x1 skip as a GEMM on channels_last input)."""
        h = fused_ops.norm_act_conv(self.in_norm, self.in_conv, x, resample=self.resample)
        scale = shift = None
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
        else:
            h = h + e.to(h.dtype)[:, :, None, None]
        p = self.dropout.p if self.training else 0.0
        h = fused_ops.norm_act_conv(self.out_norm, self.out_conv, h, scale, shift, dropout=p)
        x = self.updown(x)
        return (x if isinstance(self.skip, nn.Identity) else fused_ops.pointwise_conv(self.skip, x)) + h

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
        norm_groups: int = 32,
        fused_norm: bool | None = None,
    ):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention: {channels} channels are not divisible by num_head_channels={num_head_channels}"
                )
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise ValueError(f"attention: {channels} channels cannot be split into {heads} heads")
        self.channels, self.num_heads = channels, heads
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint, self.fused_norm = use_checkpoint, fused_norm
        self.norm = GroupNorm32(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, hh, ww = x.shape
        fused = fused_ops.use_fused(self.fused_norm, x)
        h = fused_ops.norm_act(self.norm, x, act=False) if fused else self.norm(x)
        qkv = self.qkv(rearrange(h, "b c x y -> b (x y) c"))
        if self.use_new_attention_order:
            pattern = "b t (three h d) -> three b h t d"
        else:
            pattern = "b t (h three d) -> three b h t d"
        q, k, v = rearrange(qkv, pattern, three=3, h=self.num_heads)
        if fused and q.dtype != torch.float32 and q.shape[2] < 256 and q.requires_grad:
            # the CPU path trains short sequences in float32: the CPU bf16 flash-attention backward is slower there
            # (benchmarks/NOTES.md); autocast is disabled, as it would cast them back to bf16
            with torch.autocast(q.device.type, enabled=False):
                a = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
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
